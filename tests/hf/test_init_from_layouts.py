"""`model.init_from` loads the same weights in every layout, equal to transformers' model.

- One process: our loaded GPT's logits equal `LlamaForCausalLM.from_pretrained` of the same
  directory (fp32) on the real vocabulary; the padding logits are -inf (model/vocab.py).
- Layouts (tp=2; sp=2; dp=2 at zero 0/2/3 on 2 gloo ranks; tp=2 x dp=2 zero=3 on 4): every
  parameter's full tensor equals the one-process loaded one exactly (`torch.equal`: a rank that
  read another rank's rows, or a transposed row-parallel slice, cannot pass), and so does the
  loss. The fixtures are bf16 on disk with 300 rows (padded to 384 here) and uneven FSDP2
  shards (24 kv rows, 90 ffn rows), tied and untied.
- Our checkpoints: a one-step run (trainer, `model.init_from` = the HF dir) saved by one process
  loads into a tp=2 model; one saved at dp=2 zero=3 loads into one process; both exactly. A
  bit-flipped copy is refused (manifest hashes) in one process and on both of 2 ranks.
- A sliding-window Qwen2 (full, sliding, sliding; window 8 < data.seq_len 32): init_from at
  sp=2 -> one trainer step at lr 1e-12 -> export computes transformers' logits of the source
  (issue 20 §5; one process: tests/hf/test_init_from_window.py).
- Memory: loading a 7M-parameter model into 4 ranks at zero=3 adds far less anonymous memory
  per rank than the model's fp32 size (a loader reading whole tensors would not).
Each rank count is spawned once for all of its cases (process start dominates: ~10 s).
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist

from support.common import SMALL, cpu_dims, flip_byte, metrics_rows, small_config
from support.hf import export_round_trip, hf_logits, model_config, save_llama
from support.spawn import run_distributed
from ulysses_train.cli import compose as cli
from ulysses_train.config.errors import ConfigError
from ulysses_train.hf.init_from import load_initial_weights
from ulysses_train.model.init import canonical_name
from ulysses_train.parallel import ParallelDims
from ulysses_train.parallel.parallelize import build_model
from ulysses_train.train.trainer import Trainer
from ulysses_train.utils.rss import AnonPeak, rss_anon_bytes

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SEQ = 16
LAYOUTS_2 = {"tp2": {"tp": 2}, "sp2": {"sp": 2}, "dp2_zero0": {"zero": 0},
             "dp2_zero2": {"zero": 2}, "dp2_zero3": {"zero": 3}}
LAYOUTS_4 = {"tp2_dp2_zero3": {"tp": 2, "zero": 3}}
BIG = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
           intermediate_size=688, num_hidden_layers=4, vocab_size=8000)  # 7.0M parameters


def _config(hf_dir: str, parallel: dict | None = None, **train):
    cfg = small_config(parallel=parallel or {}, data={"seq_len": SEQ},
                       train={"steps": 1, **train}, checkpoint={"every": 0})
    cfg.model = model_config(hf_dir)
    return cfg


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, torch.arange(SEQ).expand(2, SEQ), labels


def _full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter's full (global) tensor on CPU; a collective for DTensors."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        out[canonical_name(name)] = full.detach().cpu().clone()
    return out


def _loss(model, dims, ids, positions, labels) -> float:
    """Loss sum of the whole batch: each sp rank its column slice, summed over sp (every dp
    rank sees the whole batch here)."""
    cols = SEQ // dims.sp
    part = slice(dims.local_rank("sp") * cols, (dims.local_rank("sp") + 1) * cols)
    with torch.no_grad():
        loss, _ = model(ids[:, part], positions[:, part], labels[:, part])
    loss = loss.detach().clone()
    if dims.sp > 1:
        dist.all_reduce(loss, group=dims.group("sp"))
    return float(loss)


def _dims(cfg, world: int, rank: int):
    if world == 1:
        return cpu_dims()
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    return dims


def _loaded(source: str, cfg, world: int = 1, rank: int = 0):
    dims = _dims(cfg, world, rank)
    model = build_model(cfg, dims)
    load_initial_weights(model, source, cfg.model, dims)
    return model, dims


def _layouts(rank, world, hf_dirs, layouts) -> dict:
    out = {}
    for hf_dir in hf_dirs:
        for name, parallel in layouts.items():
            cfg = _config(hf_dir, parallel)
            model, dims = _loaded(hf_dir, cfg, world, rank)
            out[hf_dir, name] = {"params": _full_params(model),
                                 "loss": _loss(model, dims, *_batch(cfg.model.vocab_size))}
    return out


def _train_one_step(hf_dir: str, run_dir: str, parallel: dict, world: int, rank: int):
    """A one-step trainer run from `model.init_from=hf_dir`: (full params after it, its loss)."""
    cfg = _config(hf_dir, parallel)
    cfg.model.init_from = hf_dir
    trainer = Trainer(cfg, run_dir, _dims(cfg, world, rank))
    trainer.fit()
    loss = metrics_rows(run_dir)[0]["loss"] if rank == 0 else None
    return _full_params(trainer.model), loss


def _sliding_sp2(source: str, run_dir: str, world: int, rank: int) -> float:
    """The sp=2 loss sum of the sliding-window HF dir `source` loaded as `model.init_from`
    composes it, on `_batch` (16 tokens, 2 windows); then a one-step trainer run at sp=2 from
    it at lr ~0 into `run_dir`."""
    args = [a for a in SMALL if not a.startswith(("model.", "data.seq_len"))]
    cfg = cli.precheck([*args, f"model.init_from={source}", "data.seq_len=32", "parallel.sp=2",
                        "train.steps=1", "optim.lr=1e-12",
                        f"data.cache_dir={os.path.join(run_dir, 'cache')}"], world)
    model, dims = _loaded(source, cfg, world, rank)
    loss = _loss(model, dims, *_batch(cfg.model.vocab_size))
    Trainer(cfg, run_dir, _dims(cfg, world, rank)).fit()
    return loss


def _rank2(rank, world, hf_dirs, hf_run, run_dir, flipped, sliding):
    out = {"layouts": _layouts(rank, world, hf_dirs, LAYOUTS_2)}
    cfg = _config(hf_dirs[0], {"tp": 2})  # our one-process checkpoint into tp=2
    out["ckpt_into_tp2"] = _full_params(_loaded(hf_run, cfg, world, rank)[0])
    out["zero3_run"] = _train_one_step(hf_dirs[0], run_dir, {"zero": 3}, world, rank)
    out["sliding_loss"] = _sliding_sp2(*sliding, world, rank)
    try:  # last: a rank that missed the verdict would wait in DCP's load for the other
        _loaded(flipped, cfg, world, rank)
        out["flipped"] = None
    except ConfigError as exc:
        out["flipped"] = str(exc)
    return out if rank == 0 else None


def _rank4(rank, world, hf_dirs, big_dir):
    cfg = _config(big_dir, {"zero": 3})  # first, in a fresh process: the memory measurement
    model = build_model(cfg, dims := _dims(cfg, world, rank))
    with AnonPeak() as peak:
        load_initial_weights(model, big_dir, cfg.model, dims)
    out = {"added": peak.added}
    if rank == 0:
        out["n_params"] = sum(p.numel() for p in model.parameters())
    del model
    out["layouts"] = _layouts(rank, world, hf_dirs, LAYOUTS_4)
    return out


@pytest.fixture(scope="module")
def hf_dirs(hf_untied, hf_tied):
    return hf_untied, hf_tied


@pytest.fixture(scope="module")
def references(hf_dirs):
    """{HF dir: (one-process loaded model, its full params, its loss)}."""
    out = {}
    for hf_dir in hf_dirs:
        model, dims = _loaded(hf_dir, _config(hf_dir))
        out[hf_dir] = (model, _full_params(model),
                       _loss(model, dims, *_batch(model_config(hf_dir).vocab_size)))
    return out


@pytest.fixture(scope="module")
def hf_run(hf_dirs, tmp_path_factory):
    """A one-process, one-step run from the untied HF dir: (run dir, params, first loss)."""
    run_dir = str(tmp_path_factory.mktemp("one_process_run"))
    params, loss = _train_one_step(hf_dirs[0], run_dir, {}, 1, 0)
    return run_dir, params, loss


@pytest.fixture(scope="module")
def flipped(hf_run, tmp_path_factory) -> str:
    """A copy of `hf_run`'s checkpoint with one byte of its shard file flipped (sizes intact)."""
    step = os.path.join(hf_run[0], "checkpoints", "step_00000001")
    copy = shutil.copytree(step, tmp_path_factory.mktemp("flipped") / "step_00000001")
    flip_byte(copy / "__0_0.distcp")
    return str(copy)


@pytest.fixture(scope="module")
def spawn2(hf_dirs, hf_run, flipped, hf_windowed, tmp_path_factory):
    """(rank 0's results, the zero=3 run dir, the sliding-window sp=2 run dir)."""
    run_dir = str(tmp_path_factory.mktemp("zero3_run"))
    sliding = str(tmp_path_factory.mktemp("sliding_sp2_run"))
    return run_distributed(_rank2, 2, hf_dirs, hf_run[0], run_dir, flipped,
                           (hf_windowed["qwen2-mwl"], sliding), timeout=240)[0], run_dir, sliding


@pytest.fixture(scope="module")
def spawn4(hf_dirs, tmp_path_factory):
    big = save_llama(str(tmp_path_factory.mktemp("hf_big")), tie=False, **BIG)
    # Freed buffers of 64 KiB and more go back to the kernel at once (glibc would otherwise
    # raise this threshold and keep them for reuse), so RssAnon follows live memory.
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        return run_distributed(_rank4, 4, hf_dirs, big, timeout=240)
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_") if saved is None else \
            os.environ.__setitem__("MALLOC_MMAP_THRESHOLD_", saved)


@pytest.mark.parametrize("which", [0, 1], ids=["untied", "tied"])
def test_one_process_equals_transformers(hf_dirs, references, which):
    hf_dir = hf_dirs[which]
    model, vocab = references[hf_dir][0], model_config(hf_dir).vocab_size
    ids, positions, _ = _batch(vocab)
    with torch.no_grad():
        ours = model(ids, positions)  # (B, S, 384)
    theirs = hf_logits(hf_dir, ids)  # (B, S, 300)
    assert ours.shape[-1] == 384 and theirs.shape[-1] == vocab == 300
    assert (ours[..., :vocab] - theirs).abs().max() <= 1e-5
    assert theirs.abs().max() > 1  # the comparison is not between near-zero logits
    assert torch.isneginf(ours[..., vocab:]).all()  # the padding takes no probability


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    wrong = [k for k, v in want.items() if not torch.equal(got[k], v)]
    assert not wrong, f"{what}: {wrong}"


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_loads_the_same_weights(references, spawn2, spawn4, world):
    results = spawn2[0]["layouts"] if world == 2 else spawn4[0]["layouts"]
    assert len(results) == 2 * len(LAYOUTS_2 if world == 2 else LAYOUTS_4)
    for (hf_dir, name), result in results.items():
        _, want, want_loss = references[hf_dir]
        _assert_same(result["params"], want, f"{os.path.basename(hf_dir)} {name}")
        assert result["loss"] == pytest.approx(want_loss, rel=1e-5), name


def test_our_checkpoints_load_across_layouts(hf_dirs, hf_run, spawn2):
    """Weights only, resharded both ways; the zero=3 trainer run from the HF dir also took the
    same first step as the one-process run."""
    run_dir, params, loss = hf_run
    _assert_same(spawn2[0]["ckpt_into_tp2"], params, "one process -> tp=2")
    zero3_params, zero3_loss = spawn2[0]["zero3_run"]
    model, _ = _loaded(spawn2[1], _config(hf_dirs[0]))  # a run dir: its checkpoints/latest
    _assert_same(_full_params(model), zero3_params, "dp=2 zero=3 -> one process")
    assert zero3_loss == pytest.approx(loss, rel=1e-5)


def test_a_bit_flipped_checkpoint_is_refused_on_every_rank(hf_dirs, hf_run, flipped, spawn2):
    """The manifest's hashes are verified before loading (DCP would load the flipped bytes).
    On 2 ranks rank 0 hashes only `.metadata` and `meta.json`: it learns of the flipped shard
    from rank 1's gathered verdict, and both stop."""
    with pytest.raises(ConfigError) as info:
        _loaded(flipped, _config(hf_dirs[0]))
    assert info.value.key == "model.init_from"
    want = (f"{flipped} is damaged: {flipped}/__0_0.distcp: content differs from the manifest's "
            "hash (corrupt); use another step_* dir")
    assert info.value.message == want
    assert spawn2[0]["flipped"] == f"model.init_from: {want}"
    cfg = _config(hf_dirs[0])
    line = load_initial_weights(build_model(cfg, cpu_dims()), hf_run[0], cfg.model, cpu_dims())
    assert "hashes verified" in line, line


@pytest.mark.skipif(rss_anon_bytes() is None, reason="needs Linux /proc/self/status RssAnon")
def test_load_memory_per_rank_is_a_fraction_of_the_model(spawn4):
    """Each of 4 zero=3 ranks owns a quarter of the fp32 weights, allocated before the load;
    the load adds only slices in flight (one bf16 slice at a time, the largest ~1 MB here),
    never the model. Measured: see docs/benchmarks.md."""
    fp32_bytes = spawn4[0]["n_params"] * 4  # 28 MB
    added = [r["added"] for r in spawn4]
    assert max(added) < fp32_bytes / 4, (added, fp32_bytes)


def test_sliding_window_qwen2_at_sp2_exports_transformers_logits(hf_windowed, spawn2, tmp_path):
    """Catches a window lost between the source, the sp=2 model and the export: the sp=2 loss
    or the exported logits at 32 tokens (4 windows) would differ from transformers' on the
    source."""
    import transformers

    ids, _, _ = _batch(300)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_windowed["qwen2-mwl"],
                                                           dtype=torch.float32)
    with torch.no_grad():
        want = hf.eval()(input_ids=ids, labels=ids).loss.item() * ids.shape[0] * (SEQ - 1)
    print(f"sliding Qwen2 at sp=2: loss sum {spawn2[0]['sliding_loss']:.6f}, transformers' "
          f"{want:.6f}")
    assert spawn2[0]["sliding_loss"] == pytest.approx(want, rel=1e-5)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(5))
    config = export_round_trip(spawn2[2], tmp_path / "out", ids, hf_windowed["qwen2-mwl"])
    assert (config["model_type"], config["sliding_window"], config["max_window_layers"]) == (
        "qwen2", 8, 1)
