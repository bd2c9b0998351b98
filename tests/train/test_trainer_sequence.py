"""Any seq_len and the Ulysses x ring layouts train the one-process model (issue 12).

Same machinery and data as test_trainer_parallel.py (uneven labels, init_std 0.2, eps 1e-3, the
"causal" and "documents" curves): 8-step loss curves, gradient norms and the `tokens` column of
each layout against one process at the same `data.seq_len`. New here:
- a `seq_len` that no sp divides (250): rows are padded to `SequenceLayout.padded_len`, padded
  labels leave the loss and the count, padding is its own document under the document mask;
- `seq_len` < 2 sp: some ranks hold only padding; they must count 0 valid labels and the step
  must stay exact (a rank whose loss were a mean would give NaN; one whose padding were a label
  would change the count);
- rings (`parallel.ring` > 1): zig-zag token layout for data, positions, document ids, labels.
  These need `ulysses_train.parallel.ring` (the ring layer, written in parallel with this file)
  and are skipped where it is absent.
Bugs these catch (each planted once by hand: the curves fail): padded labels counted in the
loss (loss off by ~2 at seq_len=5), a rank's shard taken by consecutive slices under a ring
(its chunks are i and 2R-1-i; off by 0.12 at sp=3 ring=3); also padding counted in `tokens`,
and a mask built on the unpadded rows (the kernel refuses its shape).
"""
from __future__ import annotations

import pytest

from support.common import UnevenLabels, cpu_dims, metrics_rows
from support.curves import (
    BOTH,
    LOSS_RTOL,
    NORM_RTOL,
    STEPS,
    curve_config,
    layout_rank,
)
from support.spawn import run_distributed
from ulysses_train.parallel import ParallelDims
from ulysses_train.parallel.layout import SequenceLayout
from ulysses_train.train.step_stats import global_counts
from ulysses_train.train.trainer import Trainer

# The ring merges partial softmaxes through their log-sum-exp: other rounding than one kernel
# call, so the bound; Ulysses alone keeps test_trainer_parallel's (~30x what it measures).
RING_RTOL = 1e-4


def _seq_config(curve, parallel, micro, seq_len, train=None, steps=STEPS):
    cfg = curve_config(curve, parallel, micro, train, steps=steps)
    cfg.data.seq_len = seq_len
    return cfg


def train_run(cfg, dims, run_dir):
    """Metrics rows (rank 0), this rank's valid labels in the first global batch, and that
    batch's global (valid labels, sum of squared attention spans) as the step divides by and
    counts FLOPs with (padding must add to neither)."""
    trainer = Trainer(cfg, run_dir, dims)
    trainer.data = UnevenLabels(trainer.data)
    micro = list(trainer._micro_batches(0, "train"))
    valid = sum(int((labels != -100).sum()) for _, _, labels, _ in micro)
    counts = global_counts(micro, trainer).tolist()  # collective over dp x sp
    trainer.fit()
    return (metrics_rows(run_dir) if dims.is_main else None), valid, counts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process (metrics rows, valid labels of the first batch) by (curve, seq_len), each
    computed once, when first asked for."""
    root, cache = tmp_path_factory.mktemp("reference"), {}

    def curve_of(curve, seq_len):
        if (curve, seq_len) not in cache:
            cfg = _seq_config(curve, {}, 2, seq_len)
            cache[curve, seq_len] = train_run(cfg, cpu_dims(), str(root / f"{curve}-{seq_len}"))
        return cache[curve, seq_len]
    return curve_of


LAYOUTS = {  # id: (world, parallel, micro, seq_len, curves, loss rtol), marks
    # + the sliding curve under Ulysses alone (issue 20: the window after the all-to-all)
    "sp4-seq250": ((4, {"sp": 4}, 2, 250, (*BOTH, "sliding"), LOSS_RTOL), ()),
    "sp4-seq5": ((4, {"sp": 4}, 1, 5, BOTH, LOSS_RTOL), ()),  # < 2 sp: rank 3 holds padding only
    "sp8-ring4": ((8, {"sp": 8, "ring": 4}, 2, 64, BOTH, RING_RTOL), ()),
    "tp2xsp4-ring2": ((8, {"tp": 2, "sp": 4, "ring": 2}, 2, 64, ("documents",), RING_RTOL), ()),
    # + the mixed sliding-window curve (sliding, sliding, full; documents; W = 8 < chunk 16):
    # its sliding layers run the ring's halo exchange (issue 20 §3)
    "sp4-ring2-zero3": ((4, {"sp": 4, "ring": 2, "zero": 3}, 2, 64, ("causal", "sliding"),
                         RING_RTOL), ()),
    "sp3-ring3-seq250": ((3, {"sp": 3, "ring": 3}, 2, 250, BOTH, RING_RTOL), ()),
    # < 2 sp under a ring, with the document mask: Ulysses rank 1 of ring rank 0 holds padding only
    "sp4-ring2-seq5": ((4, {"sp": 4, "ring": 2}, 1, 5, ("documents",), RING_RTOL), ()),
}


@pytest.mark.parametrize("case", [pytest.param(v, id=k, marks=m) for k, (v, m) in LAYOUTS.items()])
def test_loss_curve_equals_one_process(reference, tmp_path, case):
    world, parallel, micro, seq_len, curves, rtol = case
    results = run_distributed(layout_rank, world, parallel, micro, None, curves,
                              str(tmp_path), seq_len, train_run, timeout=300)
    for curve in curves:  # every loss curve first: a wrong gradient must show in the loss
        ref, got = reference(curve, seq_len)[0], results[0][curve][0]
        assert [r["step"] for r in got] == list(range(1, STEPS + 1))
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=rtol), curve
    for curve in curves:
        ref, got = reference(curve, seq_len)[0], results[0][curve][0]
        assert [r["grad_norm"] for r in got] == pytest.approx(
            [r["grad_norm"] for r in ref], rel=max(rtol, NORM_RTOL)), curve
        # real tokens only, each once: G x seq_len per step, never the padded length
        assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
        assert got[0]["tokens"] == 4 * seq_len
    # A rank holding only padding counts no label; the counts add up to the one-process one.
    layout = SequenceLayout(seq_len, parallel["sp"], parallel.get("ring", 1))
    tp = parallel.get("tp", 1)
    for rank, out in enumerate(results):
        sp_rank = (rank // tp) % parallel["sp"]  # dp = 1 here: rank = sp_rank * tp + tp_rank
        if (layout.rank_positions(sp_rank) >= seq_len).all():
            assert all(out[c][1] == 0 for c in curves), (rank, out)
    for curve in curves:
        counts = [out[curve][1] for out in results[::tp]]
        assert sum(counts) == reference(curve, seq_len)[1]
        # valid labels and attention spans (MFU) of the real tokens, on every rank
        assert all(out[curve][2] == reference(curve, seq_len)[2] for out in results), curve



# The mixed sliding-window model (sliding, sliding, full; documents): its checkpoints reshard
# between the halo exchange (sp=4 ring=2), Ulysses and one process like any other (issue 20).
RESHARDED = "sliding"


def train_until(rank, world, parallel, exit_after, run_dir):
    cfg = _seq_config(RESHARDED, parallel, 2, 64, {"exit_after_steps": exit_after}, steps=12)
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    dims.build_mesh()
    train_run(cfg, dims, run_dir)


def test_checkpoint_reshards_between_ring_ulysses_and_one_process(tmp_path):
    """One run of 12 steps moved between layouts every 3 steps: one process -> sp=4 ring=2 ->
    sp=4 -> one process. Its curve is the uninterrupted one-process curve (DCP reshards on load;
    the trainer state is layout-free). Catches a checkpoint that records the ring's token
    layout, or a resume that reads the data at another position under a ring."""
    straight = tmp_path / "straight"
    train_run(_seq_config(RESHARDED, {}, 2, 64, steps=12), cpu_dims(), str(straight))
    run_dir = str(tmp_path / "moved")
    train_run(_seq_config(RESHARDED, {}, 2, 64, {"exit_after_steps": 3}, steps=12), cpu_dims(),
              run_dir)
    run_distributed(train_until, 4, {"sp": 4, "ring": 2}, 3, run_dir, timeout=300)
    run_distributed(train_until, 4, {"sp": 4}, 3, run_dir, timeout=300)
    train_run(_seq_config(RESHARDED, {}, 2, 64, steps=12), cpu_dims(), run_dir)
    ref, got = metrics_rows(straight), metrics_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=RING_RTOL), a["step"]
        assert b["tokens"] == a["tokens"]
