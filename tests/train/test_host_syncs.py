"""A training step that does not log makes no host sync, in every layout (issue 24, 1.1).

Each layout trains 3 steps with `logging.every` large: steps 1 and 2 do not log (step 3, the
last, does). Every host sync made while the loop runs is recorded with the step it falls in
(`support.syncs.count_syncs`); a step is everything from its `train_step` to the next one (the
previous step's lagged read, the stop agreement, the end-of-step checks). Layouts with a ring
use `data.document_mask=true`, so the ring's document-masked block plan runs too.
"""
import pytest
import torch

from support.common import cpu_dims, small_config
from support.spawn import run_distributed
from support.syncs import count_syncs
from ulysses_train.parallel import ParallelDims
from ulysses_train.train.trainer import Trainer

STEPS = 3
LAYOUTS_2 = {  # name: (parallel, data, model) on 2 ranks
    "sp=2 ring=2": ({"sp": 2, "ring": 2}, {"document_mask": True}, {}),
    "sp=2 ring=2 window": ({"sp": 2, "ring": 2}, {"document_mask": True},
                           {"sliding_window": 8}),
    "tp=2": ({"tp": 2}, {}, {}),
    "zero=3": ({"dp": 2, "zero": 3}, {}, {}),
    "ddp": ({"dp": 2, "zero": 0}, {}, {}),
}


def _config(parallel, data, model):
    cfg = small_config(train={"steps": STEPS}, logging={"every": 100},
                       checkpoint={"every": 0, "resume": "never"}, parallel=parallel,
                       data=data, model=model)
    cfg.eval.every = 0
    return cfg


def syncs_by_step(cfg, dims, run_dir) -> dict[int, list]:
    """{step: [(what, where), ...]} of every host sync `Trainer.fit` makes in each step."""
    trainer = Trainer(cfg, run_dir, dims)
    by_step: dict[int, list] = {}
    step = trainer.train_step

    def marked_step():  # from here until the next step starts, syncs are this step's
        counter.events = by_step.setdefault(trainer.step + 1, [])
        return step()

    trainer.train_step = marked_step
    steps = lambda: [s["step"] for s in trainer.optimizer.state.values() if "step" in s]  # noqa: E731
    with count_syncs(host_resident=steps) as counter:
        trainer.fit()
    return {k: list(v) for k, v in by_step.items()}


def _two_ranks(rank, world, root):
    out = {}
    for name, (parallel, data, model) in LAYOUTS_2.items():
        cfg = _config(parallel, data, model)
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        dims.build_mesh()
        out[name] = syncs_by_step(cfg, dims, f"{root}/{name.replace(' ', '_')}")
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_distributed(_two_ranks, 2, str(tmp_path_factory.mktemp("syncs")), timeout=240)


def _assert_sync_free(by_step, layout, rank=0):
    assert sorted(by_step) == list(range(1, STEPS + 1)), by_step.keys()
    for step in range(1, STEPS):  # steps that do not log
        assert by_step[step] == [], f"{layout}, rank {rank}, step {step}: {by_step[step]}"
    assert by_step[STEPS], "the last step logs: it reads the loss (the counter must see it)"


def test_one_process_non_logging_steps_make_no_host_sync(tmp_path):
    by_step = syncs_by_step(_config({}, {"document_mask": True}, {}), cpu_dims(), str(tmp_path))
    _assert_sync_free(by_step, "1 process")


@pytest.mark.parametrize("layout", list(LAYOUTS_2))
def test_two_rank_layouts_non_logging_steps_make_no_host_sync(two_ranks, layout):
    for rank, result in enumerate(two_ranks):
        _assert_sync_free(result[layout], layout, rank)


def test_the_counter_sees_every_kind_of_read():
    t = torch.tensor([1.0, 0.0, 2.0])
    reads = [lambda: t.sum().item(), lambda: t.tolist(), lambda: float(t[0]), lambda: int(t[0]),
             lambda: bool(t[0]), lambda: 1 if t[0] else 0, lambda: t.nonzero(),
             lambda: torch.where(t > 0), lambda: t[t > 0], lambda: torch.equal(t, t),
             lambda: torch.unique(t), lambda: f"{t.sum()}"]
    for read in reads:
        with count_syncs() as counter:
            read()
        assert len(counter.events) == 1, counter.events
    with count_syncs(host_resident=lambda: [t]) as counter:
        t.numpy(), (t * 2).sum(), t.tolist()  # a host read of host data, device work, ignored
    assert counter.events == []
