"""The one list of architecture keys (config/architecture.py) is complete and is what every
checkpoint comparison uses."""
import dataclasses

import torch

from ulysses_train.config.architecture import ARCHITECTURE_KEYS, architecture_diffs
from ulysses_train.config.schema import ModelConfig
from ulysses_train.hf.config import checkpoint_model_fields
from ulysses_train.model import GPT


def _shapes(cfg: ModelConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2
    return None  # floats and strings: values, never shapes


def test_every_key_that_changes_the_tensors_is_an_architecture_key():
    """Doubling each int field (flipping each bool) of a small model: the fields whose change
    adds, removes or reshapes a tensor are exactly ARCHITECTURE_KEYS."""
    base = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                       vocab_size=256)
    reference, shaping = _shapes(base), set()
    for field in dataclasses.fields(ModelConfig):
        value = _changed(getattr(base, field.name))
        if value is None:
            continue
        if _shapes(dataclasses.replace(base, **{field.name: value})) != reference:
            shaping.add(field.name)
    assert shaping == set(ARCHITECTURE_KEYS)


def test_diffs_read_an_unrecorded_key_as_the_default():
    cfg = ModelConfig(qkv_bias=True)
    saved = {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k != "qkv_bias"}
    assert architecture_diffs(saved, cfg) == [("qkv_bias", False, True)]
    assert architecture_diffs(dataclasses.asdict(cfg), cfg) == []


def test_init_from_our_checkpoint_states_every_architecture_key():
    stated, _ = checkpoint_model_fields(dataclasses.asdict(ModelConfig()))
    assert set(ARCHITECTURE_KEYS) <= set(stated)
