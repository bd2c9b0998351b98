"""Single-device model code: the GPT, local attention kernels, RoPE and model presets.

Nothing here is distributed: parallelism is injected (an attention wrapper) or applied from
outside (a tensor-parallel plan, FSDP). Importing this package pulls in only torch.
"""
from .attention import (
                        document_mask_for,
                        eager_attention,
                        flash_varlen_attention,
                        flex_attention_kernel,
                        sdpa_attention,
                        select_attention,
)
from .flops import flops_per_token
from .gpt import GPT, num_params, padded_vocab
from .masking import DocumentMask
from .presets import PRESETS, model_config
from .rope import apply_rope, rope_inv_freq

__all__ = [
    "DocumentMask",
    "GPT",
    "PRESETS",
    "apply_rope",
    "document_mask_for",
    "eager_attention",
    "flash_varlen_attention",
    "flex_attention_kernel",
    "flops_per_token",
    "model_config",
    "num_params",
    "padded_vocab",
    "rope_inv_freq",
    "sdpa_attention",
    "select_attention",
]
