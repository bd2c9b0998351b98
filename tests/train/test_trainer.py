"""The training loop in-process: learning, token-weighted accumulation, exact resume."""
import os

import pytest
import torch

from support.common import cpu_dims, metrics_rows, small_config
from ulysses_train.data import Batch
from ulysses_train.train.trainer import Trainer, run


def losses(run_dir):
    return [r["loss"] for r in metrics_rows(run_dir)]


def test_loss_falls(tmp_path):
    cfg = small_config(train={"steps": 40}, optim={"lr": 3e-3}, checkpoint={"every": 0})
    assert run(cfg, str(tmp_path)) == 0
    curve = losses(tmp_path)
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < 0.85 * sum(curve[:5]) / 5, curve


def test_metrics_rows_follow_the_contract(tmp_path):
    cfg = small_config(train={"steps": 4}, logging={"every": 2})
    run(cfg, str(tmp_path))
    got = metrics_rows(tmp_path)
    assert [r["step"] for r in got] == [2, 4]
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "peak_mem_gib", "mfu"):
        assert key in got[-1], key
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    assert [r["tokens"] for r in got] == [2 * tokens_per_step, 4 * tokens_per_step]
    assert got[-1]["mfu"] is None  # CPU: peak FLOP/s unknown, so no made-up number
    assert got[-1]["tokens_per_s"] > 0 and got[-1]["peak_mem_gib"] > 0


def test_resume_is_bit_exact(tmp_path):
    """12 steps straight == 6 steps (exit_after_steps) + a rerun in the same run dir.

    docs/checkpoints.md claim "resume is bit-exact"; catches lost optimizer moments, RNG or schedule state,
    and a data stream restarted at step 0 on resume (planted once: fails; test_resume_data.py
    checks the batches themselves)."""
    straight = small_config(train={"steps": 12}, checkpoint={"every": 0})
    run(straight, str(tmp_path / "a"))
    stopped = small_config(train={"steps": 12, "exit_after_steps": 6}, checkpoint={"every": 0})
    run(stopped, str(tmp_path / "b"))
    assert len(losses(tmp_path / "b")) == 6
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "step_00000006")
    run(small_config(train={"steps": 12}, checkpoint={"every": 0}), str(tmp_path / "b"))
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # bit-exact, not approx
    assert [r["lr"] for r in metrics_rows(tmp_path / "b")] == [r["lr"] for r in metrics_rows(tmp_path / "a")]


def test_resume_drops_metric_rows_after_the_checkpoint(tmp_path):
    cfg = small_config(train={"steps": 6}, checkpoint={"every": 3})
    run(cfg, str(tmp_path))
    # Pretend the process died after step 6's rows were written but before its checkpoint.
    ck = tmp_path / "checkpoints"
    (ck / "latest").write_text("step_00000003\n")
    import shutil
    shutil.rmtree(ck / "step_00000006")
    run(cfg, str(tmp_path))
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_finished_run_says_so(tmp_path, capsys):
    cfg = small_config(train={"steps": 2})
    run(cfg, str(tmp_path))
    capsys.readouterr()
    assert run(cfg, str(tmp_path)) == 0
    assert "already finished at step 2" in capsys.readouterr().out


def _uneven_batch(step, split="train", rows=None):
    """A global batch whose micro-batches hold very different numbers of valid labels."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 256, (4, 32), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[0, 3:] = -100  # row 0: 3 valid labels; rows 1-3 keep 32
    labels[2, 10:] = -100
    pos = torch.arange(32).expand(4, 32)
    return Batch(input_ids=ids, labels=labels, position_ids=pos, document_ids=torch.zeros_like(ids))


def _step_with(micro_batch_size):
    trainer = Trainer(small_config(train={"micro_batch_size": micro_batch_size},
                                   checkpoint={"resume": "never"}), "/nonexistent-run-dir", cpu_dims())
    trainer.data.global_batch = _uneven_batch
    out = trainer.train_step()
    return out["loss"], {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_accumulation_is_token_weighted():
    """Micro-batches of 1 row equal one 4-row batch even with uneven valid-token counts.

    claim "the loss is token-weighted" (docs/architecture.md); catches a mean of per-micro-batch means and a
    division by the micro-batch's own token count."""
    loss_1, params_1 = _step_with(1)
    loss_4, params_4 = _step_with(4)
    assert loss_1 == pytest.approx(loss_4, rel=1e-6)
    for name in params_4:
        torch.testing.assert_close(params_1[name], params_4[name], rtol=1e-5, atol=1e-6)
    # A mean of per-micro-batch means differs here, so the check above can fail.
    batch = _uneven_batch(0)
    per_row_valid = (batch.labels != -100).sum(1).tolist()
    assert len(set(per_row_valid)) > 1


def test_same_config_and_seed_give_bit_identical_runs(tmp_path):
    """Determinism: two runs of one config agree bit for bit (CPU). `train.deterministic`
    also sets what GPUs need; the process-wide switches are put back afterwards."""
    cublas = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    cfg = small_config(train={"steps": 4, "deterministic": True}, checkpoint={"every": 0})
    try:
        for name in ("a", "b"):
            assert run(cfg, str(tmp_path / name)) == 0
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if cublas is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
    a, b = metrics_rows(tmp_path / "a"), metrics_rows(tmp_path / "b")
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]


def test_train_step_has_no_branch_over_layouts():
    """Parallelism enters in parallel/parallelize.py only: the step drives a GradSync and never
    asks which layout it runs in (it used to branch over DDP, FSDP2 and the plain reduction)."""
    import ast
    import inspect
    import textwrap

    from ulysses_train.train.trainer import Trainer

    tree = ast.parse(textwrap.dedent(inspect.getsource(Trainer.train_step)))
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    # (the loss sum is all-reduced over self.dp_sp: the token-weighted loss, not a branch)
    layout_words = {"zero", "tp", "sp", "dp", "ddp", "sharded", "parallel", "ring", "dims",
                    "set_last_micro_batch", "reduce_gradients_", "no_sync"}
    assert not names & layout_words, sorted(names & layout_words)
