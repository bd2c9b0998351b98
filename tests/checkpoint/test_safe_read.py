"""Loading a checkpoint never runs code from it (issue 19, item 9).

DCP pickles a checkpoint's `.metadata` and its non-tensor entries; torch reads them back with
plain `pickle.load` / `torch.load(weights_only=False)`. A planted pickle (with the manifest
rewritten to match) ran at resume. Every read now goes through checkpoint/safe_read.py: a
disallowed global is one error naming the file, exit 1, nothing run; every checkpoint we write,
in every layout, still loads. The entry points (export, model.init_from, eval.checkpoint,
train.py resume) are tested end to end in tests/e2e/test_untrusted_checkpoint.py.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from support.common import ROOT, cpu_dims, files_under, small_config
from support.planted import plant_in_metadata, plant_in_trainer_state
from support.spawn import run_distributed
from ulysses_train.checkpoint import safe_read
from ulysses_train.checkpoint.manager import CheckpointManager
from ulysses_train.checkpoint.safe_read import RefusedPickle
from ulysses_train.config.schema import CheckpointConfig
from ulysses_train.parallel import ParallelDims
from ulysses_train.parallel.parallelize import build_model
from ulysses_train.train.optim import build_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _saved_run(root, steps=(1, 2)) -> tuple:
    """A single-process run dir with checkpoints at `steps`; (cfg, model, optimizer)."""
    cfg = small_config()
    model = build_model(cfg, cpu_dims())
    opt = build_optimizer(model, cfg.optim)
    m = CheckpointManager(str(root), CheckpointConfig(), cfg.model, log=lambda s: None)
    for step in steps:
        m.save(step, model, opt, {"step": step, "tokens": 64 * step})
    return cfg, model, opt



PLANTS = {"metadata": (plant_in_metadata, ".metadata", "builtins.open"),
          "trainer-state": (plant_in_trainer_state, "__0_0.distcp", "io.open")}


@pytest.mark.parametrize("plant", PLANTS, ids=PLANTS)
@pytest.mark.parametrize("resume", ["auto", "PATH"])
def test_resume_refuses_a_planted_pickle_and_runs_nothing(tmp_path, plant, resume):
    """The reported case through CheckpointManager.restore: the newest checkpoint's `.metadata`
    (or its trainer state, a BYTE_IO item) holds `open(marker, "w")`, manifest rewritten. The
    old code opened the marker and loaded on. Now: RefusedPickle (exit 1) naming the file and
    the global, the marker absent, no fallback to the older intact checkpoint (a planted pickle
    is not the torn write a fallback is for), every file as it was."""
    plant_fn, file, refused = PLANTS[plant]
    cfg, model, opt = _saved_run(tmp_path / "run")
    step = str(tmp_path / "run" / "checkpoints" / "step_00000002")
    marker = str(tmp_path / "ran")
    plant_fn(step, marker)
    before = files_under(tmp_path)
    ck = CheckpointConfig(resume=step if resume == "PATH" else "auto")
    m = CheckpointManager(str(tmp_path / "run"), ck, cfg.model, log=lambda s: None)
    with pytest.raises(RefusedPickle) as info:
        m.restore(model, opt, {"step": 0, "tokens": 0})
    assert not os.path.exists(marker)
    assert info.value.exit_code == 1 and info.value.key == os.path.join(step, file)
    assert str(info.value).startswith(f"{step}/{file}: refuses to unpickle {refused}")
    assert "\n" not in str(info.value)
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("plant", PLANTS)
def test_check_pickles_reads_every_pickle_and_nothing_else(tmp_path, plant):
    """The pre-checks' `check_pickles` refuses either plant (the `.metadata`, or a non-tensor
    item inside a `.distcp` file) with the same line as a load, and passes an intact checkpoint."""
    plant_fn, file, refused = PLANTS[plant]
    _saved_run(tmp_path / "run")
    intact, step = (str(tmp_path / "run" / "checkpoints" / f"step_0000000{i}") for i in (1, 2))
    safe_read.check_pickles(intact)
    marker = str(tmp_path / "ran")
    plant_fn(step, marker)
    before = files_under(tmp_path)
    with pytest.raises(RefusedPickle) as info:
        safe_read.check_pickles(step)
    assert not os.path.exists(marker) and files_under(tmp_path) == before
    assert str(info.value).startswith(f"{step}/{file}: refuses to unpickle {refused}")


def _pickle_naming(module: str, name: str) -> bytes:
    """A protocol-2 pickle whose only global is module.name, called with no arguments."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."


@pytest.mark.parametrize("module,name", [
    ("builtins", "exec"), ("posix", "system"), ("torch", "load"),
    ("torch.distributed.checkpoint.metadata", "os.system"),  # a dotted name reaching further
    ("torch.serialization", "load"), ("collections", "OrderedDict.fromkeys"),
])
def test_only_the_allow_list_is_unpickled(tmp_path, module, name):
    """Globals outside ALLOWED are refused by name before they are looked up; the allowed
    ones (DCP metadata, torch.Size, dtypes, layouts) unpickle as plain pickle does."""
    where = str(tmp_path / ".metadata")
    with pytest.raises(RefusedPickle, match=re.escape(f"refuses to unpickle {module}.{name} ")):
        safe_read.RestrictedUnpickler(io.BytesIO(_pickle_naming(module, name)), where).load()
    kept = (torch.Size([2, 3]), torch.bfloat16, torch.strided, {"a": [1, (2.0, None)]})
    data = pickle.dumps(kept)
    assert safe_read.RestrictedUnpickler(io.BytesIO(data), where).load() == kept


def _full_state(step: str) -> dict:
    """Every entry of checkpoint `step` as full tensors (zeros) or placeholders, to load into."""
    md = safe_read.read_metadata(step).state_dict_metadata
    return {k: torch.zeros(tuple(e.size), dtype=e.properties.dtype)
            if isinstance(e, TensorStorageMetadata) else "unset" for k, e in md.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(x, b[k]) if isinstance(x, torch.Tensor) else x == b[k] != "unset"
        for k, x in a.items())


LAYOUTS = {  # 2 ranks: each layout's DCP metadata differs (chunks, DTensor placements, bytes)
    "dp2-zero0": ({"zero": 0}, {}), "dp2-zero2": ({"zero": 2}, {}),
    "dp2-zero3": ({"zero": 3}, {}), "dp2-zero3-async": ({"zero": 3}, {"async_save": True}),
    "hsdp": ({"zero": 3, "shard_group": 1}, {}), "tp2": ({"tp": 2}, {}),
    "ring2": ({"sp": 2, "ring": 2, "zero": 3}, {}),
}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _layouts_rank(rank, world, root):
    """Save step 1 in every layout, restore it (through Resume: the safe reader) into a model
    initialised with another seed; then restore a planted copy on both ranks at once."""
    out = {}
    for name, (parallel, ck) in LAYOUTS.items():
        run_dir = os.path.join(root, name)
        models = []
        for seed in (0, 1):
            cfg = small_config(parallel=parallel, train={"seed": seed})
            dims = ParallelDims.from_config(cfg.parallel, world, rank)
            dims.build_mesh()
            model = build_model(cfg, dims)
            opt = build_optimizer(model, cfg.optim)
            m = CheckpointManager(run_dir, CheckpointConfig(**ck), cfg.model, log=lambda s: None,
                                  is_main=rank == 0, distributed=True)
            if seed == 0:
                m.save(1, model, opt, {"step": 1, "tokens": 64})
                m.wait()
            else:
                state, _ = m.restore(model, opt, {"step": 0, "tokens": 0})
                out[name] = state
            models.append([_full(p) for p in model.parameters()])
        out[name] = (out[name], all(torch.equal(a, b) for a, b in zip(*models)))
    step = os.path.join(root, "dp2-zero3", "checkpoints", "step_00000001")
    for plant, (plant_fn, _, _) in PLANTS.items():
        copy = os.path.join(root, f"planted-{plant}")
        if rank == 0:
            shutil.copytree(step, copy)
            plant_fn(copy, os.path.join(root, f"ran-{plant}"))
        torch.distributed.barrier()
        m = CheckpointManager(os.path.join(root, f"run-{plant}"), CheckpointConfig(resume=copy),
                              cfg.model, log=lambda s: None, is_main=rank == 0, distributed=True)
        try:
            m.restore(model, opt, {"step": 0, "tokens": 0})
            out[plant] = None
        except RefusedPickle as exc:
            out[plant] = str(exc)
    return out


def test_every_layout_we_write_loads_through_the_restricted_reader(tmp_path):
    """Every layout's checkpoint (ZeRO 0/2/3, async, HSDP, TP, ring) resumes through the safe
    reader on 2 ranks with its weights and trainer state, and loads in one process exactly as
    plain DCP loads it (tensors and non-tensor entries). A planted pickle is refused on both
    ranks alike (DCP gathers the BYTE_IO refusal across ranks), without a hang, running nothing."""
    results = run_distributed(_layouts_rank, 2, str(tmp_path), timeout=240)
    for rank in (0, 1):
        for name in LAYOUTS:
            state, equal = results[rank][name]
            assert state == {"step": 1, "tokens": 64} and equal, (rank, name)
        for plant, (_, file, refused) in PLANTS.items():
            where = os.path.join(tmp_path, f"planted-{plant}", file)
            assert results[rank][plant].startswith(f"{where}: refuses to unpickle {refused}")
            assert not os.path.exists(tmp_path / f"ran-{plant}")
    for name in LAYOUTS:
        step = str(tmp_path / name / "checkpoints" / "step_00000001")
        ours, plain = _full_state(step), _full_state(step)
        safe_read.load(ours, step, distributed=False)
        dcp.load(plain, checkpoint_id=step, no_dist=True)
        assert _same(ours, plain), name


READERS = re.compile(r"FileSystemReader\(|dcp\.load\(|pickle\.loads?\(|torch\.load\(|"
                     r"Unpickler\(|checkpoint_id=")


def test_no_checkpoint_read_bypasses_the_restricted_reader():
    """The package reads checkpoints only through safe_read (`read_metadata`, `load`): no
    other `FileSystemReader(`, `dcp.load(`, `pickle.load`, `torch.load(` or `checkpoint_id=`
    except DCP's saves and hf/load.py's safetensors reader (no pickle on its path)."""
    allowed = {("checkpoint/manager.py", "dcp.save("), ("checkpoint/manager.py", "async_save("),
               ("hf/load.py", "HuggingFaceStorageReader(")}
    found = []
    package = os.path.join(ROOT, "ulysses_train")
    for where, _, names in os.walk(package):
        for n in names:
            rel = os.path.relpath(os.path.join(where, n), package)
            if not n.endswith(".py") or rel == "checkpoint/safe_read.py":
                continue
            with open(os.path.join(where, n)) as f:
                for i, line in enumerate(f, 1):
                    if READERS.search(line) and not any(
                            rel == path and word in line for path, word in allowed):
                        found.append(f"{rel}:{i}: {line.strip()}")
    assert found == []
