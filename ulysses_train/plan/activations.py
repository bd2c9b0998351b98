"""Activation bytes of one block: what autograd keeps for backward, and the working sets.

Method: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", sec. 4) count, op by op, the tensors a layer saves for backward. We redo that count for
*this* block (model/block.py: RMSNorm, q/k/v/o projections, QK-norm, RoPE, SDPA/Flash attention,
the post-attention and post-MLP norms of `model.sandwich_norm`, a gated MLP; no dropout, so none
of their mask bytes; FlashAttention, so none of their 5·a·s/h score bytes) and for each layout;
the functions below list every tensor they count. All results are bytes for the T = B·s local
tokens of one rank (shapes.py), a = activation bytes (4 fp32, 2 bf16 autocast), statistics fp32.
Heads are hq, hkv of width D = model.head_dim, which need not be d / Hq (Qwen3, Gemma 3): every
per-head tensor below is hq·D or hkv·D wide, only the residual stream and the norms on it d.
"""
from __future__ import annotations

from .shapes import Shapes

FP32 = 4


def norm_saved(sh: Shapes, device: str, width: int = 0) -> int:
    """Bytes one RMSNorm keeps per normalised row of `width` values (0 = d, a norm on the
    residual stream). fp32: `F.rms_norm`, which on CPU is torch's composite (keeps x, the
    normalised x·rstd and rstd: 2w + 1 values) and on CUDA the fused kernel (x and rstd). Lower
    precision: `_LowPrecisionRMSNorm` keeps x (a bytes) and fp32 rstd: w·a + 4."""
    w = width or sh.d
    if sh.act_bytes == FP32 and device == "cpu":
        return 2 * w * FP32 + FP32
    return w * sh.act_bytes + FP32


def qk_norm_saved(sh: Shapes, device: str) -> int:
    """Bytes QK-norm (`model.qk_norm`) keeps per token: its inputs, the wq and wk outputs, which
    nothing else keeps (RoPE saves only cos and sin), normalised per head over D:
    (hq + hkv) · norm_saved(D) (hkv, not kv_attn: the norm runs before the all-to-all)."""
    return (sh.hq + sh.hkv) * norm_saved(sh, device, sh.D) if sh.qk_norm else 0


def attention_saved(sh: Shapes, device: str) -> int:
    """Bytes the attention half keeps per token besides its pre-norm: the kernel's q, k, v,
    out and fp32 LSE (k/v in the attention layout, kv_attn heads), the projection input n1
    (wq/wk/wv share one), when the output came through the Ulysses all-to-all (U > 1) wo's
    input, and the QK-norms' inputs (`qk_norm_saved`). With U = 1 the kernel returns out in
    (B, S, H, D) memory order, so wo's input is the same storage (model/attention.py's
    `.contiguous()` is a no-op). Gemma's q scale (query_pre_attn_scalar != D) is a multiply by a
    Python float, which saves nothing.
        (2 hq + 2 kv_attn) D a + 4 hq + [U > 1] hq D a + d a + qk_norm_saved"""
    a, D = sh.act_bytes, sh.D
    kernel = (2 * sh.hq + 2 * sh.kv_attn) * D * a + FP32 * sh.hq
    wo_in = sh.hq * D * a if sh.U > 1 else 0
    return kernel + wo_in + sh.d * a + qk_norm_saved(sh, device)


def mlp_saved(sh: Shapes) -> int:
    """The gated MLP keeps n2 (w1/w3 input) and, untiled, w1 x, act(w1 x), w3 x and their
    product (4 F values); tiled (model/tiling.py) only n2. The same for SwiGLU and GeGLU: torch's
    silu and tanh-GELU each save only their input (SiluBackward / GeluBackward, in the input's
    dtype under autocast too: neither is on autocast's fp32 list)."""
    tiled = 0 < sh.mlp_chunk < sh.s
    return sh.d * sh.act_bytes + (0 if tiled else 4 * sh.F * sh.act_bytes)


def mask_saved(sh: Shapes, device: str, window: int) -> int:
    """Bytes one layer's attention kernel keeps for its mask (a layer with `window` W, 0 = full).

    Only CPU has an S^2 term: SDPA gets the dense boolean mask there (model/attention.py
    `_visible`: a sliding window, documents, or both) and its CPU flash kernel saves the mask
    converted to an additive one in q's dtype for backward: (1 or B, 1, S', S') values, B with
    documents (a per-row mask), 1 for a window alone. It does not depend on W: the dense mask
    is S'^2 whatever the window. On CUDA the mask is FlexAttention's BlockMask, which the kernel
    reads but nothing keeps per layer (`mask_tables`). A ring's blocks (ring > 1) are not
    priced here: sliding layers are refused under a ring (config/validate.py).
    """
    if device != "cpu" or sh.ring > 1 or not (window or sh.documents):
        return 0
    return (sh.B if sh.documents else 1) * sh.S_pad**2 * sh.act_bytes


def mask_tables(sh: Shapes, device: str) -> int:
    """The masks built once and shared by every layer, alive through forward and backward.

    CPU: the dense boolean (S', S') per distinct window (model/masking.py `window_dense`,
    cached) or, with documents, (B, 1, S', S') per distinct window, full layers included
    (`DocumentMask.dense`), one byte per entry. CUDA: FlexAttention's BlockMask per distinct
    window (plus one for full layers under documents): kv_num_blocks / kv_indices and their
    full-block and transposed (q_) twins, int32 (B or 1, 1, S'/128, S'/128) each, ~16 bytes
    per 128 x 128 block: 16 MiB per row at 128k tokens. 0 without window and documents.
    """
    if sh.ring > 1:
        return 0
    masked = {w for w in (sh.windows or (0,)) if w or sh.documents}
    rows = sh.B if sh.documents else 1
    if device == "cpu":
        return len(masked) * rows * sh.S_pad**2
    blocks = -(-sh.S_pad // 128)
    return len(masked) * rows * 16 * blocks**2


def block_saved(sh: Shapes, device: str, window: int = 0) -> int:
    """Bytes one block with attention window `window` (0 = full) keeps with no checkpointing
    (the block input is the first norm's x), its mask included (`mask_saved`):
        T · (n · norm_saved(d) + attention_saved + mlp_saved) + mask_saved,
    n = 2 pre-norms, 4 with `sandwich_norm` (the post-attention norm keeps wo's output, the
    post-MLP norm w2's output, each (B, s, d), which nothing else keeps)."""
    norms = 4 if sh.sandwich else 2
    per_token = norms * norm_saved(sh, device) + attention_saved(sh, device) + mlp_saved(sh)
    return sh.T * per_token + mask_saved(sh, device, window)


def block_kept(sh: Shapes, device: str, window: int = 0) -> int:
    """Bytes one block keeps between its forward and its backward, by checkpointing mode.

    full: the block input. selective (parallel/activations.py): the input plus the outputs of
    the ops it must save: the attention kernel's out and LSE, and with U > 1 both all-to-all
    results (q/k/v in the head layout, the output back in the sequence layout); the kernel's
    mask is an input, recomputed with the rest (`block_saved` - this, in backward).
    With offload on a GPU the block input moves to the host (`host_parked`)."""
    a, T = sh.act_bytes, sh.T
    if sh.ac == "none":
        return block_saved(sh, device, window)
    x = 0 if (sh.offload and device == "cuda" and offloaded(sh)) else T * sh.d * a
    if sh.ac == "full":
        return x
    keep = T * (sh.hq * sh.D * a + FP32 * sh.hq)
    if sh.U > 1:
        keep += T * ((sh.hq + 2 * sh.kv_attn) * sh.D * a + sh.hq * sh.D * a)
    return x + keep


def offloaded(sh: Shapes) -> bool:
    """ActivationOffload parks only tensors of >= 1 MiB (its min_bytes)."""
    return sh.T * sh.d * sh.act_bytes >= 1 << 20


def host_parked(sh: Shapes) -> int:
    """Host bytes activation offload parks per step: one block input per layer."""
    return sh.L * sh.T * sh.d * sh.act_bytes if sh.offload and offloaded(sh) else 0


def rope_tables(sh: Shapes) -> int:
    """cos and sin, fp32 (B, s, 1, D), built once per forward and shared by every layer; twice
    when the sliding layers have their own base (`model.rope_local_theta`, Gemma 3)."""
    return 2 * sh.T * sh.D * FP32 * (2 if sh.local_rope else 1)


def rope_transient(sh: Shapes) -> int:
    """RoPE of q in fp32 (model/rope.py): x·cos, the rotated half pair and its product with
    sin, and their sum, ~3.5 q-sized fp32 temporaries at once (plus the fp32 copy of a bf16 q)."""
    q = sh.T * sh.hq * sh.D
    return int(3.5 * q * FP32) + (q * FP32 if sh.act_bytes != FP32 else 0)


def ulysses_buffer(sh: Shapes) -> int:
    """The all-to-all send buffer of q, k, v packed (parallel/comm.py `_pack_qkv`), alive with
    the receive buffer (which the kernel keeps). 0 without Ulysses."""
    if sh.U == 1:
        return 0
    return sh.T * (sh.hq + 2 * sh.kv_attn) * sh.D * sh.act_bytes


def ring_buffers(sh: Shapes) -> int:
    """Ring attention (parallel/ring.py): besides its own K/V block, the block being received
    for the next step is in flight (forward; backward K/V and fp32 dK/dV travel together)."""
    if sh.ring == 1:
        return 0
    kv_block = 2 * sh.T * sh.kv_attn * sh.D  # elements of (2, B, S'/R, kv, D) per rank
    return kv_block * sh.act_bytes + kv_block * FP32 * 2  # backward: K/V + dK/dV in flight


def block_backward_transient(sh: Shapes, device: str) -> int:
    """The largest working set of one block's backward beyond what it keeps.

    MLP (untiled): grad of the product, then grads of silu(w1 x) and w3 x while the product's
    grad is still referenced: 3 F values per token less the freed product; tiled: the same for
    one chunk plus the full input gradient. Attention: dq, dk, dv (head layout) plus, under
    Ulysses, their packed send buffer and the received gradient. The larger of the two.
    """
    a, T = sh.act_bytes, sh.T
    tiled = 0 < sh.mlp_chunk < sh.s
    rows = sh.B * sh.mlp_chunk if tiled else T
    mlp = (4 * rows * sh.F + (T * sh.d if tiled else 0)) * a if tiled else 2 * rows * sh.F * a
    grads_qkv = T * (sh.hq + 2 * sh.kv_attn) * sh.D * a
    attn = grads_qkv + (2 * grads_qkv if sh.U > 1 else 0) + T * sh.d * a
    return max(mlp, attn - head_groups_relief(sh, mlp)) + ring_buffers(sh)


def head_groups_relief(sh: Shapes, mlp: int) -> int:
    """What G > 1 head groups take off the attention term above, given the MLP's `mlp`: the
    block's backward peak is the larger of the two, so only the part of the pipeline's
    saving (`head_groups_saving`) that lowers max(mlp, attention) counts, with the attention's
    working set at G = 1 counted as the layer's X + Q (measured), its incoming gradient Q and
    the residual stream's gradient T d. 0 at G = 1, so today's terms stay exact."""
    saving = head_groups_saving(sh)
    if saving == 0:
        return 0
    q = sh.T * sh.hq * sh.D * sh.act_bytes
    single = ulysses_buffer(sh) + 2 * q + sh.T * sh.d * sh.act_bytes
    return max(mlp, single) - max(mlp, single - saving)


def head_groups_saving(sh: Shapes) -> int:
    """Bytes by which G = parallel.ulysses_chunks > 1 pipelined head groups
    (parallel/ulysses_pipeline.py) change the attention backward's peak beyond what the block
    keeps, against UlyssesAttention's: positive = lower, negative = higher (G = 2 can be).
    0 at G = 1 (the terms above are today's, unchanged) and under a ring (not measured there).

    Counted from the layer's code, per rank: Q = q bytes (T hq D a), X = `ulysses_buffer`
    (q, k, v: Q + KV). UlyssesAttention's backward peaks in the kernel's backward: dq, dk, dv
    and the received output gradient, X + Q. The pipeline's (each group's buffers are 1/G):
    - kv split over the groups: in group 1's backward, group 0's saved q/k/v/out gone
      (-(X + Q)/G), its gradients in flight (send + receive, 2X/G), group 1's output gradient
      and its contiguous copy, dq/dk/dv, group 2's output gradient in flight (2Q/G, none when
      G = 2): (2X + 3Q)/G; in group 0's: (X + 4Q)/G;
    - kv resident (`Shapes.kv_resident`: all kv heads travel with group 0, in its receive
      buffer, which lives until the last group): the fp32 sums of the kv gradients (KV·4/a)
      through the backward, plus in group 1's backward 6Q/G (5Q/G in group 0's) and one
      group's kv gradients (KV/hkv', the group reads one of the hkv' kv heads);
    - at the end, the received pieces (X) assembled into dq, dk, dv (X) once every saved
      tensor (X + Q) is gone: X - Q, plus Q/G measured beyond that count.
        change = X + Q - max(pipeline peaks above)
    Measured (MemTracker, the layer alone, sp=4 gloo, B=1 S=2048 D=64 Hq=32 fp32; peak beyond
    what it keeps, in Q; docs/planner.md): Hkv=32: G=1 4.00, G=2 3.50, G=4 2.25, G=8 2.11
    (model 4.00, 3.50, 2.25, 2.12); Hkv=8 (G=4, 8 resident): 2.50, 2.75, 2.25, 1.37 (model
    2.50, 2.75, 2.25, 1.50); Hkv=4 (resident): 2.25, 3.00, 2.00, 1.12 (model 2.25, 3.00, 2.00,
    1.25). The forward's peak does not fall with G (Hkv=32: 1.0, 1.5, 1.0, 0.5 Q beyond what it
    keeps): no forward term changes.
    """
    g = sh.G
    if g == 1 or sh.ring > 1:
        return 0
    q = sh.T * sh.hq * sh.D * sh.act_bytes
    x = ulysses_buffer(sh)
    kv = x - q
    if sh.kv_resident:
        kv_heads = max(sh.hkv // sh.U, 1)
        piped = kv * FP32 // sh.act_bytes + (6 if g > 2 else 5) * q // g + kv // kv_heads
    else:
        piped = max((2 * x + (3 if g > 2 else 1) * q) // g, (x + 4 * q) // g)
    return x + q - max(piped, x - q + q // g)


def block_forward_transient(sh: Shapes) -> int:
    """The largest working set of one block's forward beyond what it keeps: RoPE temporaries
    or the Ulysses send buffer, or, tiled, one chunk's SwiGLU intermediates and the output."""
    tiled = 0 < sh.mlp_chunk < sh.s
    mlp = (4 * sh.B * sh.mlp_chunk * sh.F + 2 * sh.T * sh.d) * sh.act_bytes if tiled else 0
    return max(rope_transient(sh), ulysses_buffer(sh), mlp) + ring_buffers(sh)


def head_working_set(sh: Shapes, backward: bool) -> int:
    """Logits-sized bytes of the output head + loss for one tile of c tokens (c = s untiled).

    Forward: logits and their log-softmax (cross-entropy keeps the latter); under bf16 the
    head's bf16 logits and their fp32 copy. Backward: log-softmax, its incoming gradient and
    the logits' gradient (model/gpt.py `token_loss_sum`, model/tiling.py)."""
    c = sh.loss_chunk if 0 < sh.loss_chunk < sh.s else sh.s
    rows = sh.B * c * sh.V
    if backward:
        return 3 * rows * FP32
    return rows * (2 * FP32 + (sh.act_bytes if sh.act_bytes != FP32 else 0))


def head_kept(sh: Shapes) -> int:
    """Untiled, the log-softmax (fp32, T x V) stays from forward to backward; tiled, nothing."""
    return 0 if 0 < sh.loss_chunk < sh.s else sh.T * sh.V * FP32
