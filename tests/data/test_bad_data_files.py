"""Every problem with a data file is named with its file and its reason; what can be skipped is
skipped with one warning line per file.

Before: an empty .jsonl among data.paths stopped the whole run with "cannot read <file>:" and
nothing after the colon (datasets' json reader raised a bare StopIteration); rows without the
text field, or with it null, became empty documents silently; a text field holding a number was
str()-ed into a document; data.max_docs restarted at every file.
"""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support.common import run_train
from support.data import build, files_cfg
from ulysses_train.config.errors import ConfigError

DOCS = [{"text": f"Document {i} is about {'cats' if i % 2 else 'dogs'}, number {i * 7}. " * 3}
        for i in range(30)]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def warnings_of(log):
    return [line for line in log if line.startswith("warning:")]


def test_empty_files_are_skipped_with_one_warning_each(tmp_path):
    good = jsonl(tmp_path / "good.jsonl", DOCS)
    empties = [tmp_path / name for name in ("empty.jsonl", "blank.jsonl", "empty.txt",
                                            "empty.parquet")]
    empties[0].write_text("")
    empties[1].write_text("\n  \n")  # only blank lines: no rows either
    empties[2].write_text("")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empties[3])
    log = []
    source = build(files_cfg(tmp_path, [good, *empties]), vocab=512, log=log)
    assert source.describe().startswith("files: 30 documents")
    assert warnings_of(log) == [f"warning: data: {p}: empty file (skipped)" for p in empties]


def test_rows_without_text_are_counted_per_file_and_reported_again_from_the_cache(tmp_path):
    rows = list(DOCS)
    rows[3], rows[5], rows[8] = {"body": "x"}, {"text": None}, {"id": 8}
    mixed = jsonl(tmp_path / "mixed.jsonl", rows)
    nulls = jsonl(tmp_path / "nulls.jsonl", [{"text": None}, {"text": ""}])
    missing = jsonl(tmp_path / "missing.jsonl", DOCS[:4] + [{"title": "no body"}])
    expected = [f"warning: data: {mixed}: 3 of 30 rows: 2 without 'text', 1 with 'text' null "
                "(skipped)",
                f"warning: data: {nulls}: no text in its 2 rows; 1 of 2 rows with 'text' null "
                "(skipped)",
                f"warning: data: {missing}: 1 of 5 rows without 'text' (skipped)"]
    cfg = files_cfg(tmp_path, [mixed, nulls, missing])
    for _ in range(2):  # built, then opened from the cache: the same report
        log = []
        source = build(cfg, vocab=512, log=log)
        assert warnings_of(log) == expected
        assert source.describe().startswith("files: 32 documents")  # 27 + 1 empty text + 4


def test_max_docs_counts_documents_across_files(tmp_path):
    first = jsonl(tmp_path / "a.jsonl", DOCS[:10])
    second = jsonl(tmp_path / "b.jsonl", [{"other": 1}] + DOCS[10:])  # a skipped row: not counted
    source = build(files_cfg(tmp_path, [first, second], max_docs=14), vocab=512)
    assert source.describe().startswith("files: 14 documents")


def test_json_array_file_is_read(tmp_path):
    array = tmp_path / "docs.json"
    array.write_text(json.dumps(DOCS[:12]))
    assert build(files_cfg(tmp_path, [array]), vocab=512).describe().startswith(
        "files: 12 documents")


def _bad_input(tmp_path, case):
    """(path of the bad file, key, message fragment) for one way a data file can be wrong."""
    suffix = ".parquet" if case.startswith("parquet") else ".json" if "array" in case else ".jsonl"
    path = tmp_path / f"bad{suffix}"
    lines = [json.dumps(r) for r in DOCS[:3]]
    if case == "invalid-json":
        path.write_text("\n".join(lines[:2] + ['{"text": "unterminated'] + lines[2:]) + "\n")
        return path, "data.paths", (f"{path} line 3 is not valid JSON: Unterminated string "
                                    "starting at (column 10)")
    if case == "not-an-object":
        path.write_text("\n".join(lines[:1] + ['["a", "list"]']) + "\n")
        return path, "data.paths", f"{path} line 2 is a JSON list, not an object"
    if case == "number-text":
        path.write_text("\n".join(lines[:1] + ['{"text": 42}']) + "\n")
        return path, "data.text_field", f"{path} line 2: 'text' holds an int (42), not text"
    if case == "no-row-has-field":
        jsonl(path, [{"body": "a", "id": 1}, {"body": "b"}])
        return path, "data.text_field", (f"{path}: none of its 2 rows has a 'text' field (the "
                                         "first row's fields: body, id)")
    if case == "json-array-invalid":
        path.write_text('[{"text": "a"},\n {"text": }]')
        return path, "data.paths", f"{path}: invalid JSON at line 2 column 11"
    if case == "parquet-unreadable":
        path.write_bytes(b"PAR1 but not really")
        return path, "data.paths", f"cannot read {path}: "
    if case == "parquet-no-column":
        pq.write_table(pa.table({"body": ["a"], "id": [1]}), path)
        return path, "data.text_field", f"{path} has no column 'text' (columns: body, id)"
    assert case == "parquet-not-text"
    pq.write_table(pa.table({"text": np.arange(3)}), path)
    return path, "data.text_field", f"{path}: column 'text' holds int64, not text"


BAD = ["invalid-json", "not-an-object", "number-text", "no-row-has-field", "json-array-invalid",
       "parquet-unreadable", "parquet-no-column", "parquet-not-text"]


@pytest.mark.parametrize("case", BAD)
def test_bad_file_names_the_file_and_the_reason(tmp_path, case):
    good = jsonl(tmp_path / "good.jsonl", DOCS)
    path, key, fragment = _bad_input(tmp_path, case)
    with pytest.raises(ConfigError) as info:
        build(files_cfg(tmp_path, [good, path]), vocab=512)
    assert info.value.key == key and fragment in info.value.message, info.value.message
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # nothing half-built left behind


def test_a_corpus_of_empty_inputs_is_an_error_naming_them(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nulls = jsonl(tmp_path / "nulls.jsonl", [{"text": None}])
    with pytest.raises(ConfigError) as info:
        build(files_cfg(tmp_path, [empty, nulls]), vocab=512)
    assert info.value.key == "data.paths"
    assert info.value.message.startswith(
        f"files: no text in 2 inputs ({empty}: empty file; {nulls}: no text in its 1 rows")


def _flip_an_offset(cache_dir):
    """One cached offset made smaller than its predecessor; the file keeps its size."""
    (path,) = cache_dir.glob("files-*/train_offsets.npy")
    offsets = np.load(path)
    offsets[len(offsets) // 2] = offsets[len(offsets) // 2 - 1] - 1
    np.save(path, offsets)


def test_train_py_skips_an_empty_file_and_survives_a_damaged_cache(small_args, tmp_path):
    """The issue's base command: a .jsonl and an empty .jsonl, then the same with a damaged
    cache, through `python train.py` as a user runs it. (A bad file ends in one `error:` line
    and exit 2 like any build-time ConfigError: test_entrypoint's corrupt-data-file case.)"""
    good = jsonl(tmp_path / "a.jsonl", DOCS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [a for a in small_args if a != "data=synthetic"] + [
        "data=files", "train.steps=1", "model.vocab_size=512", "data.seq_len=16"]
    first = run_train(args + [f"data.paths=[{good},{empty}]"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"warning: data: {empty}: empty file (skipped)\n" in first.stdout
    _flip_an_offset(tmp_path / "cache")
    again = run_train(args + [f"data.paths=[{good},{empty}]", f"hydra.run.dir={tmp_path / 'b'}"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stdout + again.stderr
    assert "train_offsets.npy does not match its checksum; rebuilding it" in again.stdout
