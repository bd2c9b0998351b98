"""Pre-tokenized sources (data/pretokenized.py): Megatron .bin/.idx, flat .npy/.bin token files
and input_ids columns (.arrow, .parquet, saved HF datasets) yield exactly the ids written,
document by document, without tokenizing or copying; bad inputs are one ConfigError naming the
file; the scan runs once and the cache holds only the index."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from support.megatron_writer import write_megatron
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import SourceConfig
from ulysses_train.data import pretokenized
from ulysses_train.data.pretokenized import open_token_documents

RNG = np.random.default_rng(0)
# document lengths include 0 (an empty document) and one longer than a scan chunk in the
# chunked-scan test
DOCS = [list(RNG.integers(1, 500, size=n)) for n in (5, 1, 0, 17, 3, 40)]
EOS = 0  # flat files: never an id of DOCS


def open_docs(src, tmp_path, vocab=500, eos_id=None, log=None):
    return open_token_documents(src, where="data.sources[0]", vocab_limit=vocab, eos_id=eos_id,
                                cache_root=tmp_path / "cache", log=log or (lambda _: None),
                                is_main=True)


def documents(td) -> list[list[int]]:
    """All documents of a TokenDocuments, checking the interface's promises on the way."""
    out = []
    for tokens, offsets in td.parts:
        assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens)
        assert np.all(np.diff(offsets) >= 0) and not tokens.flags.writeable
        out += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert (td.n_docs, td.n_tokens) == (len(out), sum(map(len, out)))
    assert td.max_id == max((max(d) for d in out if d), default=-1)
    return out


def mapped_file(tokens: np.ndarray) -> str:
    """The file whose memory mapping holds `tokens`' data ("" if none: a copy in RAM)."""
    address = tokens.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi and len(fields) >= 6:
                return fields[5]
    return ""


def flat(docs):
    return [t for d in docs for t in [*d, EOS]]


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_megatron_yields_the_documents_written(tmp_path, dtype):
    # document 1 is two sequences; Megatron's document = its sequences back to back
    seqs = [[d] for d in DOCS]
    seqs[1] = [DOCS[3][:7], DOCS[3][7:]]
    want = [DOCS[0], DOCS[3], *DOCS[2:3], *DOCS[4:]]
    del seqs[3]
    write_megatron(tmp_path / "a", seqs, dtype=dtype)
    write_megatron(tmp_path / "b", [[DOCS[1]]], dtype=dtype)
    src = SourceConfig(kind="megatron", paths=[str(tmp_path / "a"), str(tmp_path / "b.idx")])
    td = open_docs(src, tmp_path)
    assert documents(td) == [*want, DOCS[1]]
    assert [mapped_file(t) for t, _ in td.parts] == [str(tmp_path / "a.bin"),
                                                     str(tmp_path / "b.bin")]
    assert all(t.dtype == np.dtype(dtype) for t, _ in td.parts)
    assert "megatron: 2 datasets" in td.label


def test_flat_npy_and_bin_split_after_each_eos(tmp_path):
    np.save(tmp_path / "a.npy", np.array(flat(DOCS[:3]), dtype=np.uint32))
    np.array([*flat(DOCS[3:5]), *DOCS[5]], dtype=np.uint16).tofile(tmp_path / "b.bin")
    src = SourceConfig(kind="tokens", paths=[str(tmp_path / "a.npy"), str(tmp_path / "b.bin")],
                       dtype="uint16")
    td = open_docs(src, tmp_path, eos_id=EOS)  # the tokenizer's EOS (src.eos_id = -1)
    # the EOS ends its document; the run after the last EOS is a last document
    assert documents(td) == [[*d, EOS] for d in DOCS[:5]] + [DOCS[5]]


def test_chunked_scan_and_max_docs(tmp_path, monkeypatch):
    monkeypatch.setattr(pretokenized, "SCAN_TOKENS", 8)  # documents cross chunk edges
    np.save(tmp_path / "a.npy", np.array(flat(DOCS[:4]), dtype=np.int64))
    np.save(tmp_path / "b.npy", np.array(flat(DOCS[4:]), dtype=np.int64))
    paths = [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]
    whole = open_docs(SourceConfig(kind="tokens", paths=paths, eos_id=EOS), tmp_path)
    assert documents(whole) == [[*d, EOS] for d in DOCS]
    for cap in (1, 2, 5):  # within a chunk and the first file; into the second file
        td = open_docs(SourceConfig(kind="tokens", paths=paths, eos_id=EOS, max_docs=cap),
                       tmp_path)
        assert documents(td) == [[*d, EOS] for d in DOCS[:cap]]
        assert len(td.parts) == 2  # one part per file, emptied past the cap


def _column_inputs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["x"] * len(DOCS),
                      "input_ids": pa.array(DOCS, type=pa.list_(pa.int32()))})
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink:  # IPC file format, 2 batches
        with pa.ipc.new_file(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=4):
                writer.write_batch(batch)
    pq.write_table(table, tmp_path / "p.parquet")
    ds = datasets.Dataset.from_dict({"input_ids": DOCS})  # int64 lists
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=2)  # 2 stream-format .arrow files
    return [str(tmp_path / n) for n in ("f.arrow", "p.parquet", "hf")]


def test_input_ids_columns(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    paths = _column_inputs(tmp_path)
    for path in paths:
        td = open_docs(SourceConfig(kind="tokens", paths=[path]), tmp_path)
        assert documents(td) == DOCS, path
        if not path.endswith(".parquet"):  # several record batches: one part each
            assert len(td.parts) > 1, path
        # the ids are used in place in a mapped Arrow file (for parquet: datasets' conversion)
        assert all(mapped_file(t).endswith(".arrow") for t, _ in td.parts), path
    td = open_docs(SourceConfig(kind="tokens", paths=paths, max_docs=8), tmp_path)
    assert documents(td) == (DOCS + DOCS)[:8]
    local = tmp_path / "hub_like"
    local.mkdir()
    os.replace(tmp_path / "p.parquet", local / "train.parquet")
    td = open_docs(SourceConfig(kind="tokens", hf_name=str(local)), tmp_path)
    assert documents(td) == DOCS


def test_sliced_and_fixed_size_list_chunks():
    """A chunk that is a slice of a bigger array (its offsets start past 0), and a fixed-size
    list column (Sequence(length=n) in datasets): the documents are the chunk's rows."""
    import pyarrow as pa

    from ulysses_train.data.token_columns import _chunk_part

    def rows(chunk):
        tokens, offsets = _chunk_part(chunk, "x", "k")
        return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]

    assert rows(pa.array(DOCS, type=pa.list_(pa.int32())).slice(3, 2)) == DOCS[3:5]
    fixed = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert rows(pa.array(fixed, type=pa.list_(pa.int64(), 3)).slice(1, 2)) == fixed[1:3]


def test_second_open_reads_the_index_and_the_cache_holds_no_tokens(tmp_path, monkeypatch):
    big = RNG.integers(1, 500, size=200_000).astype(np.uint16)
    big[::1000] = EOS
    big.tofile(tmp_path / "big.bin")
    write_megatron(tmp_path / "m", [[DOCS[0]], [DOCS[3]]])
    scans = []
    real = pretokenized._scan
    monkeypatch.setattr(pretokenized, "_scan", lambda *a: scans.append(1) or real(*a))
    for src in (SourceConfig(kind="tokens", paths=[str(tmp_path / "big.bin")], dtype="uint16",
                             eos_id=EOS),
                SourceConfig(kind="megatron", paths=[str(tmp_path / "m")])):
        lines = []
        first = documents(open_docs(src, tmp_path, log=lines.append))
        n = len(scans)
        assert n >= 1 and "indexed" in lines[-1]
        again = documents(open_docs(src, tmp_path, log=lines.append))
        assert len(scans) == n and "index cached" in lines[-1]  # no scan the second time
        assert again == first
        scans.clear()
    cached = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*") if f.is_file())
    assert cached < big.nbytes / 10  # the index (offsets, ~200 documents), not the tokens


def _error(src, tmp_path, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        open_docs(src, tmp_path, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_megatron_bad_inputs_name_the_file(tmp_path):
    mega = lambda p: SourceConfig(kind="megatron", paths=[str(p)])  # noqa: E731
    bin_, idx = write_megatron(tmp_path / "ok", [[DOCS[0]], [DOCS[3]]])
    os.remove(idx)
    msg = _error(mega(tmp_path / "ok"), tmp_path)
    assert msg.startswith("data.sources[0].paths:") and idx in msg and "not found" in msg
    bin_, idx = write_megatron(tmp_path / "cut", [[DOCS[0]], [DOCS[3]]])
    with open(bin_, "r+b") as f:
        f.truncate(os.path.getsize(bin_) - 2)
    assert bin_ in (msg := _error(mega(tmp_path / "cut"), tmp_path)) and "truncated" in msg
    bin_, idx = write_megatron(tmp_path / "long", [[DOCS[0]]])
    with open(bin_, "ab") as f:
        f.write(b"\0\0")
    assert "does not match its index" in (msg := _error(mega(tmp_path / "long"), tmp_path))
    bin_, idx = write_megatron(tmp_path / "short_idx", [[DOCS[0]], [DOCS[3]]])
    with open(idx, "r+b") as f:
        f.truncate(os.path.getsize(idx) - 8)
    assert idx in (msg := _error(mega(tmp_path / "short_idx"), tmp_path)) and "bytes" in msg
    write_megatron(tmp_path / "code", [[DOCS[0]]], code=9)
    assert "unknown dtype code 9" in _error(mega(tmp_path / "code"), tmp_path)
    write_megatron(tmp_path / "ver", [[DOCS[0]]], version=2)
    assert "version 2" in _error(mega(tmp_path / "ver"), tmp_path)
    bin_, _ = write_megatron(tmp_path / "big", [[DOCS[0]], [[3, 700, 2]]])
    msg = _error(mega(tmp_path / "big"), tmp_path)
    assert bin_ in msg and "700" in msg and "model.vocab_size" in msg


def test_flat_bad_inputs_name_the_file(tmp_path):
    raw = tmp_path / "t.bin"
    np.array(flat(DOCS), dtype=np.uint16).tofile(raw)
    msg = _error(SourceConfig(kind="tokens", paths=[str(raw)], eos_id=EOS), tmp_path)
    assert msg.startswith("data.sources[0].dtype:") and str(raw) in msg
    msg = _error(SourceConfig(kind="tokens", paths=[str(raw)], dtype="float32", eos_id=EOS),
                 tmp_path)
    assert msg.startswith("data.sources[0].dtype:") and "float32" in msg
    msg = _error(SourceConfig(kind="tokens", paths=[str(raw)], dtype="uint16"), tmp_path)
    assert msg.startswith("data.sources[0].eos_id:") and str(raw) in msg  # no tokenizer EOS
    with open(raw, "ab") as f:
        f.write(b"\1")
    msg = _error(SourceConfig(kind="tokens", paths=[str(raw)], dtype="uint16", eos_id=EOS),
                 tmp_path)
    assert str(raw) in msg and "truncated" in msg
    np.save(tmp_path / "v.npy", np.array([5, 9, EOS, 612, EOS], dtype=np.int32))
    msg = _error(SourceConfig(kind="tokens", paths=[str(tmp_path / "v.npy")], eos_id=EOS),
                 tmp_path)
    assert str(tmp_path / "v.npy") in msg and "612" in msg
    np.save(tmp_path / "neg.npy", np.array([5, -3, EOS], dtype=np.int16))
    msg = _error(SourceConfig(kind="tokens", paths=[str(tmp_path / "neg.npy")], eos_id=EOS),
                 tmp_path)
    assert str(tmp_path / "neg.npy") in msg and "-3" in msg


def test_column_bad_inputs_name_the_file(tmp_path):
    import pyarrow as pa

    path = tmp_path / "f.arrow"
    table = pa.table({"ids": pa.array([[1.0, 2.0]])})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    msg = _error(SourceConfig(kind="tokens", paths=[str(path)]), tmp_path)
    assert msg.startswith("data.sources[0].ids_field:") and str(path) in msg
    msg = _error(SourceConfig(kind="tokens", paths=[str(path)], ids_field="ids"), tmp_path)
    assert str(path) in msg and "not a list of integer" in msg


def test_cli_prints_one_error_line(tmp_path):
    """What the entry point does with the ConfigError: one `error:` line, no traceback."""
    write_megatron(tmp_path / "m", [[DOCS[0]]])
    os.remove(tmp_path / "m.bin")
    code = textwrap.dedent(f"""
        import sys
        from ulysses_train.config.errors import ConfigError
        from ulysses_train.config.schema import SourceConfig
        from ulysses_train.data.pretokenized import open_token_documents
        try:
            open_token_documents(SourceConfig(kind="megatron", paths=[{str(tmp_path / 'm')!r}]),
                                 where="data.sources[0]", vocab_limit=500, eos_id=None,
                                 cache_root={str(tmp_path / 'c')!r}, log=print, is_main=True)
        except ConfigError as e:
            print(f"error: {{e}}", file=sys.stderr)
            sys.exit(e.exit_code)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.sources[0].paths:")
    assert str(tmp_path / "m.bin") in lines[0]
