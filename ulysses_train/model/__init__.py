"""Single-device model code: the GPT, local attention kernels, RoPE and model presets.

Nothing here is distributed: parallelism is injected (an attention wrapper) or applied from
outside (a tensor-parallel plan, FSDP). Importing this package pulls in only torch.
"""
from .attention import eager_attention, sdpa_attention
from .gpt import GPT, flops_per_token, num_params, padded_vocab
from .presets import PRESETS, model_config
from .rope import apply_rope, rope_inv_freq

__all__ = [
    "GPT",
    "PRESETS",
    "apply_rope",
    "eager_attention",
    "flops_per_token",
    "model_config",
    "num_params",
    "padded_vocab",
    "rope_inv_freq",
    "sdpa_attention",
]
