"""What the trainer actually feeds the model on each rank: positions, labels, document ids.

The model-level sequence-parallel tests pass global positions in by hand, so they cannot see a
trainer that hands each rank positions local to its slice (0..S/P-1 on every rank). Here a
forward pre-hook records the model's inputs on every rank of real `Trainer.train_step` calls;
put back together by the layout contract (dp rank i owns the i-th block of rows, sp rank j the
j-th block of columns, micro-batches in order) they must be the one-process tensors, and those
must obey rules checked from the tokens alone (not by re-running the data code):
- positions: 0..S-1 along the row, or, with `data.document_mask`, restarting at 0 right after
  each EOS;
- labels: the next input token, shifted on the whole row before slicing (the last column of a
  slice is labelled with the first token of the next slice);
- document ids: the *global* row's ids on every sp rank, stepping up by one right after an EOS.

Bugs these tests catch: positions local to each sp slice (planted by hand once: fails),
labels shifted after slicing, a mask built from a slice's document ids, dp ranks reading the
same rows, a data position that does not advance between steps.
"""
from __future__ import annotations

import pytest
import torch

from support.common import cpu_dims, small_config
from support.spawn import run_distributed
from ulysses_train.data.synthetic import EOS_ID
from ulysses_train.parallel import ParallelDims
from ulysses_train.train.trainer import Trainer

SEQ, GLOBAL, STEPS = 64, 4, 2
LAYOUTS = {"sp4": {"sp": 4}, "sp2xdp2": {"sp": 2, "dp": 2}}


def _config(parallel: dict, document_mask: bool):
    # Micro-batches of 1 row: several per dp rank, so their order is checked too.
    return small_config(parallel=parallel, data={"seq_len": SEQ, "document_mask": document_mask},
                        checkpoint={"resume": "never"},
                        train={"steps": STEPS, "global_batch_size": GLOBAL, "micro_batch_size": 1})


def _recorded_inputs(cfg, dims) -> list[list[tuple]]:
    """Per step, per micro-batch: (input_ids, position_ids, labels, document ids or None) as
    the model's forward received them (document ids: those the attention mask was built on)."""
    trainer = Trainer(cfg, "/nonexistent-run-dir", dims)
    calls = []

    def record(module, args, kwargs):
        ids, positions, labels = args[:3]
        mask = kwargs.get("attn_mask")
        docs = None if mask is None else mask.document_ids.clone()
        calls.append((ids.clone(), positions.clone(), labels.clone(), docs))

    trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    steps = []
    for _ in range(STEPS):
        calls.clear()
        trainer.train_step()
        steps.append(list(calls))
    return steps


def _rank(rank, world):
    out = {}
    for name, parallel in LAYOUTS.items():
        for document_mask in (False, True):
            cfg = _config(parallel, document_mask)
            dims = ParallelDims.from_config(cfg.parallel, world, rank)
            dims.build_mesh()
            out[name, document_mask] = (dims.local_rank("dp"), dims.local_rank("sp"), dims.dp,
                                        dims.sp, _recorded_inputs(cfg, dims))
    return out


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(_rank, 4, timeout=180)


def _assemble(per_rank: list, step: int):
    """Global (G, S) ids, positions, labels from every rank's micro-batches of `step`, and
    per rank the (rows, document ids) its mask was built on. Each cell must be filled once."""
    ids, pos, labels = (torch.full((GLOBAL, SEQ), -1, dtype=torch.int64) for _ in range(3))
    filled = torch.zeros(GLOBAL, SEQ, dtype=torch.int64)
    docs = []
    for dp_i, sp_i, dp, sp, steps in per_rank:
        rows_per_dp, cols = GLOBAL // dp, SEQ // sp
        for m, (i, p, lab, d) in enumerate(steps[step]):
            rows = slice(dp_i * rows_per_dp + m * i.shape[0], dp_i * rows_per_dp + (m + 1) * i.shape[0])
            c = slice(sp_i * cols, (sp_i + 1) * cols)
            assert i.shape == (i.shape[0], cols), "each sp rank holds S/sp columns"
            ids[rows, c], pos[rows, c], labels[rows, c] = i, p, lab
            filled[rows, c] += 1
            docs.append((rows, d))
    assert (filled == 1).all(), "every token of the global batch goes to exactly one place"
    return ids, pos, labels, docs


def _expected_positions(ids: torch.Tensor, document_mask: bool) -> torch.Tensor:
    """From the tokens alone: column index, or the distance to the last token after an EOS."""
    pos = torch.zeros_like(ids)
    for j in range(1, ids.shape[1]):
        restart = (ids[:, j - 1] == EOS_ID) if document_mask else torch.zeros(len(ids), dtype=torch.bool)
        pos[:, j] = torch.where(restart, 0, pos[:, j - 1] + 1)
    return pos


def _one_process(document_mask: bool):
    steps = _recorded_inputs(_config({}, document_mask), cpu_dims())
    return [tuple(torch.cat([c[k] for c in calls]) if calls[0][k] is not None else None
                  for k in range(4)) for calls in steps]


@pytest.mark.parametrize("document_mask", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_gets_its_slice_of_the_global_batch(four_ranks, layout, document_mask):
    ref = _one_process(document_mask)
    for step in range(STEPS):
        r_ids, r_pos, r_labels, r_docs = ref[step]
        # The one-process tensors follow the rules, read from the tokens alone.
        assert torch.equal(r_pos, _expected_positions(r_ids, document_mask))
        assert torch.equal(r_labels[:, :-1], r_ids[:, 1:])  # next token, whole-row shift
        if document_mask:
            steps_up = (r_docs[:, 1:] - r_docs[:, :-1])
            assert torch.equal(steps_up, (r_ids[:, :-1] == EOS_ID).long())
        else:
            assert r_docs is None
        ids, pos, labels, docs = _assemble([r[layout, document_mask] for r in four_ranks], step)
        assert torch.equal(ids, r_ids)
        assert torch.equal(pos, r_pos), "positions must be global (or per document), not per slice"
        assert torch.equal(labels, r_labels), "labels are shifted before slicing"
        for rows, d in docs:  # every sp rank's mask covers the whole global row
            assert (d is None) == (not document_mask)
            if d is not None:
                assert torch.equal(d, r_docs[rows])
    # The data position advances: step 2 is not step 1 again.
    assert not torch.equal(ref[0][0], ref[1][0])
    # The case can fail: positions do not restart at a slice start (a document crosses it).
    sp = LAYOUTS[layout]["sp"]
    slice_starts = ref[0][1][:, SEQ // sp::SEQ // sp]
    assert (slice_starts != 0).any()
