"""The token cache: reused when inputs are unchanged, rebuilt when they change, never read
half-written, and built once when several processes ask for it at the same time."""
import hashlib
import json
import multiprocessing as mp
import traceback

import numpy as np
import torch

from support.data import build, small_stdlib
from ulysses_train.data.cache import read_complete


def build_id(source) -> str:
    return json.loads((source.cache_path / "meta.json").read_text())["build_id"]


def built(log) -> bool:
    return any("tokenizing" in line for line in log)


def test_cache_is_reused_and_rebuilt_when_an_input_changes(tmp_path):
    log1, log2, log3 = [], [], []
    first = build(small_stdlib(tmp_path), log=log1)
    second = build(small_stdlib(tmp_path, seq_len=32), log=log2)  # seq_len is not an input
    assert built(log1) and not built(log2)
    assert second.cache_path == first.cache_path and build_id(second) == build_id(first)
    third = build(small_stdlib(tmp_path, max_docs=20), log=log3)
    assert built(log3) and third.cache_path != first.cache_path
    assert third.describe().startswith("stdlib: 20 files")


def test_half_written_cache_is_never_read(tmp_path):
    source = build(small_stdlib(tmp_path))
    path, old_id = source.cache_path, build_id(source)
    reference = source.global_batch(0)
    # A crash mid-build leaves a temporary directory behind ...
    leftover = path.parent / f".{path.name}.tmp-crashed"
    leftover.mkdir()
    (leftover / "train.bin").write_bytes(b"\x00" * 10)
    # ... and a directory without its completion marker must not count as a cache.
    (path / "meta.json").unlink()
    assert read_complete(path) is None
    log = []
    rebuilt = build(small_stdlib(tmp_path), log=log)
    assert built(log) and build_id(rebuilt) != old_id and not leftover.exists()
    assert torch.equal(rebuilt.global_batch(0).input_ids, reference.input_ids)
    # A truncated token file (marker present) is damaged, so it is rebuilt too.
    data = (path / "train.bin").read_bytes()
    (path / "train.bin").write_bytes(data[:len(data) // 2])
    assert read_complete(path) is None
    log = []
    build(small_stdlib(tmp_path), log=log)
    assert built(log) and read_complete(path) is not None


def _build_in_child(cache_dir, barrier, queue):
    """Runs in a spawned process: build the cache and report what it read."""
    try:
        barrier.wait()  # both processes are past their imports: the builds overlap for sure
        source = build(small_stdlib(cache_dir))
        tokens = (source.cache_path / "train.bin").read_bytes()
        queue.put((build_id(source), hashlib.sha256(tokens).hexdigest(),
                   source.global_batch(5).input_ids.numpy()))
    except BaseException:  # report instead of leaving the parent waiting for a result
        queue.put(traceback.format_exc())


def test_two_processes_building_at_once_agree(tmp_path):
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    errors = [r for r in results if isinstance(r, str)]
    assert not errors, errors[0]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (id_a, sha_a, batch_a), (id_b, sha_b, batch_b) = results
    assert id_a == id_b  # one process built, the other waited and read the same cache
    assert sha_a == sha_b and np.array_equal(batch_a, batch_b)
    assert not any(p.name.startswith(".") and p.is_dir() for p in tmp_path.iterdir())
