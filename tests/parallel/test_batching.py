"""parallel/batching.py is the one batch sharding: training, evaluation and the planner's
measurement all follow a change of SequenceLayout (the layout is patched here to a permutation
no real layout has, and each consumer must feed the model exactly those columns)."""
import torch

from support.common import cpu_dims, small_config
from ulysses_train.data.batch import Batch
from ulysses_train.model.gpt import GPT
from ulysses_train.parallel.batching import dp_rows, shard_batch
from ulysses_train.parallel.layout import SequenceLayout

SEQ = 32


def _reversed_positions(self, rank):
    """A layout of one rank holding every column, last first."""
    return torch.arange(self.padded_len - 1, -1, -1)


def _seen_positions(monkeypatch):
    """Patch the layout and record the position_ids every GPT forward is given."""
    seen = []
    forward = GPT.forward

    def spy(self, input_ids, position_ids, *args, **kwargs):
        seen.append(position_ids.clone())
        return forward(self, input_ids, position_ids, *args, **kwargs)

    monkeypatch.setattr(SequenceLayout, "rank_positions", _reversed_positions)
    monkeypatch.setattr(GPT, "forward", spy)
    return seen


def _is_reversed(positions: torch.Tensor) -> bool:
    return bool((positions == torch.arange(SEQ - 1, -1, -1)).all())


def test_trainer_evaluation_and_planner_follow_the_layout(monkeypatch, tmp_path):
    from ulysses_train.evaluate.suite import held_out_micro_batches
    from ulysses_train.plan.measure import measured_peak
    from ulysses_train.train.trainer import Trainer

    cfg = small_config(data={"seq_len": SEQ, "val_fraction": 0.5}, checkpoint={"every": 0},
                       train={"steps": 1, "global_batch_size": 2})  # one micro-batch: MemTracker
    seen = _seen_positions(monkeypatch)
    trainer = Trainer(cfg, str(tmp_path / "run"), cpu_dims())
    trainer.train_step()
    assert seen and all(_is_reversed(p) for p in seen), "the trainer"
    seen.clear()
    for ids, pos, labels, mask in held_out_micro_batches(cfg, cpu_dims(), trainer.data,
                                                         trainer.model):
        trainer.model(ids, pos, labels, attn_mask=mask)
    assert seen and all(_is_reversed(p) for p in seen), "evaluation"
    seen.clear()
    measured_peak(cfg, cpu_dims())
    assert seen and all(_is_reversed(p) for p in seen), "the planner's measurement"


def test_shard_batch_pads_takes_the_ranks_columns_and_micro_batches():
    """Rows padded to the layout (inert padding), this sp rank's columns, mb rows each."""
    n, s = 4, 10
    ids = torch.arange(n * s).view(n, s)
    batch = Batch(input_ids=ids, labels=ids + 1, position_ids=torch.arange(s).expand(n, s),
                  document_ids=torch.zeros(n, s, dtype=torch.int64))

    class Dims:
        dp, sp = 1, 2

        def __init__(self, sp_rank):
            self.sp_rank = sp_rank

        def local_rank(self, name):
            return self.sp_rank if name == "sp" else 0

    layout = SequenceLayout(s, 2, 1)  # padded to 10 (2 | 10): rank 1 holds 5..9
    mbs = list(shard_batch(batch, Dims(1), layout, micro_batch_size=3))
    assert [mb.input_ids.shape for mb in mbs] == [(3, 5), (1, 5)]
    assert torch.equal(mbs[0].input_ids, ids[:3, 5:])
    assert torch.equal(mbs[1].position_ids, torch.arange(5, 10).view(1, 5))
    assert mbs[0].document_ids.shape == (3, 10)  # whole rows, for the mask
    ring = SequenceLayout(s, 2, 2)  # padded to 12, zig-zag chunks of 3: rank 0 holds 0-2, 9-11
    (mb,) = shard_batch(batch.slice(slice(0, 1)), Dims(0), ring, micro_batch_size=1)
    assert mb.position_ids[0].tolist() == [0, 1, 2, 9, 10, 11]
    assert mb.labels[0].tolist() == [1, 2, 3, 10, -100, -100]  # past s: padding, ignored
    assert mb.input_ids[0, -2:].tolist() == [0, 0]


def test_dp_rows_are_consecutive_blocks():
    class Dims:
        dp = 4

        def __init__(self, r):
            self.r = r

        def local_rank(self, name):
            return self.r

    assert [dp_rows(Dims(r), 8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6),
                                                       slice(6, 8)]
