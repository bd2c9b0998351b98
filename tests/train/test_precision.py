"""One mixed-precision policy in every layout (model/precision.py, docs/parallelism.md "Mixed precision").

`train.precision=bf16` on CPU (autocast supports bf16 there): the dtypes seen at the block
boundaries of a real training run must *equal the policy's*, for zero=0 (one process), ZeRO-3
with sp=2 and tp=2 (two ranks) — agreeing with each other would not be enough, an all-fp32 run
agrees too. Bug caught: FSDP2's default `cast_forward_inputs=True` turned the fp32 RoPE cos/sin
into bf16 under ZeRO only, and zero=0 kept a fp32 residual stream while ZeRO's was bf16.

Weight casts: without FSDP2 (one rank, DDP, tp at zero=0) each weight is cast to bf16 once per
step (model/precision.py WeightCasts), not at every use (autocast recast every weight per
micro-batch and again in every recompute), with the same arithmetic bit for bit.
"""
from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist

from support.casts import CastCounter, count_casts
from support.common import cpu_dims, metrics_rows, small_config
from support.spawn import run_distributed
from ulysses_train.parallel import ParallelDims
from ulysses_train.train.trainer import Trainer

STEPS = 8
BF16, FP32 = torch.bfloat16, torch.float32
# The policy, as the dtypes a bf16 run must show (sets: every call of a hook must agree).
POLICY = {"block input": {BF16}, "block output": {BF16}, "cos": {FP32}, "sin": {FP32},
          "q": {BF16}, "k": {BF16}, "v": {BF16}, "loss": {FP32},
          "parameters": {FP32}, "gradients": {FP32}, "optimizer state": {FP32}}
# 2 ranks each: parallel keys, and train keys (DDP: 2 checkpointed micro-batches per rank)
LAYOUTS = {"sp2-zero3": ({"sp": 2, "zero": 3}, {}), "tp2": ({"tp": 2}, {}),
           "dp2-ddp": ({"dp": 2}, {"activation_checkpointing": "full", "micro_batch_size": 1})}
COUNTED_STEPS = (2, 3)  # the steps whose weight casts are counted (any would do)


def _config(parallel: dict, train: dict | None = None):
    return small_config(parallel=parallel, data={"seq_len": 64}, checkpoint={"every": 0},
                        train={"steps": STEPS, "precision": "bf16", **(train or {})})


class _Recorder:
    """Records the dtype of what crosses every block boundary, and of q/k/v and the loss."""

    def __init__(self, model):
        self.seen: dict[str, set] = defaultdict(set)
        for block in model.layers:
            block.register_forward_pre_hook(self._block_in, with_kwargs=True)
            block.register_forward_hook(self._block_out)
            block.attention.attention_fn = self._wrap(block.attention.attention_fn)
        loss_fn = model.loss_fn

        def loss(*args):
            out = loss_fn(*args)
            self.seen["loss"].add(out[0].dtype)
            return out
        model.loss_fn = loss

    def _block_in(self, module, args, kwargs):  # after FSDP2's own pre-hook: what the block gets
        x, cos, sin = args
        for name, t in (("block input", x), ("cos", cos), ("sin", sin)):
            self.seen[name].add(t.dtype)

    def _block_out(self, module, args, output):
        self.seen["block output"].add(output.dtype)

    def _wrap(self, attention_fn):
        recorder = self

        class Recorded(torch.nn.Module):  # a module: UlyssesAttention is one, a slot for modules
            def __init__(self):
                super().__init__()
                self.inner = attention_fn

            def forward(self, q, k, v, **kwargs):
                for name, t in (("q", q), ("k", k), ("v", v)):
                    recorder.seen[name].add(t.dtype)
                return self.inner(q, k, v, **kwargs)
        return Recorded()

    def state(self, trainer) -> dict[str, set]:
        """What the run kept: parameters, gradients (of the last step) and optimizer state."""
        params = list(trainer.model.parameters())
        self.seen["parameters"] = {p.dtype for p in params}
        self.seen["gradients"] = {p.grad.dtype for p in params if p.grad is not None}
        self.seen["optimizer state"] = {t.dtype for s in trainer.optimizer.state.values()
                                        for t in s.values() if t.is_floating_point() and t.dim()}
        return dict(self.seen)


def _train(cfg, dims, run_dir):
    trainer = Trainer(cfg, run_dir, dims)
    recorder = _Recorder(trainer.model)
    counts = count_casts(trainer, COUNTED_STEPS)
    trainer.fit()
    return recorder.state(trainer), metrics_rows(run_dir) if dims.is_main else None, counts


class _ReduceDtypes:
    """Records the dtypes FSDP2 reduce-scatters gradients in (whichever c10d entry it calls)."""

    NAMES = ("reduce_scatter_single", "reduce_scatter_tensor")

    def __init__(self):
        self.dtypes, self._saved = set(), {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is not None:
                self._saved[name] = original
                setattr(dist, name, self._recording(original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def _recording(self, op):
        def recorded(*args, **kwargs):
            tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
            self.dtypes.add(tensor.dtype)
            return op(*args, **kwargs)
        return recorded


def _layouts_rank(rank, world, run_dir):
    out = {}
    for name, (parallel, train) in LAYOUTS.items():
        cfg = _config(parallel, train)
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        dims.build_mesh()
        with _ReduceDtypes() as reduced:
            seen, rows, counts = _train(cfg, dims, os.path.join(run_dir, name))
        out[name] = (seen, rows, reduced.dtypes, counts)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    results = run_distributed(_layouts_rank, 2, str(root), timeout=180)
    zero0 = _train(_config({}), cpu_dims(), str(root / "zero0"))
    return {"zero0": zero0[:2], **{name: results[0][name][:2] for name in LAYOUTS},
            "reduced": {name: [r[name][2] for r in results] for name in LAYOUTS},
            "casts": {"zero0": [zero0[2]], **{name: [r[name][3] for r in results]
                                              for name in LAYOUTS}}}


@pytest.mark.parametrize("layout", ["zero0", *LAYOUTS])
def test_dtypes_equal_the_policy(runs, layout):
    seen, _ = runs[layout]
    wrong = {name: (seen.get(name), want) for name, want in POLICY.items() if seen.get(name) != want}
    assert not wrong, f"{layout}: (seen, policy) {wrong}"
    assert seen.keys() == POLICY.keys()


def test_zero3_reduces_gradients_in_fp32(runs):
    for dtypes in runs["reduced"]["sp2-zero3"]:  # each rank's reduce-scatters
        assert dtypes == {FP32}


# Loss-curve tolerance, from bf16's 8-bit significand (unit roundoff u = 2^-8 ~ 3.9e-3):
# - a layout moves only *where* some roundings happen: tp rounds the partial sums of the
#   embedding, wo and w2 to bf16 before adding them, ZeRO/sp add fp32 gradients in another
#   order. Along one token's path that is k = 2 * n_layers + 1 = 5 values, each off by at most
#   one rounding, a relative u, with random sign (round-to-nearest of unrelated values);
# - a token's cross-entropy moves relatively by at most as much as its logits (its elasticity
#   |E_p[z] - z_y| / CE is < 1 here: logits are O(0.1) at init std 0.02, CE ~ ln 256), so by
#   <= k * u, and the N = 4 x 64 tokens of a step average these independent errors: k * u / sqrt(N);
# - AdamW normalises each update, so a gradient that differs by a rounding moves the weights
#   by a rounding of lr, not more; over the 8 steps we allow a factor 2.
N_TOKENS, N_ROUNDINGS, U = 4 * 64, 2 * 2 + 1, 2.0 ** -8
LOSS_RTOL = 2 * N_ROUNDINGS * U / N_TOKENS ** 0.5  # = 2.4e-3
# Measured (2-core CPU, torch 2.13): sp2-zero3 <= 1.9e-5, tp2 <= 2.4e-5 of the zero=0 curve over
# 8 steps. At these tiny shapes a fp32 run is as close (<= 1.9e-5): the curve cannot tell the
# precisions apart, which is why the dtypes are asserted directly above.


def test_bf16_curves_agree(runs):
    ref = runs["zero0"][1]
    for name in LAYOUTS:
        got = runs[name][1]
        assert [r["step"] for r in got] == list(range(1, STEPS + 1))
        for a, b in zip(ref, got):
            assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), (name, a["step"])


def test_recomputes_run_under_the_forward_autocast_state():
    """Backward recomputes (tiled MLP, tiled loss, full checkpointing) compute in bf16 like
    their forward. Bug caught: the tiled MLP's backward ran outside autocast, i.e. fp32 matmuls,
    a different function from the one whose gradient it claims to be."""
    from ulysses_train.parallel.parallelize import build_model

    cfg = small_config(train={"activation_checkpointing": "full", "mlp_chunk": 8,
                              "loss_chunk": 8})
    model = build_model(cfg, cpu_dims())
    seen = defaultdict(list)  # what -> dtypes, one per call (forward, then recompute)
    for block in model.layers:
        block.feed_forward.register_forward_hook(
            lambda m, args, out: seen["mlp"].append(out.dtype))
    loss_fn = model.loss_fn
    model.loss_fn = lambda logits, labels: seen["logits"].append(logits.dtype) or loss_fn(
        logits, labels)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=BF16):
        loss_sum, n_valid = model(ids, torch.arange(32).expand(2, 32), ids)
    n_forward = {what: len(dtypes) for what, dtypes in seen.items()}
    (loss_sum / n_valid).backward()
    # 2 layers x 4 MLP tiles, recomputed by the block checkpoint and by the tiled MLP's backward;
    # 4 loss tiles, recomputed once.
    assert n_forward == {"mlp": 8, "logits": 4}
    assert len(seen["mlp"]) > 2 * n_forward["mlp"] and len(seen["logits"]) == 8
    assert set(seen["mlp"]) == {BF16} and set(seen["logits"]) == {BF16}


def test_bf16_rmsnorm_is_torchs_fp32_norm_rounded_once_and_keeps_no_fp32_copy():
    """The bf16 RMSNorm equals torch's fp32 `rms_norm` of the same bf16 values rounded once,
    its gradients the fp32 ones to within one bf16 rounding (2^-8 relative to the largest), and
    what it keeps for backward is x itself, not a fp32 (..., d) copy (torch's CPU composite
    keeps three)."""
    import torch.nn.functional as F

    from ulysses_train.model.norm import RMSNorm

    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(1)))
    x = (3 * torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2))).to(BF16)
    x.requires_grad_(True)
    kept = []
    with torch.autocast("cpu", dtype=BF16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: kept.append(t) or t, lambda t: t):
        y = norm(x)
    w16 = norm.weight.detach().to(BF16).float()
    xf = x.detach().float().requires_grad_(True)
    ref = F.rms_norm(xf, (64,), w16.requires_grad_(True), 1e-5)
    assert y.dtype == BF16 and torch.equal(y, ref.to(BF16))
    assert not [t for t in kept if t.dtype == FP32 and t.shape == x.shape]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(g.to(BF16))
    ref.backward(g.to(BF16).float())
    for got, want in ((x.grad, xf.grad), (norm.weight.grad, w16.grad)):
        assert (got.float() - want).abs().max() <= 2.0 ** -8 * want.abs().max()


def _cast_once_names(cfg=None, table: bool = False) -> set[str]:
    """The parameters of `cfg`'s model (default: the layouts') that autocast casts: every
    weight but the embedding table, which is looked up in fp32 unless `table` (a tied head
    reads it, or FSDP2 gathers it)."""
    from ulysses_train.parallel.parallelize import build_model

    cfg = cfg or _config({})
    names = {name for name, _ in build_model(cfg, cpu_dims()).named_parameters()}
    return names if table or cfg.model.tie_embeddings else names - {"tok_embeddings.weight"}


@pytest.mark.parametrize("layout", ["zero0", "tp2", "dp2-ddp"])
def test_each_weight_is_cast_once_per_step(runs, layout):
    """Without FSDP2 every weight is cast to bf16 once per step: not per micro-batch (dp2-ddp
    has 2 per rank), not again in activation checkpointing's recompute (dp2-ddp). Bug caught:
    autocast's cast at every use — 2 casts per weight per step here, 4 with checkpointing."""
    want = _cast_once_names()
    for rank_counts in runs["casts"][layout]:
        assert len(rank_counts) == len(COUNTED_STEPS)
        for per_param, ops in rank_counts:
            assert set(per_param) == want and ops == {"aten._to_copy.default"}, layout
            assert max(per_param.values()) == 1, (layout, per_param.most_common(3))


def test_zero3_casts_only_in_fsdp2_gathers(runs):
    """ZeRO-3: FSDP2 casts each fp32 shard into its bf16 all-gather buffer, once per gather
    (forward and backward re-gather: at most 2 per micro-batch), and autocast casts nothing on
    top (no `_to_copy` of a parameter). What ZeRO-3 trades for memory: re-gathering, and with
    it re-casting 1/N of each weight."""
    t = _config(*LAYOUTS["sp2-zero3"]).train
    n_micro = t.global_batch_size // t.micro_batch_size  # dp = 1: sp ranks share the rows
    for rank_counts in runs["casts"]["sp2-zero3"]:
        for per_param, ops in rank_counts:
            assert ops and ops <= set(CastCounter.COPIES), ops
            assert set(per_param) == _cast_once_names(table=True)  # FSDP2 gathers it too
            assert max(per_param.values()) <= 2 * n_micro, per_param.most_common(3)


def _fit(cfg, run_dir, per_use: bool):
    trainer = Trainer(cfg, run_dir, cpu_dims())
    if per_use:  # today's path before WeightCasts: autocast casts at every use
        trainer.model.weight_casts.remove()
    counts = count_casts(trainer, steps=(2,))
    trainer.fit()
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return metrics_rows(run_dir), weights, counts[0][0]


@pytest.mark.parametrize("train, model", [
    ({"activation_checkpointing": "full", "mlp_chunk": 8, "loss_chunk": 8}, {}),
    ({"loss_chunk": 8}, {"tie_embeddings": True})], ids=["checkpointed-tiled", "tied-head"])
def test_cached_casts_keep_autocasts_arithmetic(tmp_path, train, model):
    """One process, 2 micro-batches a step: with WeightCasts the bf16 loss curve and the final
    weights equal, bit for bit, those of autocast casting at every use (same rounding, same
    autograd graph: a forward's uses of a weight share one upcast, the tiled MLP's recomputed
    chunks and the tiled loss's chunks as before), while each weight is cast once per step
    instead of once per micro-batch and recompute."""
    cfg = small_config(checkpoint={"every": 0}, train={"steps": 3, "precision": "bf16", **train})
    for key, value in model.items():
        setattr(cfg.model, key, value)
    rows, weights, casts = _fit(cfg, str(tmp_path / "cached"), per_use=False)
    ref_rows, ref_weights, ref_casts = _fit(cfg, str(tmp_path / "per_use"), per_use=True)
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in ref_rows]
    assert all(torch.equal(weights[name], ref_weights[name]) for name in ref_weights)
    assert set(casts) == set(ref_casts) == _cast_once_names(cfg)
    assert max(casts.values()) == 1 and min(ref_casts.values()) >= 2, (casts, ref_casts)
