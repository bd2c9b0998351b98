"""Packing, labels, positions and document ids on hand-made documents (no tokenizer needed)."""
import numpy as np
import pytest
import torch

from ulysses_train.config.errors import ConfigError
from ulysses_train.data import Batch, PackedTokens

EOS = 1


def hand_made(lengths=(3, 5, 1, 7, 2, 9, 4, 6, 2, 8)):
    """Documents of the given lengths (EOS included), with tokens 10, 11, ... so each is unique."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(10, 10 + offsets[-1], dtype=np.uint16)
    tokens[offsets[1:] - 1] = EOS  # every document ends with EOS
    return tokens, offsets


def test_windows_labels_positions_and_document_ids():
    tokens, offsets = hand_made()
    seq = 4
    packed = PackedTokens(tokens, offsets, seq, seed=0)
    assert packed.n_windows == (len(tokens) - 1) // seq
    batch = packed.batch(range(packed.n_windows))
    for row, g in enumerate(range(packed.n_windows)):
        start = packed.window_index(g) * seq
        expect = torch.from_numpy(tokens[start:start + seq + 1].astype(np.int64))
        assert torch.equal(batch.input_ids[row], expect[:-1])
        # The label of the last input is the token after the window: the shift saw all S+1.
        assert torch.equal(batch.labels[row], expect[1:])
        assert batch.labels[row, -1].item() == tokens[start + seq]
        assert torch.equal(batch.position_ids[row], torch.arange(seq))
        docs = batch.document_ids[row]
        assert docs[0] == 0
        # The id steps up exactly after each EOS, never elsewhere.
        assert torch.equal(docs.diff(), (batch.input_ids[row, :-1] == EOS).long())
        # ... and agrees with the true document of each token.
        true_doc = np.searchsorted(offsets, np.arange(start, start + seq), side="right") - 1
        assert torch.equal(docs, torch.from_numpy(true_doc - true_doc[0]))
    for t in (batch.input_ids, batch.labels, batch.position_ids, batch.document_ids):
        assert t.dtype == torch.int64 and t.shape == (packed.n_windows, seq)


def test_every_window_once_per_epoch_in_a_new_order():
    tokens, offsets = hand_made(lengths=(5,) * 40)
    packed = PackedTokens(tokens, offsets, 3, seed=7)
    n = packed.n_windows
    epoch0 = [packed.window_index(g) for g in range(n)]
    epoch1 = [packed.window_index(g) for g in range(n, 2 * n)]
    assert sorted(epoch0) == list(range(n)) == sorted(epoch1)
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    other_seed = PackedTokens(tokens, offsets, 3, seed=8)
    assert [other_seed.window_index(g) for g in range(n)] != epoch0
    val = PackedTokens(tokens, offsets, 3, seed=7, split="val")
    assert [val.window_index(g) for g in range(n)] != epoch0


def test_any_sample_alone_equals_it_within_a_batch():
    tokens, offsets = hand_made(lengths=(4,) * 50)
    a = PackedTokens(tokens, offsets, 5, seed=3).batch(range(100, 110))
    fresh = PackedTokens(tokens, offsets, 5, seed=3)  # empty permutation cache
    for g in (107, 100, 109):
        alone = fresh.batch([g])
        assert torch.equal(alone.input_ids[0], a.input_ids[g - 100])
        assert torch.equal(alone.labels[0], a.labels[g - 100])


def test_slice_keeps_labels_and_positions_of_the_full_sequence():
    tokens, offsets = hand_made()
    batch = PackedTokens(tokens, offsets, 8, seed=0).batch([0, 1, 2])
    half = batch.slice(rows=slice(1, 3), cols=slice(0, 4))
    assert half.shape == (2, 4) and all(t.is_contiguous() for t in vars(half).values())
    # The last label of the first half is the first input of the second half.
    second = batch.slice(rows=slice(1, 3), cols=slice(4, 8))
    assert torch.equal(half.labels[:, -1], second.input_ids[:, 0])
    assert torch.equal(second.position_ids[0], torch.arange(4, 8))
    assert torch.equal(second.document_ids, batch.document_ids[1:3, 4:8])


def test_too_short_split_names_seq_len():
    tokens, offsets = hand_made(lengths=(3, 3))
    with pytest.raises(ConfigError) as info:
        PackedTokens(tokens, offsets, 6)
    assert info.value.key == "data.seq_len" and "6 tokens" in info.value.message
    PackedTokens(tokens, offsets, 5)  # exactly S+1 tokens: one window


def test_bad_offsets_are_rejected():
    tokens, offsets = hand_made()
    with pytest.raises(ValueError):
        PackedTokens(tokens, offsets[:-1], 4)
    with pytest.raises(ValueError):
        PackedTokens(tokens, offsets[::-1], 4)


def test_batch_is_a_plain_dataclass():
    b = Batch(*(torch.zeros(2, 3, dtype=torch.int64) for _ in range(4)))
    assert b.to("cpu").shape == (2, 3)


def test_importing_the_package_stays_light():
    """datasets / sentencepiece / tokenizers load only when a cache is built, transformers never
    (docs/architecture.md §2)."""
    import subprocess
    import sys

    code = ("import sys, ulysses_train.data; "
            "print(sorted(m for m in ('datasets', 'sentencepiece', 'tokenizers', 'transformers', "
            "'filelock', 'pyarrow') "
            "if m in sys.modules))")
    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root)
    assert out.stdout.strip() == "[]"
