"""The one list of architecture keys (config/architecture.py) is complete and is what every
checkpoint comparison uses: DIMENSIONS and FLAGS are exactly the fields that change the tensors,
FUNCTION exactly those that change what the same weights compute."""
import dataclasses

import torch

from ulysses_train.config.architecture import (
    ARCHITECTURE_KEYS,
    FUNCTION,
    RESUME_KEYS,
    architecture_diffs,
)
from ulysses_train.config.schema import MLP_ACTIVATIONS, ROPE_SCALINGS, ModelConfig
from ulysses_train.hf.config import checkpoint_model_fields
from ulysses_train.model import GPT


def _shapes(cfg: ModelConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}


# A field whose default is 0 ("derive it") is changed to this valid value instead of 0 * 2.
NONZERO = {"head_dim": 24, "sliding_window": 4, "query_pre_attn_scalar": 8.0,
           "rope_local_theta": 500.0, "norm_weight_offset": 1.0}


def _changed(value, name=""):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 or NONZERO.get(name, 0)
    return None  # floats and strings: values, never shapes


def test_every_key_that_changes_the_tensors_is_an_architecture_key():
    """Doubling each int field (flipping each bool) of a small model: the fields whose change
    adds, removes or reshapes a tensor are exactly ARCHITECTURE_KEYS."""
    base = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                       vocab_size=256)
    reference, shaping = _shapes(base), set()
    for field in dataclasses.fields(ModelConfig):
        value = _changed(getattr(base, field.name), field.name)
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


# Each RoPE method reads its own parameters (model/rope.py), so a parameter changes the function
# only under its method: every base below is one method, with everything it reads in effect
# (yarn's mscale pair is read only when both are set; its beta_fast moves the correction range
# of head dim 16 only with a pretraining context of a few thousand positions).
SMALL_MODEL = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                   vocab_size=256, rope_factor=4.0)
# The window bases (W=4 < the 24 tokens) hold the window keys to what they compute: a doubled
# window, each layer's type flipped, and [] (every layer slides, as transformers' Mistral)
# against an explicit all-full list.
FUNCTION_BASES = [dict(rope_scaling=m, rope_original_seq_len=64)
                  for m in ("none", "linear", "ntk", "llama3")] + [
    dict(rope_scaling="yarn", rope_original_seq_len=2048, rope_mscale=1.0,
         rope_mscale_all_dim=1.0),
    dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    dict(sliding_window=4)]
FLIPPED = {"full_attention": "sliding_attention", "sliding_attention": "full_attention"}


def _other(name: str, value):
    """Another valid value of field `name`; a field of a type not handled here fails the test,
    so whoever adds it decides how it is changed (and into which list it goes)."""
    if name == "rope_scaling":
        return next(m for m in ROPE_SCALINGS if m != value)
    if isinstance(value, bool):
        return not value
    if name == "mlp_activation":
        return next(a for a in MLP_ACTIVATIONS if a != value)
    if isinstance(value, (int, float)):
        return value * 2 or NONZERO[name]
    if value is None:  # an optional float (yarn's attention factor, mscale pair)
        return 1.5
    if name == "layer_types":  # each layer flipped; [] (all alike) -> an explicit all-full list
        return [FLIPPED[t] for t in value] if value else ["full_attention"] * SMALL_MODEL["n_layers"]
    if isinstance(value, str):
        return value + "-other"
    raise TypeError(f"ModelConfig.{name}: no rule for changing a {type(value).__name__}")


def _logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions)


def test_every_key_that_changes_what_the_weights_compute_is_a_function_key():
    """For each field outside ARCHITECTURE_KEYS, the same weights loaded into a model with that
    field changed (under each RoPE method): the fields whose change alters the logits are
    exactly FUNCTION. Catches a rope or norm key that a resume would let change silently, and
    one listed that changes nothing."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, 24))
    computing = set()
    for extra in FUNCTION_BASES:
        base_cfg = ModelConfig(**SMALL_MODEL, **extra)
        base = GPT(base_cfg)
        base.init_weights(seed=0)
        reference = _logits(base, ids)
        for field in dataclasses.fields(ModelConfig):
            if field.name in ARCHITECTURE_KEYS:
                continue
            changed = GPT(dataclasses.replace(
                base_cfg, **{field.name: _other(field.name, getattr(base_cfg, field.name))}))
            changed.load_state_dict(base.state_dict())
            if not torch.equal(_logits(changed, ids), reference):
                computing.add(field.name)
    assert computing == set(FUNCTION)
    assert RESUME_KEYS == ARCHITECTURE_KEYS + FUNCTION


def test_init_from_compares_the_weights_resume_also_the_function():
    """A next stage (model.init_from) may change the RoPE; a resume may not: the same recorded
    model, compared on ARCHITECTURE_KEYS and on RESUME_KEYS."""
    saved = dataclasses.asdict(ModelConfig(rope_scaling="yarn", rope_factor=2.0))
    cfg = ModelConfig(rope_scaling="yarn", rope_factor=4.0, rope_theta=5e5)
    assert architecture_diffs(saved, cfg) == []
    assert architecture_diffs(saved, cfg, RESUME_KEYS) == [("rope_theta", 10000.0, 5e5),
                                                           ("rope_factor", 2.0, 4.0)]
    older = {k: v for k, v in saved.items() if k != "rope_truncate"}  # not recorded: default
    assert architecture_diffs(older, dataclasses.replace(cfg, rope_truncate=False),
                              RESUME_KEYS)[-1] == ("rope_truncate", True, False)


def test_head_dim_zero_is_the_derived_width():
    """head_dim 0 and d_model / n_heads are the same tensors: no difference; an explicit other
    width is one; under another d_model, 0 on both sides is d_model's difference alone."""
    saved = dataclasses.asdict(ModelConfig(d_model=256, n_heads=8))
    assert architecture_diffs(saved, ModelConfig(d_model=256, n_heads=8, head_dim=32)) == []
    assert architecture_diffs(saved, ModelConfig(d_model=256, n_heads=8, head_dim=16)) == [
        ("head_dim", 0, 16)]
    assert architecture_diffs(saved, ModelConfig(d_model=512, n_heads=8)) == [
        ("d_model", 256, 512)]
