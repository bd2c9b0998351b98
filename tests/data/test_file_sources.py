"""data=files (.txt / .jsonl / .parquet) and data=hf (streamed; tested offline on a local dir)."""
import json

import pytest
import torch

from support.data import LINES, build, files_cfg, write_inputs
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import DataConfig
from ulysses_train.data.cache import load_split
from ulysses_train.data.tokenizer import load_tokenizer


def test_txt_jsonl_and_parquet_documents(tmp_path):
    txt, jsonl, parquet = write_inputs(tmp_path)
    source = build(files_cfg(tmp_path, [txt, jsonl, parquet], text_field="body"), vocab=512)
    summary = source.describe()
    assert summary.startswith("files: 81 documents (1 with non-UTF-8 bytes, 2 bytes replaced)")
    assert source.vocab_size <= 512
    meta = json.loads((source.cache_path / "meta.json").read_text())
    sp = load_tokenizer(str(source.cache_path / "tokenizer.model"))
    docs = []
    for split in ("train", "val"):
        tokens, offsets = load_split(source.cache_path, meta, split)
        docs += [sp.decode(tokens[a:b - 1].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
    assert len(docs) == 81
    assert any("a bad byte: \ufffd\ufffd.\n" in doc for doc in docs)
    assert sorted(docs) == sorted([txt.read_bytes().decode("utf-8", "replace")]
                                  + LINES + [t.upper() for t in LINES])


def test_max_docs_caps_documents(tmp_path):
    _, jsonl, _ = write_inputs(tmp_path)
    source = build(files_cfg(tmp_path, [jsonl], text_field="body", max_docs=12,
                           val_fraction=0.3), vocab=512)
    assert source.describe().startswith("files: 12 documents")


@pytest.mark.parametrize("case", ["missing", "suffix", "directory", "field", "empty"])
def test_bad_inputs_name_the_key(tmp_path, case):
    txt, jsonl, _ = write_inputs(tmp_path)
    expect = {"missing": "data.paths", "suffix": "data.paths", "directory": "data.paths",
              "field": "data.text_field", "empty": "data.paths"}[case]
    if case == "missing":
        cfg = files_cfg(tmp_path, [txt, tmp_path / "nope.jsonl"])
    elif case == "suffix":
        (tmp_path / "table.csv").write_text("a,b\n")
        cfg = files_cfg(tmp_path, [tmp_path / "table.csv"])
    elif case == "directory":
        cfg = files_cfg(tmp_path, [tmp_path])
    elif case == "field":
        cfg = files_cfg(tmp_path, [jsonl])  # its text is under "body", not "text"
    else:
        (tmp_path / "empty.txt").write_text("")
        cfg = files_cfg(tmp_path, [tmp_path / "empty.txt"])
    with pytest.raises(ConfigError) as info:
        build(cfg, vocab=512)
    assert info.value.key == expect
    if case == "field":
        assert "'text'" in info.value.message and "body" in info.value.message
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # a failed build leaves nothing behind


def hf_dir(tmp_path):
    """A local dataset directory, as `datasets.load_dataset(dir)` reads it: two jsonl shards."""
    root = tmp_path / "my_dataset"
    root.mkdir()
    for shard in range(2):
        rows = [{"text": f"shard {shard} row {i}: " + LINES[i % 40] * 3} for i in range(30)]
        (root / f"part-{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_hf_streams_a_local_dataset_and_respects_max_docs(tmp_path):
    cfg = DataConfig(name="hf", hf_name=str(hf_dir(tmp_path)), max_docs=25, seq_len=16,
                     cache_dir=str(tmp_path / "cache"))
    source = build(cfg, vocab=512)
    assert source.describe().startswith(f"hf:{cfg.hf_name}: 25 documents")
    batch = source.global_batch(0)
    assert batch.shape == (6, 16) and int(batch.input_ids.max()) < source.vocab_size
    again = build(cfg, vocab=512)
    assert torch.equal(again.global_batch(3).input_ids, source.global_batch(3).input_ids)
    cfg.max_docs = 0  # all of it
    assert build(cfg, vocab=512).describe().startswith(f"hf:{cfg.hf_name}: 60 documents")


def test_hf_load_failure_and_missing_field_name_their_keys(tmp_path):
    missing = DataConfig(name="hf", hf_name=str(tmp_path / "no_such_dataset"),
                         cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as info:
        build(missing, vocab=512)
    assert info.value.key == "data.hf_name"
    wrong_field = DataConfig(name="hf", hf_name=str(hf_dir(tmp_path)), text_field="content",
                             cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as info:
        build(wrong_field, vocab=512)
    assert info.value.key == "data.text_field"


def test_a_single_document_leaves_nothing_for_validation(tmp_path):
    txt, _, _ = write_inputs(tmp_path)
    with pytest.raises(ConfigError) as info:
        build(files_cfg(tmp_path, [txt], seq_len=4), vocab=512)
    assert info.value.key == "data.val_fraction"
    source = build(files_cfg(tmp_path, [txt], seq_len=4, val_fraction=0.0), vocab=512)
    assert source.splits == ("train",) and source.global_batch(0).shape == (6, 4)
