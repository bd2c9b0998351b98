"""The stdlib corpus: which files, how they split, how bad bytes and text survive tokenization."""
import os
import sysconfig

import numpy as np

from ulysses_train.data.build import assign_val
from ulysses_train.data.cache import load_split
from ulysses_train.data.corpus import decode_utf8, stable_hash, stdlib_files
from ulysses_train.data.tokenizer import load_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]


def test_files_exclude_installed_packages_and_caches(tmp_path):
    for rel in ("b.py", "a.py", "pkg/c.py", "site-packages/x.py", "pkg/dist-packages/y.py",
                "__pycache__/z.py", "pkg/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert stdlib_files(str(tmp_path)) == ["a.py", "b.py", "pkg/c.py"]
    real = stdlib_files(STDLIB)
    assert "os.py" in real and real == sorted(real)
    assert not any("site-packages" in p or "dist-packages" in p for p in real)


def test_split_is_by_file_stable_and_independent_of_the_rest():
    assert stable_hash(b"os.py") == 0.9680117810747945  # sha1-based: same in every process
    files = stdlib_files(STDLIB)[:200]
    hashes = np.array([stable_hash(p.encode()) for p in files])
    everything = assign_val(hashes, np.ones(200, bool), 0.1)
    assert 5 <= everything.sum() <= 40
    fewer = assign_val(hashes[:100], np.ones(100, bool), 0.1)  # like a smaller max_docs
    assert np.array_equal(fewer, everything[:100])


def test_small_corpora_still_get_one_val_and_one_train_document():
    hashes = np.array([0.9, 0.5, 0.7, 0.3])
    nonempty = np.array([True, True, True, False])
    assert assign_val(hashes, nonempty, 0.01).tolist() == [False, True, False, False]
    assert not assign_val(hashes, nonempty, 0.0).any()
    assert assign_val(hashes, nonempty, 0.95).tolist() == [False, True, True, False]
    assert not assign_val(hashes[:1], nonempty[:1], 0.5).any()  # one document: train keeps it


def test_non_utf8_bytes_are_replaced_and_counted():
    data = b"ok \xff\xfe then \xe2\x82 end \xf0\x9f\x9a"  # 1 + 1 + 2 + 3 bad bytes
    text, bad = decode_utf8(data)
    assert text == data.decode("utf-8", errors="replace")
    assert bad == 7
    assert decode_utf8("fine ü".encode()) == ("fine ü", 0)


def test_tokenizer_round_trips_text(stdlib_source):
    sp = load_tokenizer(str(stdlib_source.cache_path / "tokenizer.model"))
    with open(os.path.join(STDLIB, "os.py"), encoding="utf-8") as f:
        code = f.read()
    odd = ("tabs\tand  double  spaces\r\n  trailing  \n\n", "ünïcödé 漢字 🚀 \x07 ☃")
    for text in (code, *odd):
        assert sp.decode(sp.encode(text)) == text
    assert stdlib_source.eos_id == sp.eos_id() and stdlib_source.vocab_size == sp.get_piece_size()


def test_cached_stream_holds_every_train_file_in_order(stdlib_source):
    """Decoding the flat stream document by document gives back the train files, EOS after each."""
    import json

    path = stdlib_source.cache_path
    meta = json.loads((path / "meta.json").read_text())
    tokens, offsets = load_split(path, meta, "train")
    files = stdlib_files(STDLIB)[:30]
    texts = [decode_utf8(open(os.path.join(STDLIB, p), "rb").read())[0] for p in files]
    nonempty = np.array([len(t) > 0 for t in texts])
    is_val = assign_val(np.array([stable_hash(p.encode()) for p in files]), nonempty, 0.2)
    train = [t for t, keep in zip(texts, nonempty & ~is_val) if keep]
    assert len(offsets) == len(train) + 1 == meta["n_docs"]["train"] + 1
    sp = load_tokenizer(str(path / "tokenizer.model"))
    for i, text in enumerate(train):
        doc = tokens[offsets[i]:offsets[i + 1]].tolist()
        assert doc[-1] == stdlib_source.eos_id and stdlib_source.eos_id not in doc[:-1]
        assert sp.decode(doc[:-1]) == text
