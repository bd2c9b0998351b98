"""The trainer loads `model.init_from` into a run that starts, never over its own checkpoint.

A one-step run from the HF dir saves a checkpoint; rerunning it with more steps resumes from
that checkpoint, and the weights it continues from must be the checkpoint's (which one step of
training moved away from the HF weights), with a log line saying which source won.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from support.common import cpu_dims, small_config
from support.hf import model_config
from ulysses_train.model.init import canonical_name
from ulysses_train.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _params(model) -> dict[str, torch.Tensor]:
    return {canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}


def _trainer(hf_dir: str, run_dir: str, steps: int) -> Trainer:
    cfg = small_config(train={"steps": steps}, data={"seq_len": 16}, checkpoint={"every": 1})
    cfg.model = model_config(hf_dir)
    cfg.model.init_from = hf_dir
    return Trainer(cfg, run_dir, cpu_dims())


def test_init_from_loads_for_a_new_run_and_resume_wins(hf_untied, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    first = _trainer(hf_untied, run_dir, steps=1)
    loaded = _params(first.model)
    log = capsys.readouterr().out
    assert f"model.init_from: loaded 0.07M parameters (bf16 -> fp32) from Hugging Face model " \
           f"dir {hf_untied}" in log
    first.fit()
    trained = _params(first.model)
    assert any(not torch.equal(trained[k], loaded[k]) for k in loaded)  # the step moved them
    capsys.readouterr()

    second = _trainer(hf_untied, run_dir, steps=2)
    log = capsys.readouterr().out
    assert second.resumed_from is not None and second.step == 1
    assert f"model.init_from={hf_untied} not loaded: resuming from" in log
    assert "model.init_from: loaded" not in log
    resumed = _params(second.model)
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)


def test_a_resuming_run_needs_no_init_from_source(hf_untied, tmp_path):
    """Catches: a run started from model.init_from could not resume once the source had moved or
    gone (a deleted download, another node): the pre-check read the source for the
    architecture and checked its files although resume wins and never loads it."""
    from support.common import SMALL
    from ulysses_train.cli import compose as cli
    from ulysses_train.cli.checks import check_inputs
    from ulysses_train.config.errors import ConfigError

    src, run_dir = tmp_path / "src", tmp_path / "run"
    shutil.copytree(hf_untied, src)
    args = [a for a in SMALL if not a.startswith(("model.", "data.seq_len"))] + [
        f"model.init_from={src}", "data.seq_len=16", "checkpoint.every=1",
        f"hydra.run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"]
    first = cli.precheck(args + ["train.steps=1"])
    assert first.model.n_layers == model_config(hf_untied).n_layers  # from the source
    Trainer(first, str(run_dir), cpu_dims()).fit()
    shutil.rmtree(src)

    again = cli.precheck(args + ["train.steps=2"])  # was: model.init_from: ... does not exist
    assert again.model == first.model  # the run's own checkpoint gave the same architecture
    with pytest.raises(ConfigError, match="does not exist"):
        check_inputs(again)  # a run dir with nothing to resume still needs the source
    trainer = Trainer(again, str(run_dir), cpu_dims())
    assert trainer.resumed_from is not None and trainer.step == 1
    assert trainer.fit() == 0 and trainer.step == 2


def test_a_resuming_run_reads_its_own_tokenizer_copy(tmp_path):
    """The tokenizer search of a resuming run looks in <run>/tokenizer/ (saved at its start)
    rather than at model.init_from, which may be gone; a new run looks at the source."""
    from ulysses_train.checkpoint.store import resume_source
    from ulysses_train.data.tokenizer_files import init_from_or_run

    run_dir = tmp_path / "run"
    step = run_dir / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    for name in (".metadata", "meta.json", "manifest.json"):  # what makes a step complete
        (step / name).write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text("step_00000001\n")
    resuming = resume_source(str(run_dir), "auto") is not None
    assert resuming and resume_source(str(run_dir), "never") is None
    assert init_from_or_run("/gone", str(run_dir), resuming) == "/gone"  # no tokenizer/ kept
    (run_dir / "tokenizer").mkdir()
    (run_dir / "tokenizer" / "tokenizer.json").write_text("{}")
    assert init_from_or_run("/gone", str(run_dir), True) == str(run_dir)
    assert init_from_or_run("/gone", str(run_dir), False) == "/gone"  # a new run: the source
    assert init_from_or_run("", str(run_dir), True) == ""  # no init_from: nothing to redirect
