"""Cache builds shared by the processes of a node: the waiters tokenize shards of the build, the
lock holder assembles, and the result is the cache one process alone would have built, also
when a helper dies in the middle of its shard."""
import json
import multiprocessing as mp
import os
import signal
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from support.data import build, files_cfg
from ulysses_train.data.splits import SplitRule, assign_val

SHARD_BYTES = 3000  # ~20 shards of the corpus below


def _corpus(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    words = ["cats", "dogs", "seven", "numbers", "talk", "about", "the", "river", "light"]
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(300):
            text = " ".join(words[i] for i in rng.integers(0, len(words), rng.integers(1, 40)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def _cfg(tmp_path, corpus, tokenizer, cache):
    return files_cfg(tmp_path, [corpus], tokenizer_path=tokenizer, cache_dir=str(cache),
                     val_fraction=0.1)


def _child(role, tmp_path, corpus, tokenizer, cache, barrier, queue, claimed):
    """A rank of the node: `slow` tokenizes each shard slowly (so that the others get some),
    `waits` also holds its first shard until the killer has claimed one,
    `killer` dies in the middle of the first shard it claims, after the builder passed it by
    (so the builder must wait for that shard's lock and then do the shard itself)."""
    try:
        from ulysses_train.data import shards

        shards.SHARD_BYTES = SHARD_BYTES
        original = shards._tokenize_shard

        def slow(work, k, tok, dtype):
            # The first shard a process takes waits (<= 60 s) until another process has taken
            # one too: so that the others help even when they start late (under load).
            entered = Path(tmp_path) / "entered"
            entered.mkdir(exist_ok=True)
            (entered / str(os.getpid())).touch()
            deadline = time.monotonic() + 60
            while (role == "slow" and len(list(entered.iterdir())) < 2
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            time.sleep(0.15)
            original(work, k, tok, dtype)

        def waits(work, k, tok, dtype):  # holds its first shard until the killer has one
            deadline = time.monotonic() + 60
            while not Path(claimed).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            slow(work, k, tok, dtype)

        def killer(work, k, tok, dtype):
            (work / f"shard-{k:06d}.bin").write_bytes(b"\x01\x02\x03")  # a torn shard file
            Path(claimed).write_text(str(k))
            time.sleep(1.0)  # long enough for the builder to pass this shard by
            os.kill(os.getpid(), signal.SIGKILL)

        shards._tokenize_shard = {"slow": slow, "waits": waits, "killer": killer}[role]
        if barrier is not None:
            barrier.wait()
        log = []
        source = build(_cfg(Path(tmp_path), corpus, tokenizer, cache), log=log)
        queue.put((os.getpid(), str(source.cache_path), log))
    except BaseException:  # report instead of leaving the parent waiting
        queue.put(traceback.format_exc())


def _contents(path: Path) -> dict:
    """Every file's bytes, meta.json without what differs between any two builds."""
    files = {f.name: f.read_bytes() for f in path.iterdir() if f.name != "meta.json"}
    meta = json.loads((path / "meta.json").read_text())
    for key in ("build_id", "build_seconds", "meta_hash"):
        meta.pop(key)
    return {**files, "meta.json": meta}


def _results(queue, n):
    results = [queue.get(timeout=120) for _ in range(n)]
    errors = [r for r in results if isinstance(r, str)]
    assert not errors, errors[0]
    return results


def test_ranks_share_the_build_and_agree_with_one_process(tmp_path, spm_tokenizer):
    corpus, tokenizer = _corpus(tmp_path), str(spm_tokenizer)
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(3)
    args = (str(tmp_path), corpus, tokenizer, tmp_path / "shared", barrier, queue, "")
    procs = [ctx.Process(target=_child, args=("slow", *args)) for _ in range(3)]
    for p in procs:
        p.start()
    results = _results(queue, 3)
    for p in procs:
        p.join(timeout=60)
    builders = [(pid, log) for pid, _, log in results if any("tokenizing" in x for x in log)]
    assert len(builders) == 1  # one lock holder assembled and published
    pid, log = builders[0]
    helped = [x for x in log if "shards tokenized by other processes" in x]
    others = {p for p, _, _ in results} - {pid}
    assert helped and any(str(p) in helped[0] for p in others), log
    assert len({path for _, path, _ in results}) == 1

    alone = build(_cfg(tmp_path, corpus, tokenizer, tmp_path / "alone"))
    shared = Path(results[0][1])
    assert _contents(shared) == _contents(alone.cache_path)
    leftovers = [p.name for p in shared.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_a_helper_killed_mid_shard_leaves_an_identical_cache(tmp_path, spm_tokenizer):
    corpus, tokenizer = _corpus(tmp_path), str(spm_tokenizer)
    ctx = mp.get_context("spawn")
    queue, cache, claimed = ctx.Queue(), tmp_path / "shared", tmp_path / "claimed"
    args = (str(tmp_path), corpus, tokenizer, cache, None, queue, str(claimed))
    builder = ctx.Process(target=_child, args=("waits", *args))
    builder.start()
    deadline = time.monotonic() + 60
    while not list(cache.glob(".*-work/plan.json")):  # the build's shards are open to help
        assert time.monotonic() < deadline and builder.is_alive()
        time.sleep(0.02)
    helper = ctx.Process(target=_child, args=("killer", *args))
    helper.start()
    helper.join(timeout=60)
    assert helper.exitcode == -signal.SIGKILL and claimed.exists()  # died holding a shard
    (pid, path, log), = _results(queue, 1)
    builder.join(timeout=60)
    assert pid == builder.pid and not any("other processes" in x for x in log)
    alone = build(_cfg(tmp_path, corpus, tokenizer, tmp_path / "alone"))
    assert _contents(Path(path)) == _contents(alone.cache_path)


def _whole_array_rule(hashes, fraction):
    """The split as the build computed it before it streamed (numpy over all documents)."""
    is_val = hashes < fraction
    if fraction > 0 and not is_val.any() and len(hashes) >= 2:
        is_val[np.argmin(hashes)] = True
    if is_val.all():
        is_val[np.argmax(hashes)] = False
    return is_val


def test_the_split_rule_learned_in_pieces_is_the_whole_arrays_rule():
    """The build learns the split shard by shard; the exceptions (no validation document, no
    train document) must land on the same document as over the whole array."""
    rng = np.random.default_rng(1)
    for fraction, hashes in ((0.001, rng.random(50) * 0.5 + 0.4),  # none below: one made val
                             (0.999, rng.random(50) * 0.5),  # all below: one kept for train
                             (0.2, rng.random(50))):
        hashes[[12, 31]] = hashes.min() if fraction < 0.01 else hashes.max()  # equal extremes
        rule = SplitRule(fraction)
        pieces = np.split(hashes, [9, 10, 30])
        for piece in pieces:
            rule.add(piece)
        starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        got = np.concatenate([rule.is_val(p, s) for p, s in zip(pieces, starts)])
        expected = _whole_array_rule(hashes, fraction)
        assert got.tolist() == expected.tolist() and rule.n_val == expected.sum()
        assert assign_val(hashes, np.ones(len(hashes), bool), fraction).tolist() == got.tolist()


@pytest.mark.parametrize("kind", ["spm", "hf"])  # hf: a BOS before every document
def test_small_encode_batches_and_assemble_blocks_build_the_same_cache(tmp_path, monkeypatch,
                                                                       kind, request):
    """The build bounds its memory by encoding in batches and assembling in blocks of a shard;
    where those cut must not show in the cache."""
    from ulysses_train.data import shards, splits

    corpus = _corpus(tmp_path)
    tokenizer = str(request.getfixturevalue(f"{kind}_tokenizer"))
    whole = build(_cfg(tmp_path, corpus, tokenizer, tmp_path / "whole"))  # one block per shard
    monkeypatch.setattr(shards, "BATCH_BYTES", 50)
    monkeypatch.setattr(shards, "BATCH_DOCS", 3)
    monkeypatch.setattr(splits, "BLOCK_TOKENS", 7)
    monkeypatch.setattr(shards, "SHARD_BYTES", SHARD_BYTES)
    cut = build(_cfg(tmp_path, corpus, tokenizer, tmp_path / "cut"))
    assert (whole.bos_id is None) == (kind == "spm")
    assert _contents(cut.cache_path) == _contents(whole.cache_path)


def test_ranges_cover_the_items_in_order_within_their_bounds():
    from ulysses_train.data.shards import ranges

    rng = np.random.default_rng(2)
    for limit, max_count in ((10, 0), (10, 3), (1000, 4), (1, 0)):
        sizes = rng.integers(0, 25, 200)
        got = ranges(sizes, limit, max_count)
        assert [a for a, _ in got] == [0, *(b for _, b in got[:-1])] and got[-1][1] == len(sizes)
        for a, b in got:
            assert b > a and (not max_count or b - a <= max_count)
            assert sizes[a:b].sum() <= limit + sizes[b - 1]  # starts within one window
        if not max_count and limit > 1:  # and a range ends only where a window does
            starts = np.cumsum(sizes) - sizes
            assert all(starts[b] // limit != starts[b - 1] // limit for _, b in got[:-1])


def _peak_python_bytes(tmp_path, n_docs: int, tokenizer: str, run: str) -> int:
    """tracemalloc's peak (Python objects and numpy arrays) of one build of `n_docs` documents
    in shards of 20 kB (so the shard count grows with the corpus, not the shard size; ~500
    documents each, so the few kB of cyclic garbage np.load leaves per shard until the next
    collection stay far below the bound)."""
    import tracemalloc

    from ulysses_train.data.build import build_corpus
    from ulysses_train.data.corpus import corpus_for

    path = tmp_path / f"docs-{n_docs}.jsonl"
    rng = np.random.default_rng(0)
    words = ["cats", "dogs", "seven", "numbers", "talk", "about", "the", "river", "light"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 6))}) + "\n"
                            for _ in range(n_docs)))
    out = tmp_path / f"out-{run}"
    out.mkdir()
    corpus = corpus_for(_cfg(tmp_path, path, tokenizer, tmp_path / "cache"))
    tracemalloc.start()
    try:
        build_corpus(out, corpus, key="k", vocab_size=0, tokenizer_path=tokenizer,
                     sample_bytes=0, val_fraction=0.1, log=lambda _: None,
                     shard_bytes=20000)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_build_memory_does_not_grow_with_the_corpus(tmp_path, spm_tokenizer):
    """Issue 23: beyond the per-document index (<= 16 bytes per document), the build's memory
    is per shard or constant. Python-level (tracemalloc), which is where per-document data
    would be kept; the process's RssAnon at 100 / 300 MB is scripts/bench_cache_build.py's."""
    peaks = [_peak_python_bytes(tmp_path, n, str(spm_tokenizer), run)
             for run, n in (("warm-up", 300), ("small", 1000), ("large", 4000))]
    small, large = peaks[1:]  # the warm-up's peak has the first calls' one-time allocations
    assert large - small <= 16 * 3000, (small, large)
