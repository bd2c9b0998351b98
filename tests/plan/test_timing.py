"""The planner's data-parallel collective volumes follow what FSDP2 does per step
(parallel/sharding.py set_last_micro_batch): ZeRO-2 gathers and reduce-scatters once per step
however many micro-batches, ZeRO-3 once (reduce-scatter) and twice (all-gather) per micro-batch."""
import pytest

from support.common import small_config
from ulysses_train.plan.shapes import shapes_of
from ulysses_train.plan.timing import Links, step_time

KEYS = ("zero all-gather + reduce-scatter", "zero hidden")


def _zero_seconds(zero: int, micro_batches: int) -> float:
    cfg = small_config(data={"seq_len": 64}, parallel={"sp": 2, "zero": zero},
                       train={"micro_batch_size": 1, "global_batch_size": 4 * micro_batches})
    links = Links(gpus_per_node=8, intra_gbps=7200.0, inter_gbps=400.0)
    comm = step_time(cfg, shapes_of(cfg, 8), 8, 360.0, links).comm  # sp=2 x dp=4
    return sum(comm[k][0] for k in KEYS)


def test_zero2_communicates_once_per_step_zero3_once_per_micro_batch():
    """Catches: ZeRO-2's reduce-scatter counted once per micro-batch (it is once per step)."""
    assert _zero_seconds(2, 4) == pytest.approx(_zero_seconds(2, 1), rel=1e-12)
    assert _zero_seconds(3, 4) == pytest.approx(4 * _zero_seconds(3, 1), rel=1e-12)
