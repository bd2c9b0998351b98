"""The padded vocabulary columns of the head's logits: masked to -inf where they are made.

The embedding and the head have `padded_vocab(vocab_size)` rows (config/parallel.py: a multiple
of 128, for the matmul kernels and the tp split). The rows >= `vocab_size` are no token: no id
reaches them as input or as target, and they are dropped on export. Their logits must not enter
any softmax either: a zero row (what `model.init_from` loads there) gives each padding column a
logit of 0, i.e. a share exp(0 - lse) of the normaliser — 84 columns of a 300-token vocabulary
added ~0.07 nats to an imported Llama's loss — and a random row (`init_weights`) a varying
share. So the model sets those columns to -inf once, where the logits are made (`GPT._logits`);
everything downstream — the training loss (dense, tiled, vocab-parallel), evaluation's loss and
top-1 — then gives them probability exactly 0 and can never predict them, in every layout, and
a model's loss is the same from its run dir and from its export (where the rows do not exist).

Gradients: the mask's backward is zero on the padding columns, so the padded head rows get an
exact zero gradient (under tp too) and never train; AdamW's update of a zero-gradient row is 0
and weight decay only shrinks it towards 0 (docs/architecture.md).
"""
from __future__ import annotations

import torch

from .init import _is_dtensor


def mask_padded_vocab_(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the columns >= `vocab_size` of `logits` (..., Vpad) to -inf in place; return it.

    Nothing happens without padding (a vocab_size that is a multiple of 128). Plain logits: one
    fill of the (..., Vpad - vocab_size) tail, no copy. A DTensor (the tp plan's Shard(-1)
    logits, each rank holding a column range): `masked_fill_` with a (Vpad,) boolean mask laid
    out like the logits' last dim, so each rank masks its own columns with no communication (a
    rank whose range is all padding masks all of it). Autograd-safe: the logits are a fresh
    matmul output that nothing saved for backward.
    """
    if logits.shape[-1] <= vocab_size:
        return logits
    if not _is_dtensor(logits):
        logits[..., vocab_size:] = float("-inf")
        return logits
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    last = logits.ndim - 1
    shape, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh,
                                                          logits.placements)
    columns = torch.arange(offset[last], offset[last] + shape[last], device=logits.device)
    placements = [Shard(0) if p.is_shard(last) else Replicate() for p in logits.placements]
    mask = DTensor.from_local(columns >= vocab_size, logits.device_mesh, placements,
                              run_check=False)  # (Vpad,), local: this rank's columns
    return logits.masked_fill_(mask, float("-inf"))
