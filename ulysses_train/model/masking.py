"""Document masking: which keys a query may see when a packed row holds several documents.

With `data.document_mask=true` a token attends only to earlier tokens of its own document
(causal within the document), and its position restarts at 0 at each document start (the data
pipeline does that; docs/architecture.md §1: the two always go together). The mask is a property of
the *global* row: under Ulysses the local kernel sees the whole sequence `(B, S, H/P, D)`, so a
`DocumentMask` is built once per micro-batch from the unsliced document ids, which every
sequence-parallel rank holds anyway, and handed unchanged to every layer and every rank.

Each kernel wants a different description of the same mask; `DocumentMask` computes each one on
first use and keeps it (every layer reuses it):
- `block_mask(window)`: a FlexAttention `BlockMask` (the CUDA path), O(B * S^2 / 128^2) memory;
- `varlen()`: `cu_seqlens` / `max_seqlen` over the flattened `(B*S)` token stream, for
  flash-attn's varlen kernel (rows are flattened, so it works for any B);
- `dense(window)`: a boolean `(B, 1, S, S)` matrix for SDPA and the eager reference, B * S^2
  bytes (1 GiB per row at 32k tokens): the CPU fallback and tests, never long sequences.
A sliding-window layer (`model.sliding_window` W > 0) sees the intersection: same document,
causal, and i - W < j (token indices of the global row; within one document they differ exactly
as the restarted positions do). `block_mask` and `dense` take the window and cache one form per
window; varlen needs none (flash-attn takes `window_size` itself). Without documents a window
alone is `window_dense` / `window_block_mask`, cached per (S, W, device).
Document ids are per row and need only be equal within a document and different between
neighbours (Batch.document_ids counts documents from 0 in each row; an EOS belongs to the
document it ends).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch


def _document_causal(document_ids: torch.Tensor) -> Callable:
    """FlexAttention mask_mod: key kv is visible from query q iff same document and kv <= q.

    A module-level factory, so every batch's closure has the same code object: a compiled
    create_block_mask / flex_attention then guards on it instead of recompiling per batch.
    """
    def mask_mod(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (kv_idx <= q_idx)
    return mask_mod


def _sliding_causal(window: int) -> Callable:
    """FlexAttention mask_mod: kv visible from q iff q - window < kv <= q (transformers'
    sliding_window_causal). Indices are positions in the global row."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
    return mask_mod


def _document_sliding_causal(document_ids: torch.Tensor, window: int) -> Callable:
    """FlexAttention mask_mod: same document, causal and within `window` (global indices)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return ((document_ids[b, q_idx] == document_ids[b, kv_idx]) & (kv_idx <= q_idx)
                & (q_idx - kv_idx < window))
    return mask_mod


def sliding_dense(seq: int, window: int, device) -> torch.Tensor:
    """(S, S) bool, True where key j is visible from query i: i - window < j <= i (window > 0)."""
    i = torch.arange(seq, device=device)
    dist = i[:, None] - i[None, :]  # (S, 1) - (1, S) -> (S, S): query index - key index
    return (dist >= 0) & (dist < window)


@functools.lru_cache(maxsize=8)
def window_dense(seq: int, window: int, device: torch.device) -> torch.Tensor:
    """`sliding_dense` built once per (S, W, device) and shared by every layer and step: the
    SDPA / eager form of a sliding window without documents, S^2 bytes."""
    return sliding_dense(seq, window, device)


@functools.lru_cache(maxsize=8)
def window_block_mask(seq: int, window: int, device: torch.device):
    """The FlexAttention BlockMask of a sliding window without documents (batch and heads
    broadcast), built once per (S, W, device): only the ~S/128 x (W/128 + 1) blocks near the
    diagonal are computed, the rest are skipped."""
    build = _block_mask_builder(device)
    return build(_sliding_causal(window), None, None, seq, seq, device=device)


def _block_mask_builder(device: torch.device) -> Callable:
    """Compiled create_block_mask on CUDA (long sequences); eager for the short CPU ones."""
    from torch.nn.attention.flex_attention import create_block_mask

    return _compiled_create_block_mask() if device.type == "cuda" else create_block_mask


@functools.cache
def _compiled_create_block_mask() -> Callable:
    """create_block_mask through torch.compile, built once per process.

    Eager create_block_mask materializes the whole S x S mask (16 GiB per row at 128k tokens);
    compiled, it evaluates the mask_mod block by block.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


class DocumentMask:
    """Causal-within-document attention mask of a batch of packed rows.

    Args:
        document_ids: `(B, S)` integer tensor of the *global* rows (not a sequence-parallel
            slice), on the device the attention runs on. Tokens of one document must be
            contiguous in their row (they are, in packed data).
        host_ids: the same ids on the CPU (the batch the micro-batch was built from,
            parallel/batching.py), or None: then `document_ids` itself when it is on the CPU,
            else a copy made here (a device->host sync, once per mask). What depends on the
            ids' *values* on the host (`varlen`'s cu_seqlens and max_seqlen, the ring's block
            skipping) reads them as numpy (`host`), so a training step never waits on the
            device for them.

    Owns nothing but caches; build a new one per micro-batch (rows and ids change). Kernels call
    `check(q)` to refuse a mask built for another batch or for a local slice.
    """

    def __init__(self, document_ids: torch.Tensor, host_ids: torch.Tensor | None = None):
        if document_ids.dim() != 2 or document_ids.dtype.is_floating_point:
            raise ValueError(f"document_ids must be an integer (B, S) tensor; got "
                             f"{document_ids.dtype} {tuple(document_ids.shape)}")
        self.document_ids = document_ids.contiguous()
        if host_ids is None:
            host_ids = document_ids if document_ids.device.type == "cpu" else document_ids.cpu()
        if host_ids.device.type != "cpu" or tuple(host_ids.shape) != tuple(document_ids.shape):
            raise ValueError(f"host_ids must be the document ids' CPU copy {tuple(document_ids.shape)}; "
                             f"got {host_ids.device} {tuple(host_ids.shape)}")
        self.host_ids = host_ids.contiguous()
        self._block_masks: dict[int, object] = {}  # by window (0 = none)
        self._varlen: tuple[torch.Tensor, int] | None = None
        self._dense: dict[int, torch.Tensor] = {}  # by window (0 = none)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.document_ids.shape)  # (B, S)

    def __repr__(self) -> str:
        return f"DocumentMask(shape={self.shape}, device={self.document_ids.device})"

    def check(self, q: torch.Tensor) -> None:
        """Raise ValueError unless q `(B, S, H, D)` covers exactly this mask's rows and tokens.

        Under Ulysses S must be the *global* length: a mask built from a rank's column slice
        would silently mask the wrong tokens, so it is refused here.
        """
        if tuple(q.shape[:2]) != self.shape:
            raise ValueError(f"DocumentMask of shape (B, S) = {self.shape} used for attention "
                             f"over (B, S) = {tuple(q.shape[:2])}: build the mask per micro-batch "
                             "from the global (unsliced) document ids")
        if q.device != self.document_ids.device:
            raise ValueError(f"DocumentMask is on {self.document_ids.device}, q on {q.device}")

    def block_mask(self, window: int = 0):
        """The FlexAttention BlockMask (B, 1 head broadcast, S, S), built once per window;
        `window` > 0 also bounds it to the last `window` tokens (sliding-window layers)."""
        if window not in self._block_masks:
            b, s = self.shape
            device = self.document_ids.device
            mask_mod = (_document_sliding_causal(self.document_ids, window) if window > 0
                        else _document_causal(self.document_ids))
            self._block_masks[window] = _block_mask_builder(device)(mask_mod, b, None, s, s,
                                                                    device=device)
        return self._block_masks[window]

    @property
    def host(self):
        """The ids as a (B, S) numpy array over the CPU copy's memory: read without a sync."""
        return self.host_ids.numpy()

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 (n_docs + 1,), max_seqlen) of the flattened (B*S) token stream.

        Each row is cut at its own start too, so rows never see each other once flattened.
        Computed from the host ids (max_seqlen must be a Python int for flash-attn), so no
        device sync; cu_seqlens is copied to the device without waiting.
        """
        if self._varlen is None:
            b, s = self.shape
            ids = self.host.reshape(-1)  # (B, S) -> (B*S,)
            opens = ids[1:] != ids[:-1]  # (B*S - 1,): token i + 1 opens a document
            opens[s - 1::s] = True  # and so does each row's first token
            cu = [0, *(opens.nonzero()[0] + 1).tolist(), b * s]  # (n_docs + 1,) Python ints
            cu_seqlens = torch.tensor(cu, dtype=torch.int32).to(self.document_ids.device,
                                                                 non_blocking=True)
            self._varlen = cu_seqlens, max(hi - lo for lo, hi in zip(cu, cu[1:]))
        return self._varlen

    def dense(self, window: int = 0) -> torch.Tensor:
        """(B, 1, S, S) bool, True where key j is visible from query i; B * S^2 bytes.
        `window` > 0 intersects it with the sliding window i - window < j (global indices)."""
        if window not in self._dense:
            s = self.shape[1]
            ids = self.document_ids
            same = ids[:, :, None] == ids[:, None, :]  # (B, S, 1) vs (B, 1, S) -> (B, S, S)
            if window > 0:
                seen = sliding_dense(s, window, ids.device)
            else:  # key <= query
                seen = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
            self._dense[window] = (same & seen).unsqueeze(1)  # (B, S, S) -> (B, 1, S, S)
        return self._dense[window]
