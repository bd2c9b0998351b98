"""Tokenizers: a Hugging Face tokenizer.json and a sentencepiece .model behind one interface.

Fixtures are real-format files built locally (tokenizer_fixtures.py). Each test names the
requirement it holds: encode parity with the libraries themselves, BOS/EOS from the tokenizer's
own configs, packing with them, the cache key and identity following the tokenizer's files, the
size check against model.vocab_size, and the default from model.init_from.
"""
import json

import pytest

from support.data import build, files_cfg, small_stdlib
from support.tokenizers import (
    BOS,
    EOS,
    SAMPLE,
    copy_tree,
    make_hf_tokenizer,
    stdlib_texts,
)
from ulysses_train.config.errors import ConfigError
from ulysses_train.data.cache import load_split, read_complete
from ulysses_train.data.tokenizer import open_tokenizer
from ulysses_train.data.tokenizer_files import locate

TEXTS = [SAMPLE, "", " leading space", *(t[:3000] for t in stdlib_texts(3, skip=200))]


def test_encode_equals_the_libraries_own(hf_tokenizer, spm_tokenizer):
    import sentencepiece as spm
    from tokenizers import Tokenizer

    ours = open_tokenizer(str(hf_tokenizer))
    theirs = Tokenizer.from_file(str(hf_tokenizer))
    theirs.encode_special_tokens = True  # SAMPLE's <|end_of_text|> is text (test_special_strings)
    assert ours.encode_batch(TEXTS) == [e.ids for e in theirs.encode_batch(
        TEXTS, add_special_tokens=False)]
    assert ours.vocab_size == theirs.get_vocab_size() == 600
    sp = spm.SentencePieceProcessor(model_file=str(spm_tokenizer))
    assert open_tokenizer(str(spm_tokenizer)).encode_batch(TEXTS) == sp.encode(TEXTS)


def test_bos_and_eos_come_from_the_tokenizers_configs(tmp_path, hf_tokenizer, spm_tokenizer):
    tok = open_tokenizer(str(hf_tokenizer))
    # tokenizer_config.json names both; no add_bos_token: the post-processor adds BOS, as Llama 3's.
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (tok.token_to_id(BOS), tok.token_to_id(EOS),
                                                     True)
    spm_tok = open_tokenizer(str(spm_tokenizer))  # no config: the model's own ids
    assert (spm_tok.bos_id, spm_tok.eos_id, spm_tok.add_bos) == (None, 1, False)

    folder = copy_tree(hf_tokenizer.parent, tmp_path / "swapped")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": EOS}, "eos_token": BOS, "add_bos_token": False}))
    swapped = open_tokenizer(str(folder / "tokenizer.json"))
    assert (swapped.bos_id, swapped.eos_id, swapped.add_bos) == (tok.eos_id, tok.bos_id, False)

    (folder / "tokenizer_config.json").unlink()  # special_tokens_map.json is the next source
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": BOS}))
    assert open_tokenizer(str(folder / "tokenizer.json")).eos_id == tok.bos_id


@pytest.mark.parametrize("config, needs", [
    ({"eos_token": None}, "no EOS token"),  # a tokenizer.json alone has none to fall back on
    ({"eos_token": "<|eot_id|>"}, "not in the vocabulary"),
    ({"bos_token": None, "add_bos_token": True}, "no bos_token"),
])
def test_unusable_special_tokens_are_one_line_errors(tmp_path, hf_tokenizer, config, needs):
    folder = copy_tree(hf_tokenizer.parent, tmp_path / "bad")
    base = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in {**base, **config}.items() if v is not None}))
    with pytest.raises(ConfigError) as info:
        open_tokenizer(str(folder / "tokenizer.json"))
    assert info.value.key == "data.tokenizer_path" and needs in info.value.message
    assert "\n" not in info.value.message


def test_a_file_the_tokenizers_library_cannot_read_is_a_one_line_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": "not a tokenizer"}')
    with pytest.raises(ConfigError) as info:
        open_tokenizer(str(tmp_path / "tokenizer.json"))
    assert info.value.key == "data.tokenizer_path"
    assert "is not a Hugging Face tokenizer.json" in info.value.message
    assert "\n" not in info.value.message


def _documents(source) -> list[list[int]]:
    """The train split's documents as written into the cache, in stream order."""
    tokens, offsets = load_split(source.cache_path, read_complete(source.cache_path), "train")
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


@pytest.mark.parametrize("add_bos", [None, False], ids=["post-processor-bos", "no-bos"])
def test_documents_are_packed_with_the_tokenizers_bos_and_eos(tmp_path, hf_tokenizer, add_bos):
    folder = copy_tree(hf_tokenizer.parent, tmp_path / "tok")
    if add_bos is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["add_bos_token"] = add_bos
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    texts = [t[:2000] for t in stdlib_texts(4, skip=100)]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(text)
    source = build(files_cfg(tmp_path, paths, tokenizer_path=str(folder), val_fraction=0.0))
    tok = open_tokenizer(str(folder / "tokenizer.json"))
    bos = [tok.bos_id] if tok.add_bos else []
    expected = sorted(bos + ids + [tok.eos_id] for ids in tok.encode_batch(texts))
    assert sorted(_documents(source)) == expected
    assert source.bos_id == (tok.bos_id if add_bos is None else None)
    assert source.eos_id == tok.eos_id and source.vocab_size == 600


def test_cache_key_and_identity_follow_the_tokenizer_files(tmp_path, hf_tokenizer):
    cache = tmp_path / "cache"
    first = build(small_stdlib(cache, tokenizer_path=str(hf_tokenizer), max_docs=10))
    moved = copy_tree(hf_tokenizer.parent, tmp_path / "moved")  # same bytes elsewhere: same cache
    again = build(small_stdlib(cache, tokenizer_path=str(moved), max_docs=10))
    assert again.cache_path == first.cache_path
    assert again.identity["data.tokenizer"] == first.identity["data.tokenizer"]
    assert sorted(p.name for p in first.cache_path.glob("tokenizer*")) == [
        "tokenizer.json", "tokenizer_config.json"]

    config = json.loads((moved / "tokenizer_config.json").read_text())  # a config-only change
    (moved / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    other_config = build(small_stdlib(cache, tokenizer_path=str(moved), max_docs=10))
    retrained = build(small_stdlib(cache, max_docs=10, tokenizer_path=str(make_hf_tokenizer(
        tmp_path / "retrained", vocab_size=700))))
    paths = {s.cache_path for s in (first, other_config, retrained)}
    identities = {s.identity["data.tokenizer"] for s in (first, other_config, retrained)}
    assert len(paths) == 3 and len(identities) == 3


def test_a_tokenizer_larger_than_model_vocab_size_is_refused(tmp_path, hf_tokenizer):
    cfg = small_stdlib(tmp_path / "cache", tokenizer_path=str(hf_tokenizer), max_docs=10)
    with pytest.raises(ConfigError) as info:  # 600 ids, 599 unpadded rows (640 padded)
        build_from(tmp_path, cfg, model_vocab_size=640, max_tokenizer_vocab=599)
    assert info.value.key == "data.tokenizer_path" and "has 600 ids" in info.value.message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert build(cfg, vocab=4096).vocab_size == 600  # a model vocab above the tokenizer's: fine


def test_the_default_is_the_tokenizer_of_model_init_from(tmp_path, hf_tokenizer, spm_tokenizer):
    log = []
    hf_dir = copy_tree(hf_tokenizer.parent, tmp_path / "hf_model")
    (hf_dir / "tokenizer.model").write_bytes(spm_tokenizer.read_bytes())  # both: the fast one
    assert locate("", str(hf_dir), log.append) == str(hf_dir / "tokenizer.json")
    assert "model.init_from" in log[-1]
    run = tmp_path / "run"  # one of our run dirs, and a step dir of it: the run's tokenizer/
    copy_tree(spm_tokenizer.parent, run / "tokenizer")
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    for init_from in (run, run / "checkpoints" / "step_00000002"):
        assert locate("", str(init_from), log.append) == str(run / "tokenizer" / "tokenizer.model")
    with pytest.raises(ConfigError) as info:  # none there: never a new tokenizer for old weights
        locate("", str(tmp_path / "checkpoints"), log.append)
    assert info.value.key == "data.tokenizer_path" and "has no tokenizer files" in info.value.message
    explicit = locate(str(spm_tokenizer), str(hf_dir), log.append)
    assert explicit == str(spm_tokenizer)  # data.tokenizer_path wins over model.init_from
    assert locate(str(hf_dir), "", log.append) == str(hf_dir / "tokenizer.json")  # a directory

    source = build_from(tmp_path, small_stdlib(tmp_path / "cache", max_docs=10),
                        init_from=str(hf_dir))
    given = build(small_stdlib(tmp_path / "cache", tokenizer_path=str(hf_tokenizer), max_docs=10))
    assert source.identity == given.identity


def build_from(tmp_path, cfg, **kwargs):
    """build_data with keyword arguments the data_helpers.build shortcut does not pass."""
    from ulysses_train.data import build_data

    return build_data(cfg, seed=0, global_batch_size=6, log=lambda _: None,
                      **{"model_vocab_size": 1024, **kwargs})


def test_a_directory_without_a_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        locate(str(tmp_path), "", print)
    assert info.value.key == "data.tokenizer_path" and "holds neither" in info.value.message


def _train_args(tmp_path, tokenizer):
    from support.common import SMALL

    keep = [a for a in SMALL if not a.startswith(("data", "model.vocab_size"))]
    values = {"data": "stdlib", "data.max_docs": 10, "data.seq_len": 32, "model.vocab_size": 600,
              "data.tokenizer_path": tokenizer, "train.steps": 2,
              "data.cache_dir": tmp_path / "cache", "hydra.run.dir": tmp_path / "run"}
    return keep + [f"{k}={v}" for k, v in values.items()]


def test_train_py_on_a_tokenizer_json_end_to_end(tmp_path, hf_tokenizer):
    """Two steps of train.py on a tokenizer.json; the run keeps its tokenizer, and its
    checkpoint records the tokenizer's identity; resuming after the tokenizer changed is refused
    (in process: the one-line report of a ConfigError is cli/job.py's, tested there)."""
    from support.common import metrics_rows, run_train, small_config
    from ulysses_train.train.trainer import run

    folder = copy_tree(hf_tokenizer.parent, tmp_path / "tok")
    result = run_train(_train_args(tmp_path, folder / "tokenizer.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics_rows(tmp_path / "run")] == [1, 2]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "run" / "tokenizer" / name).read_bytes() == (folder / name).read_bytes()
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    meta = json.loads((step / "meta.json").read_text())
    identity = open_tokenizer(str(folder / "tokenizer.json")).identity()
    assert meta["identity"]["data"]["data.tokenizer"] == identity

    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    cfg = small_config(data={"name": "stdlib", "max_docs": 10, "seq_len": 32,
                             "tokenizer_path": str(folder / "tokenizer.json"),
                             "cache_dir": str(tmp_path / "cache")},
                       model={"vocab_size": 600}, train={"steps": 3})
    with pytest.raises(ConfigError) as info:
        run(cfg, str(tmp_path / "run"))
    assert info.value.key == "data.tokenizer_path"
    assert info.value.message.startswith("the tokenizer differs")
    cfg.model.vocab_size = 599  # a new run: the size check, before the cache is built
    with pytest.raises(ConfigError) as info:
        run(cfg, str(tmp_path / "other_run"))
    assert info.value.key == "data.tokenizer_path"
    assert "has 600 ids but model.vocab_size is 599" in info.value.message
