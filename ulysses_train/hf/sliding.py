"""Sliding-window attention in a Hugging Face config.json, both ways (issue 20 §5).

transformers 5 spells a window differently per model_type, and what each *computes* is what
counts (read from transformers 5.25's configuration_* / modeling_* files):

- llama: no window (LlamaForCausalLM ignores `sliding_window` and `layer_types`).
- mistral: `sliding_window` (absent: 4096; null: none) on every layer; `layer_types` is ignored
  (with a warning).
- ministral: `sliding_window` (absent: 4096) on the `layer_types` sliding layers; without
  `layer_types`, every layer when the window is not null.
- qwen2, qwen3: `sliding_window` (absent: 4096) only with `use_sliding_window`, else none; on
  the `layer_types` sliding layers, or without them on layer i >= `max_window_layers` (default
  28).
- gemma3_text (and a gemma3 checkpoint's text_config): `sliding_window` (absent: 4096) on the
  `layer_types` sliding layers; without them, every layer i with (i + 1) %
  `sliding_window_pattern` != 0 slides (default 6: five local, one global).

The window means the same as ours (`masking_utils.sliding_window_causal`: query i sees key j
when i - W < j <= i; docs/attention.md), so `model.sliding_window` is transformers' number.

`window_fields` maps a config.json onto `model.sliding_window` / `model.layer_types`;
`window_config_json` writes them back for the export, choosing the model_type that computes
the model: Gemma 3 or Qwen3 for their switches (hf/family.py export_family), Qwen2 when q/k/v
have biases (the only one with them), else Mistral when every layer slides with one window,
Ministral for a mix (a Llama layout without biases that honours `layer_types`; transformers'
own advice for Mistral with `layer_types`), Llama without a window; the source's model_type
when it computes the same (a Mistral source with a null window goes back as Mistral). No
torch, no transformers.
"""
from __future__ import annotations

from ..config.architecture import layer_windows
from ..config.errors import ConfigError
from ..config.schema import LAYER_TYPES
from .family import export_family

KEY = "model.init_from"
# MistralConfig / MinistralConfig / Qwen2Config / Qwen3Config / Gemma3TextConfig `sliding_window`
DEFAULT_WINDOW = 4096
QWEN2_MAX_WINDOW_LAYERS = 28  # Qwen2Config / Qwen3Config `max_window_layers`
GEMMA3_PATTERN = 6  # Gemma3TextConfig: `sliding_window_pattern` when config.json has none
QWEN = ("qwen2", "qwen3")
_LEGACY = {"attention": "full_attention"}  # configuration_utils `_LEGACY_LAYER_TYPE_REMAP`
FULL, SLIDING = LAYER_TYPES


def window_fields(hf: dict, kind: str, where: str) -> dict:
    """{"sliding_window": W (0 = none), "layer_types": [...] ([] = every layer alike)} for the
    config.json dict `hf` of model_type `kind` (llama | mistral | ministral | qwen2 | qwen3 |
    gemma3_text: a gemma3 checkpoint's text_config), as
    transformers 5 computes it (table in the module docstring). Layers that all slide give
    [] (Mistral's meaning); no sliding layer gives W = 0.

    ConfigError (model.init_from, naming `where`) for what transformers would ignore or refuse:
    a window on a Llama, `layer_types` a Mistral ignores, sliding layers without a window, a
    window that is not a positive number, `layer_types` of the wrong length or with another
    entry.
    """
    n = int(hf["num_hidden_layers"])
    window = _window(hf, kind, where)
    types = _layer_types(hf, kind, window, n, where)
    sliding = [t == SLIDING for t in types]
    if window is None or not any(sliding):
        return {"sliding_window": 0, "layer_types": []}
    return {"sliding_window": window, "layer_types": [] if all(sliding) else types}


def _refuse(where: str, what: str) -> ConfigError:
    return ConfigError(KEY, f"{where}: {what}")


def _window(hf: dict, kind: str, where: str) -> int | None:
    """The window transformers applies (None: none), from `sliding_window` and, for Qwen2,
    `use_sliding_window`."""
    if kind == "llama":
        if hf.get("sliding_window") is not None or SLIDING in (hf.get("layer_types") or []):
            raise _refuse(where, "model_type 'llama' has sliding_window / layer_types, which "
                                 "transformers' LlamaForCausalLM ignores (it computes full "
                                 "attention), so what these weights were trained with is "
                                 "unclear; remove them from config.json for full attention, or "
                                 "set model_type to ministral for per-layer windows")
        return None
    if kind in QWEN and not hf.get("use_sliding_window", False):
        return None  # Qwen2Config: sliding_window = ... if use_sliding_window else None
    value = hf.get("sliding_window", DEFAULT_WINDOW)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(where, f"sliding_window={value!r} is not a positive number of tokens "
                             "(or null for no window)")
    return value


def _layer_types(hf: dict, kind: str, window: int | None, n: int, where: str) -> list[str]:
    """Each layer's type as transformers runs it (n entries)."""
    raw = hf.get("layer_types")
    every = [SLIDING if window is not None else FULL] * n
    if raw is None or kind == "llama":
        if kind in QWEN:
            first = hf.get("max_window_layers")
            first = QWEN2_MAX_WINDOW_LAYERS if first is None else int(first)
            return [SLIDING if window is not None and i >= first else FULL for i in range(n)]
        if kind == "gemma3_text":  # the pattern decides, whatever the window
            pattern = int(hf.get("sliding_window_pattern") or GEMMA3_PATTERN)
            return _need_window([SLIDING if (i + 1) % pattern else FULL for i in range(n)],
                                kind, window, where)
        return every
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise _refuse(where, f"layer_types={raw!r} is not a list of layer type names")
    types = [_LEGACY.get(t, t) for t in raw]
    if len(types) != n:
        raise _refuse(where, f"layer_types has {len(types)} entries for num_hidden_layers={n}")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise _refuse(where, f"layer_types entries {unknown} are not supported (only "
                             f"{' and '.join(LAYER_TYPES)})")
    if kind == "mistral" and types != every:
        raise _refuse(where, "model_type 'mistral' applies sliding_window to every layer and "
                             "ignores layer_types (transformers warns), but layer_types says "
                             "otherwise; set model_type to ministral, which honours layer_types")
    return _need_window(types, kind, window, where)


def _need_window(types: list[str], kind: str, window: int | None, where: str) -> list[str]:
    """`types`, unless it has sliding layers without a window (transformers cannot run it)."""
    if window is None and SLIDING in types:
        why = "use_sliding_window=false" if kind in QWEN else "sliding_window=null"
        raise _refuse(where, f"layer_types has sliding_attention layers but {why}: "
                             "transformers cannot run this; give the window or make every "
                             "layer full_attention")
    return types


def window_config_json(m, source_type: str | None) -> dict:
    """The config.json keys that give ModelConfig `m`'s attention in transformers 5:
    `architectures`, `model_type` and the window keys of that type (module docstring).
    `source_type`: model_type of `model.init_from`'s Hugging Face source (None: none), kept
    when it computes the same."""
    windows = layer_windows(m)
    types = [SLIDING if w else FULL for w in windows]
    family = export_family(m)  # ConfigError for a mix no transformers class computes
    if family == "gemma3_text":  # layer_types always: Gemma's own default is 5 local : 1 global
        return _arch(family, sliding_window=m.sliding_window or None, layer_types=types)
    if m.qkv_bias or family == "qwen3":  # Qwen2: the one type with q/k/v biases; Qwen3: QK-norm
        kind = family or "qwen2"
        if not any(windows):
            return _arch(kind, use_sliding_window=False, sliding_window=None)
        # transformers 5 reads layer_types; max_window_layers (layer i slides when i >= it) is
        # what older readers derive them from, exact when the full layers come first.
        leading_full = next(i for i, w in enumerate(windows) if w)
        return _arch(kind, use_sliding_window=True, sliding_window=m.sliding_window,
                     max_window_layers=leading_full, layer_types=types)
    if not any(windows):
        kind = "mistral" if source_type == "mistral" else "llama"
    elif all(windows):
        kind = "ministral" if source_type == "ministral" else "mistral"
    else:
        kind = "ministral"
    if kind == "llama":
        return _arch("llama", attention_bias=False, mlp_bias=False)
    if kind == "mistral":  # no layer_types: MistralConfig warns about them and ignores them
        return _arch("mistral", sliding_window=m.sliding_window if any(windows) else None)
    return _arch("ministral", sliding_window=m.sliding_window, layer_types=types)


def _arch(kind: str, **keys) -> dict:
    name = {"llama": "Llama", "mistral": "Mistral", "ministral": "Ministral", "qwen2": "Qwen2",
            "qwen3": "Qwen3", "gemma3_text": "Gemma3"}
    return {"architectures": [f"{name[kind]}ForCausalLM"], "model_type": kind, **keys}
