"""Tensor parallelism equals one process: each sharded piece, the whole GPT (tied and untied),
tp composed with Ulysses sp, the vocab-parallel loss, the grad norm and an optimizer step.

Two spawns (2 and 4 ranks) run every sub-case and return plain tensors; the single-process
references are computed here, in the test process. Labels are ignored in uneven counts (and a
whole sp slice has far fewer valid labels than the other), so a mean of means would fail.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from support.spawn import CollectiveCounter, run_distributed
from support.tp import (
    BATCH,
    SEQ,
    VOCAB,
    Recorder,
    assert_close_tol,
    build_gpt,
    error_of,
    full_of,
    local_of,
    make_inputs,
    make_optimizer,
    model_config,
)
from ulysses_train.config.errors import ConfigError
from ulysses_train.model.attention import sdpa_attention
from ulysses_train.model.gpt import GPT, token_loss_sum
from ulysses_train.model.init import copy_full_
from ulysses_train.model.rope import rope_cos_sin
from ulysses_train.parallel import ParallelDims, UlyssesAttention
from ulysses_train.parallel.grad_norm import clip_grad_norm_, grad_norm
from ulysses_train.parallel.tensor import apply_tensor_parallel, vocab_parallel_loss_sum

OPTIMIZERS = ("default", "foreach", "fused")
# model.vocab_size 130, padded to 256 rows: at tp=2 rank 1's 128 columns hold 2 real ids, at
# tp=4 rank 2's 64 hold 2 and rank 3's none at all.
PADDED = 130


def _run_model(model, cfg, cols=slice(None), group=None) -> dict:
    """Token-weighted loss, gradients (summed over the dp_sp `group`), norm and optimizer steps."""
    ids, pos, labels = (t[:, cols] for t in make_inputs(cfg.model.vocab_size))
    with CollectiveCounter() as fwd:
        loss_sum, n_valid = model(ids, pos, labels)
    totals = torch.stack([loss_sum.detach().double(), n_valid.double()])
    if group is not None:
        dist.all_reduce(totals, group=group)
    with CollectiveCounter() as bwd:
        (loss_sum / totals[1].float()).backward()
    if group is not None:  # sp ranks saw different tokens: sum every gradient's local shard
        for p in model.parameters():
            dist.all_reduce(local_of(p.grad), group=group)
    out = {"loss": totals[0].item(), "count": int(totals[1]), "counts": (fwd.total, bwd.total),
           "norm": float(grad_norm(model.parameters())),
           "grads": {n: full_of(p.grad) for n, p in model.named_parameters()}}
    # One AdamW step per implementation. Gradient := weight, so the step is a bit-exact function
    # of the (bit-exact) init: Adam's first step, ~lr * sign(g), would turn 1e-9 rounding
    # differences of near-zero gradients into visible weight differences.
    snapshot = [local_of(p).detach().clone() for p in model.parameters()]
    for kind in OPTIMIZERS:
        for p, w in zip(model.parameters(), snapshot):
            local_of(p).detach().copy_(w)
            local_of(p.grad).copy_(w)
        make_optimizer(model, cfg, kind).step()
        out[kind] = {n: full_of(p) for n, p in model.named_parameters()}
    return out


def _tp_model_case(tp_mesh, cfg) -> dict:
    recorder = Recorder(sdpa_attention)
    model = build_gpt(cfg, tp_mesh, recorder)
    ids, pos, _ = make_inputs(cfg.model.vocab_size)
    logits = model(ids, pos)
    out = {"init": {n: full_of(p) for n, p in model.named_parameters()},
           "logits": (type(logits).__name__, tuple(logits.placements), tuple(local_of(logits).shape)),
           "logits_full": full_of(logits), "attention_inputs": recorder.seen}
    out.update(_run_model(model, cfg))
    emb = model.tok_embeddings.weight
    out["grad_placements_ok"] = all(p.grad.placements == p.placements
                                    for p in model.parameters() if hasattr(p, "placements"))
    out["emb_grad_bytes"] = emb.grad.to_local().untyped_storage().nbytes()
    return out


def _pieces(tp_mesh) -> dict:
    """Embedding, attention, SwiGLU and loss of a TP GPT vs the dense GPT (same init): pairs."""
    cfg = model_config()
    model, ref = build_gpt(cfg, tp_mesh), build_gpt(cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, SEQ, cfg.model.d_model, generator=g)
    ids, pos, labels = make_inputs()
    cos, sin = rope_cos_sin(pos, ref.inv_freq)
    pairs = {}
    for name, call in {"attention": lambda m, x: m.layers[0].attention(x, cos, sin),
                       "feed_forward": lambda m, x: m.layers[0].feed_forward(x),
                       "tok_embeddings": lambda m, x: m.tok_embeddings(ids)}.items():
        outs = []
        for m in (model, ref):
            xi = x.clone().requires_grad_()
            y = call(m, xi)
            (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
            grads = {n: full_of(p.grad) for n, p in m.named_parameters() if p.grad is not None}
            outs.append((full_of(y), xi.grad, grads))
        pairs[name] = outs
    # The loss alone, on (B, S, V) logits sharded on V; and with no valid label at all.
    z = torch.randn(BATCH, SEQ, VOCAB, generator=g) * 3
    # Wide range: each token's largest logits (+100) lie in one vocab half, alternating between
    # the tp ranks. exp(100) overflows fp32, so a loss without the max shift gives inf, and one
    # with a per-rank (not all-reduced) max is off by ~100 nats on tokens whose target is on the
    # other rank.
    wide = z.clone()
    token = torch.arange(BATCH * SEQ).reshape(BATCH, SEQ)
    wide[..., :VOCAB // 2] += torch.where(token % 2 == 0, 100.0, 0.0)[..., None]
    wide[..., VOCAB // 2:] += torch.where(token % 2 == 1, 100.0, 0.0)[..., None]
    cases = {"loss": (z, labels), "loss_all_ignored": (z, torch.full_like(labels, -100)),
             "loss_wide_range": (wide, labels)}
    for case, (full_z, lab) in cases.items():
        outs = []
        sharded = distribute_tensor(full_z, tp_mesh, [Shard(-1)])  # (B, S, V) -> local (B, S, V/tp)
        for loss_fn, logits in ((vocab_parallel_loss_sum, sharded), (token_loss_sum, full_z.clone())):
            logits.requires_grad_()
            loss_sum, count = loss_fn(logits, lab)
            (loss_sum * 0.5).backward()
            outs.append((loss_sum.detach(), count, full_of(logits.grad), type(loss_sum).__name__))
        pairs[case] = outs
    # The single-device loss refuses sharded logits instead of all-gathering them.
    pairs["refused"] = error_of(lambda: token_loss_sum(sharded, labels), TypeError)
    return pairs


def _qkv_bias_case(tp_mesh=None) -> dict:
    """Logits and gradients of a GPT with q/k/v biases (Qwen2) set to distinct non-zero values,
    so a bias sharded differently from its weight's output rows would change the logits."""
    model = build_gpt(model_config(qkv_bias=True), tp_mesh)
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    for i, (_, p) in enumerate(sorted(biases.items())):
        copy_full_(p, torch.linspace(-1.0, 1.0, p.shape[0]) * (i + 1) / len(biases))
    ids, pos, labels = make_inputs()
    loss_sum, n_valid = model(ids, pos, labels)
    (loss_sum / n_valid).backward()
    return {"logits": full_of(model(ids, pos)), "placements": {
                n: str(getattr(p, "placements", None)) for n, p in biases.items()},
            "grads": {n: full_of(p.grad) for n, p in model.named_parameters()}}


def _two_ranks(rank, world) -> dict:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    out = {"pieces": _pieces(mesh),
           "untied": _tp_model_case(mesh, model_config()),
           "tied": _tp_model_case(mesh, model_config(tie_embeddings=True)),
           "padded": _tp_model_case(mesh, model_config(vocab_size=PADDED)),
           "qkv_bias": _qkv_bias_case(mesh)}
    with torch.device("meta"):  # the divisibility check runs before any sharding
        bad = GPT(model_config(n_kv_heads=1).model)
    out["bad"] = error_of(lambda: apply_tensor_parallel(bad, mesh), ConfigError)
    # Size-1 tp mesh: exactly the single-device model (plain tensors, no collectives).
    size1 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))["tp"]
    model = build_gpt(model_config(), size1)
    ids, pos, labels = make_inputs()
    out["size1"] = (any(hasattr(p, "placements") for p in model.parameters()),
                    model(ids, pos, labels)[0].detach())
    return out


def _fsdp_norms(dims, cols) -> tuple[float, float]:
    """(norm, norm after clipping to 0.5) of TP + FSDP2 gradients over dp_sp: DTensors on the 2-D
    (dp_sp, tp) mesh (some `_StridedShard`) next to norms on the 1-D dp_sp mesh, a mix that
    torch.nn.utils.clip_grad_norm_ refuses."""
    model = build_gpt(model_config(), dims.meshes["tp"], UlyssesAttention(sdpa_attention, dims.group("sp")),
                   zero3_dims=dims)
    ids, pos, labels = (t[:, cols] for t in make_inputs())
    loss_sum, n_valid = model(ids, pos, labels)
    dist.all_reduce(n_valid, group=dims.group("dp_sp"))
    (loss_sum / n_valid).backward()  # FSDP2 sums the gradients over dp_sp
    before = clip_grad_norm_(model.parameters(), 0.5)
    return float(before), float(grad_norm(model.parameters()))


def _four_ranks(rank, world) -> dict:
    dims = ParallelDims(tp=2, sp=2, dp=1, world_size=world, rank=rank, device=torch.device("cpu"))
    dims.build_mesh()
    recorder = Recorder(UlyssesAttention(sdpa_attention, dims.group("sp")))
    cfg = model_config()
    model = build_gpt(cfg, dims.meshes["tp"], recorder)
    per_sp = SEQ // dims.sp
    cols = slice(dims.local_rank("sp") * per_sp, (dims.local_rank("sp") + 1) * per_sp)
    tp4 = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    return {"tp2_sp2": _run_model(model, cfg, cols, dims.group("dp_sp")),
            "tp2_sp2_attention_inputs": recorder.seen,
            "tp2_sp2_fsdp_norms": _fsdp_norms(dims, cols),
            "tp4": _tp_model_case(tp4, model_config(n_kv_heads=4)),
            "tp4_padded": _tp_model_case(tp4, model_config(n_kv_heads=4, vocab_size=PADDED))}


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_two_ranks, 2, timeout=120)


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(_four_ranks, 4, timeout=180)


@functools.lru_cache(maxsize=None)
def _reference(tie=False, n_kv_heads=2, vocab=VOCAB) -> dict:
    cfg = model_config(tie_embeddings=tie, n_kv_heads=n_kv_heads, vocab_size=vocab)
    model = build_gpt(cfg)
    ids, pos, _ = make_inputs(vocab)
    out = {"init": {n: full_of(p) for n, p in model.named_parameters()},
           "logits_full": model(ids, pos).detach()}
    out.update(_run_model(model, cfg))
    out["torch_norm"] = float(torch.nn.utils.get_total_norm(list(out["grads"].values())))
    return out


def _assert_matches_reference(got: dict, ref: dict, init=True) -> None:
    assert got["count"] == ref["count"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["norm"] == pytest.approx(ref["torch_norm"], rel=1e-5)
    assert ref["norm"] == pytest.approx(ref["torch_norm"], rel=1e-6)  # grad_norm on plain tensors
    for name, expected in ref["grads"].items():
        assert_close_tol(got["grads"][name], expected, name)
    for kind in OPTIMIZERS:
        for name, expected in ref[kind].items():
            assert_close_tol(got[kind][name], expected, f"{kind} {name}")
    if init:  # layout-independent init: bit-exact, not approximately
        assert got["init"].keys() == ref["init"].keys()
        for name, expected in ref["init"].items():
            assert torch.equal(got["init"][name], expected), name


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tp2_model_equals_one_process(two_ranks, tie):
    ref = _reference(tie=tie)
    for rank_out in two_ranks:
        got = rank_out["tied" if tie else "untied"]
        _assert_matches_reference(got, ref)
        assert_close_tol(got["logits_full"], ref["logits_full"], "logits")
        assert got["counts"] == (7, 5)  # fwd: emb + 2/layer + 2 loss; bwd: 2/layer + head input
        # Gradients keep their parameter's layout; the vocab-parallel embedding's gradient is
        # this rank's rows, not a full (V, d) copy.
        assert got["grad_placements_ok"]
        assert got["emb_grad_bytes"] == VOCAB // 2 * 64 * 4


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_loss_leaves_out_the_padded_vocab(two_ranks, four_ranks, tp):
    """The vocab-parallel loss over a padded vocabulary (PADDED) equals one process's, which is
    the cross-entropy over the real columns alone: the padding logits are -inf on whichever
    rank holds them, and the padded head rows get an exact zero gradient in both."""
    ref = _reference(n_kv_heads=4 if tp == 4 else 2, vocab=PADDED)
    _, _, labels = make_inputs(PADDED)
    real = ref["logits_full"][..., :PADDED].reshape(-1, PADDED)  # (B*S, 130)
    want = torch.nn.functional.cross_entropy(real, labels.reshape(-1), reduction="sum")
    assert ref["loss"] == pytest.approx(float(want), rel=1e-6)
    assert torch.isneginf(ref["logits_full"][..., PADDED:]).all()
    assert not ref["grads"]["output.weight"][PADDED:].any()
    for rank_out in two_ranks if tp == 2 else four_ranks:
        got = rank_out["padded" if tp == 2 else "tp4_padded"]
        _assert_matches_reference(got, ref)
        assert torch.equal(got["logits_full"].isneginf(), ref["logits_full"].isneginf())
        assert_close_tol(got["logits_full"][..., :PADDED], ref["logits_full"][..., :PADDED])
        assert not got["grads"]["output.weight"][PADDED:].any()


def test_tp2_shards_qkv_biases_with_their_weights(two_ranks):
    ref = _qkv_bias_case()
    assert len(ref["placements"]) == 3 * 2  # wq, wk, wv per layer
    for rank_out in two_ranks:
        got = rank_out["qkv_bias"]
        assert set(got["placements"].values()) == {"(Shard(dim=0),)"}
        assert_close_tol(got["logits"], ref["logits"], "logits")
        assert got["grads"].keys() == ref["grads"].keys()
        for name, expected in ref["grads"].items():
            assert_close_tol(got["grads"][name], expected, name)


def test_tp_logits_stay_vocab_sharded(two_ranks, four_ranks):
    for results, tp in ((two_ranks, 2), (four_ranks, 4)):
        for rank_out in results:
            got = rank_out["tp4" if tp == 4 else "untied"]
            name, placements, local_shape = got["logits"]
            assert name == "DTensor" and str(placements) == "(Shard(dim=2),)"
            assert local_shape == (BATCH, SEQ, VOCAB // tp)  # never the full vocab on a rank
    assert two_ranks[0]["tied"]["logits"][2] == (BATCH, SEQ, VOCAB // 2)


def test_tp_attention_kernel_sees_local_heads(two_ranks, four_ranks):
    head_dim = 16  # 64 / 4 heads
    assert two_ranks[0]["untied"]["attention_inputs"] == {
        ("Tensor", (BATCH, SEQ, 2, head_dim), (BATCH, SEQ, 1, head_dim))}
    # tp=2 then sp=2: the Ulysses wrapper gets (B, S/sp, H/tp, D) plain tensors.
    assert four_ranks[0]["tp2_sp2_attention_inputs"] == {
        ("Tensor", (BATCH, SEQ // 2, 2, head_dim), (BATCH, SEQ // 2, 1, head_dim))}


@pytest.mark.parametrize("piece", ["attention", "feed_forward", "tok_embeddings"])
def test_tp_piece_equals_dense(two_ranks, piece):
    for rank_out in two_ranks:
        (y, dx, grads), (y_ref, dx_ref, grads_ref) = rank_out["pieces"][piece]
        assert_close_tol(y, y_ref, "output")
        if dx_ref is not None:  # the embedding's input is integer ids
            assert_close_tol(dx, dx_ref, "input grad")
        assert grads.keys() == grads_ref.keys() and grads
        for name in grads_ref:
            assert_close_tol(grads[name], grads_ref[name], name)


@pytest.mark.parametrize("case", ["loss", "loss_all_ignored", "loss_wide_range"])
def test_vocab_parallel_loss_equals_dense(two_ranks, case):
    """The sharded loss and its logits gradient equal the dense ones. Catches: no max
    all-reduce (wide range: a per-rank max is ~100 nats off, no shift overflows to inf), sums
    not all-reduced, the target picked on the wrong rank, ignored labels counted."""
    for rank_out in two_ranks:
        (loss, count, grad, kind), (loss_ref, count_ref, grad_ref, _) = rank_out["pieces"][case]
        assert kind == "Tensor"  # a plain tensor: the trainer divides and all-reduces it as before
        assert int(count) == int(count_ref)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_close_tol(loss, loss_ref, "loss sum")
        assert_close_tol(grad, grad_ref, "logits grad")
        if case == "loss_all_ignored":
            assert float(loss) == 0.0 and not grad.any()
        assert "model.loss_fn" in rank_out["pieces"]["refused"]


@pytest.mark.parametrize("case", ["tp2_sp2", "tp4"])
def test_four_rank_model_equals_one_process(four_ranks, case):
    """tp=2 x Ulysses sp=2 (kv heads replicated over sp after the tp split), and tp=4."""
    ref = _reference(n_kv_heads=4 if case == "tp4" else 2)
    for rank_out in four_ranks:
        _assert_matches_reference(rank_out[case], ref, init=case == "tp4")


def test_grad_norm_and_clip_over_tp_and_fsdp_meshes(four_ranks):
    ref = _reference()
    for rank_out in four_ranks:
        norm, clipped = rank_out["tp2_sp2_fsdp_norms"]
        assert norm == pytest.approx(ref["torch_norm"], rel=1e-5)
        assert ref["torch_norm"] > 0.5 and clipped == pytest.approx(0.5, rel=1e-5)


def test_tp_size1_is_the_dense_model_and_bad_configs_fail_first(two_ranks):
    ids, pos, labels = make_inputs()
    ref_loss = build_gpt(model_config())(ids, pos, labels)[0].detach()
    for rank_out in two_ranks:
        has_dtensor, loss = rank_out["size1"]
        assert not has_dtensor and torch.equal(loss, ref_loss)
        assert rank_out["bad"].startswith("model.n_kv_heads: 1 kv heads")


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_matches_torch_on_plain_tensors(norm_type):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=g) for _ in range(3)]
    ours, theirs = ([torch.nn.Parameter(torch.zeros(5, 3)) for _ in grads] for _ in range(2))
    for p, q, grad in zip(ours, theirs, grads):
        p.grad, q.grad = grad.clone(), grad.clone()
    assert_close_tol(clip_grad_norm_(ours, 0.5, norm_type),  # ours is float64: accumulated in float64
           torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type).double(), "norm")
    for p, q in zip(ours, theirs):
        assert_close_tol(p.grad, q.grad, "clipped grad")
