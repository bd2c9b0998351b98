"""RMSNorm (Zhang & Sennrich 2019), with the weight offset Gemma uses.

y = x / sqrt(mean(x^2) + eps) * (offset + w) over the last dim. offset 0 is Llama's norm (w
initialised to 1), offset 1 is Gemma's `x_hat * (1 + w)` (w initialised to 0: transformers
`Gemma3RMSNorm`); `model.norm_weight_offset` picks it for every norm of a model, QK-norm too.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .precision import compute_dtype


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + weight) over the last dim of x (..., dim).

    Statistics and the product in fp32, the result in the compute dtype (`precision.py`: the
    autocast dtype, else x's dtype). The weight is first rounded to the compute dtype: that is
    the value FSDP2's bf16 parameter copy holds, so a fp32 master weight under autocast (zero=0)
    and the FSDP2-gathered bf16 weight (zero>0) compute exactly the same norm; the offset is
    added after that rounding, in fp32, as Gemma adds its 1 (`1.0 + weight.float()`). In fp32
    this is `F.rms_norm` unchanged; in a lower dtype `_LowPrecisionRMSNorm`, which keeps x as it
    is for backward (torch's CPU `rms_norm` keeps fp32 copies of a bf16 input: twice the bytes).
    The weight starts at 1 - offset (`GPT.init_weights`), the identity either way.
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        # Injected from outside (None = the weight as it is): a function of the weight, identity
        # in value. A tensor-parallel plan sets it on QK-norms, which see only this rank's
        # heads, so that their gradient is summed over the tp ranks (parallel/tensor.py).
        self.weight_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        weight = self.weight if self.weight_fn is None else self.weight_fn(self.weight)
        if dtype == torch.float32:
            return F.rms_norm(x.float(), (x.shape[-1],), self._scale(weight.float()), self.eps)
        # fp32 statistics: in bf16 the mean of squares of a 4096-wide row loses ~3 digits.
        return _LowPrecisionRMSNorm.apply(x.to(dtype), self._scale(weight.to(dtype)), self.eps)

    def _scale(self, weight: torch.Tensor) -> torch.Tensor:
        """offset + weight, in fp32 when there is an offset (no rounding of the sum)."""
        return weight if not self.offset else weight.float() + self.offset

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset:g}"


class _LowPrecisionRMSNorm(torch.autograd.Function):
    """RMSNorm of a low-precision x (..., d) with a scale (d,) (x's dtype, or fp32 with an
    offset), computed in fp32.

    Forward: rstd = 1 / sqrt(mean(x^2) + eps) (..., 1) fp32; y = round(x * rstd * w). Saves x
    (its own dtype), w and rstd, not a fp32 copy of x. Backward (fp32, with xh = x * rstd,
    gw = g * w): dx = rstd * (gw - xh * mean(gw * xh)), dw = sum over tokens of g * xh — the
    standard RMSNorm gradient (Zhang & Sennrich 2019). Both directions run with autocast off.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.device_type = x.device.type
        with torch.autocast(ctx.device_type, enabled=False):
            xf = x.float()
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
            ctx.save_for_backward(x, weight, rstd)
            return (xf * rstd * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        with torch.autocast(ctx.device_type, enabled=False):
            xh = x.float() * rstd  # (..., d)
            g = grad.float()
            gw = g * weight.float()
            dx = rstd * (gw - xh * (gw * xh).mean(-1, keepdim=True))
            dw = (g * xh).reshape(-1, x.shape[-1]).sum(0)  # (..., d) -> (N, d) -> (d,)
        return dx.to(x.dtype), dw.to(weight.dtype), None
