"""The planner's model of parallel.ulysses_chunks = G (issue 22): memory, time, search, auto.

Memory: the backward's Ulysses working set at G head groups (plan/activations.py
head_groups_saving); its check against the pipelined layer measured with MemTracker, and the
trainer-level row "sp=4 ulysses_chunks=4", share test_plan.py's 4-rank spawn. Time:
plan/timing.py pipelined_exposed.
"""
import dataclasses
from types import SimpleNamespace

import pytest

from support.common import small_config
from ulysses_train.config.parallel import valid_ulysses_chunks
from ulysses_train.config.validate import validate
from ulysses_train.plan import activations as act
from ulysses_train.plan.memory import predict
from ulysses_train.plan.search import Layout, choose, search
from ulysses_train.plan.shapes import shapes_of
from ulysses_train.plan.timing import Links, pipelined_exposed, step_time

LINKS = Links(gpus_per_node=8, intra_gbps=7200.0, inter_gbps=400.0)
# attention-heavy: Hq D = 4 d, a small MLP, so the attention term is the block's backward peak
HEAVY = {"n_layers": 2, "d_model": 128, "n_heads": 16, "n_kv_heads": 16, "head_dim": 32,
         "ffn_hidden": 128, "vocab_size": 256}


def _config(chunks: int, sp: int = 4, ring: int = 1, **train):
    return small_config(model=HEAVY, data={"seq_len": 4096},
                        parallel={"sp": sp, "ring": ring, "ulysses_chunks": chunks},
                        train={"micro_batch_size": 1, "global_batch_size": 1, "loss_chunk": 0,
                               **train})


def _todays_ulysses_seconds(sh) -> float:
    """docs/planner.md's G = 1 formula: q/k/v out and the output back, per layer and pass."""
    per_layer = sh.T * (2 * sh.hq + 2 * sh.kv_attn) * sh.D * sh.act_bytes * (sh.U - 1) / sh.U
    passes = 3 if sh.ac == "full" else 2
    return per_layer * sh.L * passes * sh.accum / LINKS.bytes_per_s(sh.tp * sh.U)


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
@pytest.mark.parametrize("sp,ring", [(4, 1), (4, 2)])
def test_g1_is_todays_model(ac, sp, ring):
    """At G = 1 the time is the closed G = 1 formula and the pipeline's memory terms are zero
    (so every term is today's): what G > 1 changes never leaks into G = 1."""
    cfg = _config(1, sp, ring, activation_checkpointing=ac)
    sh = shapes_of(cfg, sp)
    comm = step_time(cfg, sh, sp, 360.0, LINKS).comm
    assert comm["ulysses all-to-all"] == (_todays_ulysses_seconds(sh), "exposed")
    assert "ulysses all-to-all hidden" not in comm
    assert act.head_groups_saving(sh) == 0 and act.head_groups_relief(sh, 0) == 0
    piped = dataclasses.replace(sh, chunks=max(valid_ulysses_chunks(sh.hq, sh.hkv, sh.U)))
    assert act.head_groups_saving(piped) != 0 or ring > 1  # (not measured under a ring)


def test_g4_lowers_the_backward_peak_by_the_modelled_saving():
    one, four = (shapes_of(_config(g), 4, "cpu") for g in (1, 4))
    low, high = predict(four, "cpu"), predict(one, "cpu")
    assert high.phase.startswith("backward, block")  # where the attention's working set is
    q = four.T * four.hq * four.D * four.act_bytes
    saving = act.head_groups_saving(four)  # split kv: X + Q - max((2X + 3Q)/G, X - Q + Q/G)
    assert saving == pytest.approx(1.75 * q)
    assert high.total - low.total == saving  # the MLP is far below: all of it counts


def test_exposed_ulysses_time_falls_with_g_and_the_bytes_do_not_change():
    cfg1 = _config(1)
    gs = valid_ulysses_chunks(16, 16, 4)
    comms = [step_time(_config(g), shapes_of(_config(g), 4), 4, 360.0, LINKS).comm for g in gs]
    exposed = [c["ulysses all-to-all"][0] for c in comms]
    assert exposed[0] == _todays_ulysses_seconds(shapes_of(cfg1, 4))
    assert all(a > b for a, b in zip(exposed, exposed[1:])), exposed
    for c in comms[1:]:  # hidden + exposed = the G = 1 seconds: the same bytes travel
        assert c["ulysses all-to-all"][0] + c["ulysses all-to-all hidden"][0] == \
            pytest.approx(exposed[0], rel=1e-12)
    # the first inbound and last outbound exchanges stay exposed however long the kernel
    assert pipelined_exposed(3.0, 1.0, 1e9, 4) == pytest.approx(1.0)
    assert pipelined_exposed(3.0, 1.0, 0.0, 4) == pytest.approx(4.0)


def test_search_tries_every_valid_g_and_picks_one_auto_runs():
    """Every layout with sp/ring > 1 comes in each valid G; the best has one (the most
    overlap), train.py's validation accepts it, and a G the user set is kept."""
    cfg = _config(1)
    best, layouts = search(cfg, 4, 1000.0, {"parallel.sp": 4}, "cpu", LINKS)
    tried = {x.overrides["parallel.ulysses_chunks"] for x in layouts
             if x.overrides["parallel.ring"] == 1}
    assert tried == set(valid_ulysses_chunks(16, 16, 4))
    g = best.overrides["parallel.ulysses_chunks"]
    assert best.overrides["parallel.ring"] > 1 or g == max(tried)
    validate(dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, **{k.split(".")[1]: v for k, v in best.overrides.items()
                         if k.startswith("parallel.")})), 4)
    _, fixed = search(cfg, 4, 1000.0, {"parallel.sp": 4, "parallel.ulysses_chunks": 2}, "cpu",
                      LINKS)
    assert {x.overrides["parallel.ulysses_chunks"] for x in fixed} == {2}


def test_parallel_auto_sets_ulysses_chunks():
    """train.py's compose with parallel.auto on 4 ranks and sp fixed at 4: the chosen G > 1."""
    from ulysses_train.cli import compose as cli

    args = ["model.n_layers=2", "model.d_model=128", "model.n_heads=16", "model.n_kv_heads=16",
            "model.ffn_hidden=128", "model.vocab_size=256", "data=synthetic",
            "data.seq_len=1024", "train.global_batch_size=1", "train.micro_batch_size=1",
            "parallel.auto=true", "plan.gpu_mem_gib=1", "parallel.sp=4", "parallel.ring=1"]
    cfg = cli.apply_auto(cli.compose(args), args, 4)
    assert cfg.parallel.ulysses_chunks == max(valid_ulysses_chunks(16, 16, 4))
    validate(cfg, 4)


def test_choose_takes_more_head_groups_only_when_clearly_faster():
    def timed(g: int, step_s: float) -> Layout:
        return Layout({"parallel.ring": 1, "parallel.ulysses_chunks": g}, fits=True,
                      time=SimpleNamespace(step_s=step_s))
    g1, g4_close, g8_clear = timed(1, 10.0), timed(4, 9.95), timed(8, 9.8)
    assert choose([g4_close, g1]) is g1  # 0.5 % faster: within GROUP_MARGIN
    assert choose([g8_clear, g4_close, g1]) is g8_clear  # 2 % faster than G=1
    other = Layout({"parallel.ring": 1, "parallel.ulysses_chunks": 1, "parallel.tp": 2},
                   fits=True, time=SimpleNamespace(step_s=9.9))
    assert choose([other, g4_close, g1]) is other  # (sorted fastest first) not a twin of G=1
