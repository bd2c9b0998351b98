"""Validation of every section: each bad value is refused with the key that carries it."""
import math

import pytest

from ulysses_train.config import Config, validate
from ulysses_train.errors import ConfigError

from helpers import small_config

BAD = [
    ("model", "n_layers", 0, "model.n_layers"),
    ("model", "d_model", -8, "model.d_model"),
    ("model", "n_heads", 3, "model.d_model"),  # 64 % 3 != 0
    ("model", "n_kv_heads", 3, "model.n_kv_heads"),  # 4 % 3 != 0
    ("model", "rope_theta", math.inf, "model.rope_theta"),
    ("model", "rope_scaling", "yarn", "model.rope_scaling"),  # allowed value, not yet built
    ("model", "rope_scaling", "magic", "model.rope_scaling"),
    ("parallel", "sp", 4, "parallel.sp"),
    ("parallel", "tp", 2, "parallel.tp"),
    ("parallel", "zero", 7, "parallel.zero"),
    ("parallel", "zero", 3, "parallel.zero"),
    ("parallel", "backend", "mpi", "parallel.backend"),
    ("parallel", "dp", 0, "parallel.dp"),
    ("data", "name", "web", "data.name"),
    ("data", "seq_len", 0, "data.seq_len"),
    ("data", "document_mask", True, "data.document_mask"),
    ("data", "val_fraction", 0.9, "data.val_fraction"),
    ("data", "max_docs", -1, "data.max_docs"),
    ("train", "steps", 0, "train.steps"),
    ("train", "micro_batch_size", 3, "train.global_batch_size"),  # 4 % 3 != 0
    ("train", "global_batch_size", -4, "train.global_batch_size"),
    ("train", "precision", "fp16", "train.precision"),
    ("train", "grad_clip", math.nan, "train.grad_clip"),
    ("train", "activation_checkpointing", "full", "train.activation_checkpointing"),
    ("train", "compile", True, "train.compile"),
    ("train", "exit_after_steps", -1, "train.exit_after_steps"),
    ("optim", "lr", math.nan, "optim.lr"),
    ("optim", "lr", math.inf, "optim.lr"),
    ("optim", "lr", 0.0, "optim.lr"),
    ("optim", "beta2", 1.0, "optim.beta2"),
    ("optim", "schedule", "step", "optim.schedule"),
    ("optim", "warmup_steps", -1, "optim.warmup_steps"),
    ("checkpoint", "keep", 0, "checkpoint.keep"),
    ("checkpoint", "every", -5, "checkpoint.every"),
    ("checkpoint", "async_save", True, "checkpoint.async_save"),
]


def test_defaults_are_valid():
    validate(Config())
    validate(small_config())


@pytest.mark.parametrize("section,key,value,expected_key", BAD,
                         ids=[f"{s}.{k}={v}" for s, k, v, _ in BAD])
def test_bad_value_names_its_key(section, key, value, expected_key):
    cfg = small_config(**{section: {key: value}})
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == expected_key
    assert str(info.value).startswith(expected_key + ": ")
    assert "\n" not in str(info.value)


def test_files_source_needs_paths():
    with pytest.raises(ConfigError, match="data.paths"):
        validate(small_config(data={"name": "files"}))


def test_wandb_mode_checked():
    cfg = small_config()
    cfg.logging.wandb.mode = "cloud"
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        validate(cfg)


def test_multi_process_refused_until_supported():
    with pytest.raises(ConfigError, match="parallel"):
        validate(small_config(), world_size=4)
