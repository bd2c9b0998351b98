"""Validation of every section: each bad value is refused with the key that carries it."""
import math

import pytest

from support.common import small_config
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.parallel import check_tp
from ulysses_train.config.schema import Config
from ulysses_train.config.validate import validate

BAD = [
    ("model", "n_layers", 0, "model.n_layers"),
    ("model", "d_model", -8, "model.d_model"),
    ("model", "n_heads", 3, "model.d_model"),  # 64 % 3 != 0
    ("model", "n_kv_heads", 3, "model.n_kv_heads"),  # 4 % 3 != 0
    ("model", "rope_theta", math.inf, "model.rope_theta"),
    ("model", "rope_scaling", "magic", "model.rope_scaling"),
    ("parallel", "tp", 2, "parallel.tp"),  # asks for 2 ranks, got 1
    ("parallel", "zero", 7, "parallel.zero"),
    ("parallel", "backend", "mpi", "parallel.backend"),
    ("parallel", "dp", 0, "parallel.dp"),
    ("data", "name", "web", "data.name"),
    ("data", "seq_len", 0, "data.seq_len"),
    ("data", "val_fraction", 0.9, "data.val_fraction"),
    ("data", "max_docs", -1, "data.max_docs"),
    ("train", "steps", 0, "train.steps"),
    ("train", "micro_batch_size", 3, "train.global_batch_size"),  # 4 % 3 != 0
    ("train", "global_batch_size", -4, "train.global_batch_size"),
    ("train", "precision", "fp16", "train.precision"),
    ("train", "grad_clip", math.nan, "train.grad_clip"),
    ("train", "activation_checkpointing", "some", "train.activation_checkpointing"),
    ("train", "activation_offload", True, "train.activation_offload"),  # needs checkpointing
    ("train", "loss_chunk", -1, "train.loss_chunk"),
    ("train", "mlp_chunk", -8, "train.mlp_chunk"),
    ("train", "exit_after_steps", -1, "train.exit_after_steps"),
    ("optim", "lr", math.nan, "optim.lr"),
    ("optim", "lr", math.inf, "optim.lr"),
    ("optim", "lr", 0.0, "optim.lr"),
    ("optim", "beta2", 1.0, "optim.beta2"),
    ("optim", "schedule", "step", "optim.schedule"),
    ("optim", "warmup_steps", -1, "optim.warmup_steps"),
    ("checkpoint", "keep", 0, "checkpoint.keep"),
    ("checkpoint", "every", -5, "checkpoint.every"),
    ("checkpoint", "resume", "", "checkpoint.resume"),
    ("debug", "pause_in_save_at_step", -1, "debug.pause_in_save_at_step"),
    ("debug", "pause_in_save_before", "rename", "debug.pause_in_save_before"),
    ("train", "max_skipped_steps", 0, "train.max_skipped_steps"),
    ("debug", "crash_at_step", -1, "debug.crash_at_step"),
    ("debug", "nan_at_step", -2, "debug.nan_at_step"),
    ("debug", "nan_steps", 0, "debug.nan_steps"),
    ("model", "sliding_window", -1, "model.sliding_window"),
    ("model", "layer_types", ["full_attention"], "model.layer_types"),  # 1 entry, 2 layers
    ("model", "layer_types", ["full_attention", "local"], "model.layer_types"),
    # sliding layers without a window (sliding_window=0) would silently be full attention
    ("model", "layer_types", ["sliding_attention", "full_attention"], "model.layer_types"),
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


def test_validate_reads_no_file(monkeypatch, tmp_path):
    """config/ is pure: the rules read no file even where the keys name files (those are
    cli/checks.py's), so any rank or the planner may run them as often as it likes."""
    import builtins
    import os

    def no_io(*args, **kwargs):
        raise AssertionError(f"validate touched the file system: {args}")

    cfg = small_config(data={"name": "files", "paths": [str(tmp_path / "no.jsonl")]},
                       checkpoint={"resume": str(tmp_path / "step_00000001")})
    cfg.model.init_from = str(tmp_path / "missing")
    for name in ("open",):
        monkeypatch.setattr(builtins, name, no_io)
    for name in ("stat", "listdir", "scandir"):
        monkeypatch.setattr(os, name, no_io)
    validate(cfg)


def test_wandb_mode_checked():
    cfg = small_config()
    cfg.logging.wandb.mode = "cloud"
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        validate(cfg)


SLIDING = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}

LAYOUTS_BAD = [  # (sections, world size, key)
    ({"parallel": {"sp": 3}}, 4, "parallel.sp"),  # 3 does not divide 4
    ({"parallel": {"sp": 2, "dp": 4}}, 4, "parallel.dp"),  # 2 x 4 != 4
    ({"parallel": {"sp": 8}}, 8, "model.n_heads"),  # 4 heads over 8 ranks
    ({"parallel": {"sp": 2}, "model": {"d_model": 96, "n_heads": 6, "n_kv_heads": 3}}, 2,
     "model.n_kv_heads"),  # 3 kv heads vs sp 2: neither divides the other
    ({"parallel": {"sp": 1}}, 4, "train.global_batch_size"),  # dp 4 x micro 2 > 4
    ({"parallel": {"sp": 4}}, 1, "parallel.sp"),  # asks for 4 ranks, got 1
    ({"parallel": {"tp": 8}}, 8, "model.n_heads"),  # 4 heads over tp 8
    ({"parallel": {"tp": 4}}, 4, "model.n_kv_heads"),  # 2 kv heads over tp 4
    ({"parallel": {"tp": 2}, "model": {"ffn_hidden": 129}}, 2, "model.ffn_hidden"),
    ({"parallel": {"tp": 2, "sp": 2}, "model": {"n_heads": 2, "n_kv_heads": 2,
                                                 "d_model": 32}}, 4, "model.n_heads"),
    # parallel.ring: the degree itself, then heads vs the Ulysses degree U = sp / ring
    ({"parallel": {"sp": 4, "ring": 0}}, 4, "parallel.ring"),
    ({"parallel": {"sp": 4, "ring": -2}}, 4, "parallel.ring"),
    ({"parallel": {"sp": 4, "ring": 3}}, 4, "parallel.ring"),  # 3 does not divide 4
    ({"parallel": {"sp": 2, "ring": 4}}, 2, "parallel.ring"),  # ring > sp
    ({"parallel": {"sp": 8, "ring": 1}}, 8, "model.n_heads"),  # U = 8 > 4 heads
    ({"parallel": {"sp": 16, "ring": 2}}, 16, "parallel.ring"),  # U = 8 > 4 heads
    ({"parallel": {"tp": 2, "sp": 8, "ring": 2}}, 16, "parallel.ring"),  # tp x U = 8 > 4
    ({"parallel": {"sp": 6, "ring": 2}, "model": {"n_heads": 6, "n_kv_heads": 2,
                                                   "d_model": 96}}, 6, "parallel.ring"),  # kv 2 vs U 3
    # parallel.ulysses_chunks (issue 22): small_config has 4 heads, 2 kv heads
    ({"parallel": {"sp": 2, "ulysses_chunks": 0}}, 2, "parallel.ulysses_chunks"),
    ({"parallel": {"sp": 2, "ulysses_chunks": 3}}, 2, "parallel.ulysses_chunks"),  # 2 heads/rank
    ({"parallel": {"sp": 2, "ulysses_chunks": 4}}, 2, "parallel.ulysses_chunks"),  # > 2 heads/rank
    ({"parallel": {"sp": 1, "ulysses_chunks": 2}}, 1, "parallel.ulysses_chunks"),  # no all-to-all
    ({"parallel": {"sp": 2, "ring": 2, "ulysses_chunks": 2}}, 2, "parallel.ulysses_chunks"),
    # 12 q / 3 kv heads per rank: G=2 would split a kv head's queries over two groups
    ({"parallel": {"sp": 2, "ulysses_chunks": 2}, "model": {"n_heads": 24, "n_kv_heads": 6,
                                                           "d_model": 96}}, 2, "parallel.ulysses_chunks"),
]


@pytest.mark.parametrize("sections,world,key", LAYOUTS_BAD, ids=[k for _, _, k in LAYOUTS_BAD])
def test_layouts_that_do_not_fit(sections, world, key):
    with pytest.raises(ConfigError) as info:
        validate(small_config(**sections), world_size=world)
    assert info.value.key == key


@pytest.mark.parametrize("sections,world", [
    ({"parallel": {"sp": 4}}, 4),  # kv 2 < sp 4: replicated
    ({"parallel": {"sp": 2}}, 4),  # dp = -1 -> 2
    ({"parallel": {"sp": 2, "dp": 2}}, 4),
    ({"parallel": {"sp": 2}, "train": {"micro_batch_size": 1}}, 2),
    ({"parallel": {"tp": 2, "sp": 2}}, 4),  # kv 2 / tp 2 = 1 local kv head, replicated over sp
    ({"parallel": {"tp": 2, "dp": 2, "zero": 3}}, 4),
    ({"parallel": {"sp": 4}, "data": {"seq_len": 30}}, 4),  # any seq_len: rows are padded
    ({"parallel": {"sp": 8}, "data": {"seq_len": 5},  # and some ranks hold only padding
      "model": {"n_heads": 8, "n_kv_heads": 4}}, 8),
    ({"parallel": {"sp": 8, "ring": 4}}, 8),  # beyond the head count: U = 2
    ({"parallel": {"sp": 8, "ring": 8}}, 8),  # pure ring
    ({"parallel": {"tp": 2, "sp": 4, "ring": 2}}, 8),  # tp x U = 4 heads, 1 kv head replicated
    ({"parallel": {"sp": 3, "ring": 3}, "data": {"seq_len": 250}}, 3),  # 4 heads, U = 1
    ({"parallel": {"sp": 6, "ring": 3}, "model": {"n_heads": 6, "n_kv_heads": 2,
                                                   "d_model": 96}}, 6),  # kv 2 == U 2
    ({"parallel": {"sp": 4}, "model": SLIDING}, 4),  # sliding windows under Ulysses
    ({"parallel": {"sp": 4, "ring": 2}, "model": SLIDING}, 4),  # and under a ring (the halo)
    ({"parallel": {"sp": 2, "ring": 2}, "model": {"sliding_window": 8}}, 2),
    ({"parallel": {"sp": 4, "ring": 2}, "model": {"sliding_window": 8,  # a window, no layer slides
                                                  "layer_types": ["full_attention"] * 2}}, 4),
])
def test_layouts_that_fit(sections, world):
    validate(small_config(**sections), world_size=world)


@pytest.mark.parametrize("model, tp, key", [
    ({"n_heads": 6, "n_kv_heads": 2, "d_model": 96}, 4, "model.n_heads"),
    ({}, 4, "model.n_kv_heads"),
    ({"n_heads": 6, "n_kv_heads": 3, "d_model": 96, "ffn_hidden": 192}, 3, "model.vocab_size"),
    ({"ffn_hidden": 129}, 2, "model.ffn_hidden"),
])
def test_check_tp_rejects_uneven_splits(model, tp, key):
    with pytest.raises(ConfigError) as info:
        check_tp(small_config(model=model).model, tp)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ") and f"parallel.tp={tp}" in str(info.value)


def test_check_tp_accepts_even_splits():
    for model, tp in (({}, 1), ({}, 2), ({"n_kv_heads": 4}, 4)):
        check_tp(small_config(model=model).model, tp)


def test_ulysses_chunks_that_fit_and_the_valid_list():
    from ulysses_train.config.parallel import valid_ulysses_chunks

    # sp=4, 32 heads, 2 kv heads (replicated: one per rank): any divisor of the 8 q heads
    assert valid_ulysses_chunks(32, 2, 4) == [1, 2, 4, 8]
    # 2 kv heads per rank: G must divide 2 or be a multiple of it
    assert valid_ulysses_chunks(32, 8, 4) == [1, 2, 4, 8]
    assert valid_ulysses_chunks(12, 12, 2) == [1, 2, 3, 6]  # MHA: divisors of 6
    assert valid_ulysses_chunks(24, 6, 2) == [1, 3, 6, 12]  # 3 kv heads/rank: 2 and 4 split one
    validate(small_config(parallel={"sp": 2, "ulysses_chunks": 2}), world_size=2)
    with pytest.raises(ConfigError) as info:
        validate(small_config(parallel={"sp": 2, "ulysses_chunks": 3}), world_size=2)
    assert "choose one of [1, 2]" in str(info.value)
