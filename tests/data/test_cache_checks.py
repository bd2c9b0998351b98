"""A damaged token cache is found by its checksums and rebuilt with one warning, never read.

Each case damages one cached artifact the way a bad disk or a stray write would, keeping the
file's size where that makes the damage invisible to a size check. Without checksums the changed
offset ended in `ValueError: doc_offsets must be non-decreasing` (a traceback), and the changed
tokenizer model or token value was read silently.
"""
import json

import numpy as np
import pytest
import torch

from support.data import build, files_cfg, write_inputs
from ulysses_train.config.errors import ConfigError
from ulysses_train.data import cache
from ulysses_train.data.cache import check_cache


def _flip_offset(path):
    """One offset set below its predecessor; same dtype and count, so the same file size."""
    offsets = np.load(path / "train_offsets.npy")
    offsets[len(offsets) // 2] = offsets[len(offsets) // 2 - 1] - 1
    np.save(path / "train_offsets.npy", offsets)
    return "train_offsets.npy does not match its checksum"


def _truncate_tokens(path):
    data = (path / "train.bin").read_bytes()
    (path / "train.bin").write_bytes(data[:len(data) // 2])
    return "train.bin has"


def _change_token(path):
    """One token id changed in place: still a valid id, so only a content hash can tell."""
    tokens = bytearray((path / "train.bin").read_bytes())
    tokens[len(tokens) // 2] ^= 0x01
    (path / "train.bin").write_bytes(bytes(tokens))
    return "train.bin does not match its checksum"


def _corrupt_tokenizer(path):
    model = bytearray((path / "tokenizer.model").read_bytes())
    model[len(model) // 2: len(model) // 2 + 16] = b"\xff" * 16
    (path / "tokenizer.model").write_bytes(bytes(model))
    return "tokenizer.model does not match its checksum"


def _edit_meta(path):
    """The marker still parses, but one recorded count is wrong."""
    meta = json.loads((path / "meta.json").read_text())
    meta["n_docs"]["train"] += 1
    (path / "meta.json").write_text(json.dumps(meta))
    return "meta.json does not match its checksum"


def _garble_meta(path):
    (path / "meta.json").write_text('{"format": 2, "n_tok')
    return "meta.json is damaged"


DAMAGE = {"offset-value": _flip_offset, "truncated-tokens": _truncate_tokens,
          "token-value": _change_token, "tokenizer-model": _corrupt_tokenizer,
          "meta-value": _edit_meta, "meta-garbled": _garble_meta}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_cache_is_rebuilt_with_one_warning(tmp_path, damage):
    _, jsonl, _ = write_inputs(tmp_path)
    cfg = files_cfg(tmp_path, [jsonl], text_field="body", val_fraction=0.2)
    source = build(cfg, vocab=512)
    reference = source.global_batch(3).input_ids
    path = source.cache_path
    reason = damage(path)
    assert check_cache(path)[0] is None and reason in check_cache(path)[1]
    log = []
    rebuilt = build(cfg, vocab=512, log=log)
    warnings = [line for line in log if line.startswith("warning:")]
    assert len(warnings) == 1 and str(path) in warnings[0] and reason in warnings[0], log
    assert warnings[0].endswith("rebuilding it")
    assert rebuilt.cache_path == path and check_cache(path)[0] is not None
    assert torch.equal(rebuilt.global_batch(3).input_ids, reference)


def test_an_intact_cache_is_reused_without_warning(tmp_path):
    _, jsonl, _ = write_inputs(tmp_path)
    cfg = files_cfg(tmp_path, [jsonl], text_field="body")
    build(cfg, vocab=512)
    log = []
    build(cfg, vocab=512, log=log)
    assert not any("tokenizing" in line or "warning" in line for line in log), log


def test_large_token_files_are_sampled(tmp_path, monkeypatch):
    """Over FULL_HASH_BYTES a token file is hashed at SAMPLE_BLOCKS spread blocks: a change in
    a sampled block (the first) is caught, one between blocks is not (the stated trade-off)."""
    monkeypatch.setattr(cache, "FULL_HASH_BYTES", 1 << 20)
    monkeypatch.setattr(cache, "SAMPLE_BLOCKS", 3)
    monkeypatch.setattr(cache, "_BLOCK", 4096)
    path = tmp_path / "x.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8))
    path.write_bytes(bytes(data))
    before = cache.file_digest(path, "sha256")
    data[1 << 20] ^= 1  # between the first and the middle block
    path.write_bytes(bytes(data))
    assert cache.file_digest(path, "sha256") == before
    data[0] ^= 1
    path.write_bytes(bytes(data))
    assert cache.file_digest(path, "sha256") != before
    offsets = tmp_path / "x_offsets.npy"  # anything but a token file is hashed whole
    offsets.write_bytes(bytes(data))
    whole = cache.file_digest(offsets, "sha256")
    data[1 << 20] ^= 1
    offsets.write_bytes(bytes(data))
    assert cache.file_digest(offsets, "sha256") != whole


def test_a_damaged_cache_that_cannot_be_removed_is_one_config_error(tmp_path, monkeypatch):
    """Rebuilding needs the damaged directory gone; where it cannot go (a read-only shared
    cache: we run as root, so it is simulated), the run stops with one line naming it."""
    _, jsonl, _ = write_inputs(tmp_path)
    cfg = files_cfg(tmp_path, [jsonl], text_field="body")
    path = build(cfg, vocab=512).cache_path
    _flip_offset(path)
    real_rmtree = cache.shutil.rmtree

    def refuse(target, ignore_errors=False):
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(target))
        real_rmtree(target, ignore_errors=True)

    monkeypatch.setattr(cache.shutil, "rmtree", refuse)
    with pytest.raises(ConfigError) as info:
        build(cfg, vocab=512)
    assert info.value.key == "data.cache_dir"
    assert info.value.message.startswith(f"token cache {path} train_offsets.npy does not match "
                                         "its checksum and cannot be removed (Permission denied)")
