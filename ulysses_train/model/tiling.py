"""Sequence tiling: run a per-token computation chunk by chunk so its big intermediates never exist
for the whole sequence at once.

Both helpers compute exactly the function of the untiled code (every token's output depends only
on that token's row), they only change what is alive at a time:

- `tiled_head_loss`: output head + cross-entropy per chunk of tokens, each chunk under
  non-reentrant `torch.utils.checkpoint`, so forward keeps no logits at all and backward
  rebuilds one chunk's logits at a time. (Non-reentrant checkpoint re-enters the forward's
  autocast state for its recompute by itself.) Peak logits memory drops from `S x V` to `chunk x V`
  (at 128k tokens and a 32k vocab the fp32 logits alone are 16 GiB) for one extra head matmul.
- `tiled_mlp`: the SwiGLU MLP per chunk of tokens inside a small autograd.Function that keeps
  only its input and recomputes each chunk in backward, so the three `S x ffn_hidden`
  intermediates exist for `chunk` tokens only (ALST's TiledMLP idea, Bekman et al. 2025).

Single-device code: under tensor parallelism the head and the MLP are DTensor-planned modules
and the loss is the injected vocab-parallel one; tiling only slices the (local) sequence dim.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .precision import capture_autocast, restore_autocast


def tiled_head_loss(h: torch.Tensor, labels: torch.Tensor,
                    head_loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum `head_loss(h_chunk, labels_chunk) -> (loss_sum, n_valid)` over sequence chunks.

    h (B, S, d), labels (B, S). `chunk` <= 0 or >= S runs `head_loss` once, unchanged (no
    recompute cost where tiling would save nothing).
    """
    seq = h.shape[1]
    if chunk <= 0 or chunk >= seq:
        return head_loss(h, labels)
    loss_sum, n_valid = None, None
    for start in range(0, seq, chunk):
        cols = slice(start, start + chunk)
        # (B, S, d) -> (B, c, d); (B, S) -> (B, c). Checkpointed: the chunk's logits are freed
        # right after its loss and rebuilt in backward.
        part, count = checkpoint(head_loss, h[:, cols], labels[:, cols],
                                 use_reentrant=False, preserve_rng_state=False)
        loss_sum = part if loss_sum is None else loss_sum + part
        n_valid = count if n_valid is None else n_valid + count
    return loss_sum, n_valid


class _TiledMLP(torch.autograd.Function):
    """out = cat_c fn(x_c) over sequence chunks c; saves only x.

    forward: each chunk under no_grad, so no intermediate is kept.
    backward: for each chunk, recompute fn(x_c) with grad — under the autocast state the forward
    ran in (the engine runs backward outside the caller's autocast block, and a fp32 recompute
    of a bf16 forward would be another function) — and backpropagate grad_out_c through it
    with `torch.autograd.backward`, which accumulates the parameter gradients straight into
    `.grad` (the parameters are not inputs of this Function: fn reaches them through its module,
    whatever wrapper — DTensor plan, FSDP2 — made them) and leaves x_c's gradient in x_c.grad.
    """

    @staticmethod
    def forward(ctx, fn, chunk: int, x: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.chunk = fn, chunk
        ctx.autocast = capture_autocast(x.device.type)  # what torch.amp.custom_fwd records
        ctx.save_for_backward(x)
        with torch.no_grad():
            # (B, S, d) -> per chunk (B, c, d) -> (B, S, d)
            return torch.cat([fn(x_c) for x_c in x.split(chunk, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        for start in range(0, x.shape[1], ctx.chunk):
            cols = slice(start, start + ctx.chunk)
            x_c = x[:, cols].detach().requires_grad_(True)  # (B, c, d), a leaf for this chunk
            with torch.enable_grad(), restore_autocast(ctx.autocast):
                out_c = ctx.fn(x_c)
            torch.autograd.backward(out_c, grad_out[:, cols])
            grad_x[:, cols] = x_c.grad
        return None, None, grad_x


def tiled_mlp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """`fn(x)` for a per-token `fn` on x (B, S, d), computed `chunk` tokens at a time.

    `chunk` <= 0 or >= S: plain `fn(x)`. Without autograd (evaluation) the chunks simply run
    one after another.
    """
    if chunk <= 0 or chunk >= x.shape[1]:
        return fn(x)
    if not torch.is_grad_enabled():
        return torch.cat([fn(x_c) for x_c in x.split(chunk, dim=1)], dim=1)
    if not x.requires_grad:  # no input gradient to route: plain checkpoint-free path
        return fn(x)
    return _TiledMLP.apply(fn, chunk, x)
