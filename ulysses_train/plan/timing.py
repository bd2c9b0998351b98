"""Step time of one layout: FLOPs at a sustained rate plus the collectives that do not hide.

Compute: `model_flops` (model/flops.py: 6·N per token + attention over the visible pairs,
Kaplan et al. 2020 / Chowdhery et al. 2022 app. B) of the global batch, divided evenly over the
ranks (tp splits every matmul and the heads, sp the tokens, dp the rows), plus recomputation:
full checkpointing repeats the forward (+1/3), selective repeats it except the attention kernel,
a tiled MLP repeats the MLP forward, a tiled loss the head forward. Attention is priced layer by
layer over each row as one span (the planner does not know the documents; they only remove
pairs): S² per full layer, span_count(S, W) ≈ 2·W·S per sliding-window layer (the kernels skip
the blocks outside the window), so a sliding layer's kernel time is ∝ W, not S.

Communication, bytes per rank per step, at the bandwidth of the link the group crosses (intra
node when the group's ranks fit in one node: mesh order dp, sp, tp puts tp peers, then sp peers,
next to each other; parallel/mesh.py). A ring all-reduce moves 2·(n-1)/n of the buffer, an
all-gather or reduce-scatter (n-1)/n, an all-to-all (n-1)/n (Thakur et al. 2005):
- Ulysses (Jacobs et al. 2023): per layer, q/k/v out and the output back, forward and backward
  (again in recompute under full checkpointing): exposed (attention waits for it). With
  parallel.ulysses_chunks = G > 1 head groups (parallel/ulysses_pipeline.py) each exchange is
  hidden up to one group's kernel time, the first group's inbound and the last group's outbound
  exchange exposed (`pipelined_exposed`); on CUDA with FlexAttention (documents or sliding
  layers) the pipeline recomputes each group's forward in backward (group_kernels.Recompute):
  one more attention forward, counted in compute.
- ring (Liu et al. 2023): per full layer the K/V block R-1 times forward, K/V and fp32 dK/dV
  backward; per sliding-window layer (0 < W < S) only the halo its window reaches
  (parallel/ring_window.py: the K/V tokens the busiest rank sends, <= 2(W-1), forward and
  again backward, plus fp32 dK/dV of the tokens it received; `ring_layer_bytes`). Overlapped
  with the attention kernel (parallel/ring.py posts step t+1 before step t's kernel; the halo
  is posted before the local blocks), so only what exceeds attention's time is exposed.
- tensor parallel (Shoeybi et al. 2019): 2 all-reduces of (T, d) per block forward, 2 backward
  (+2 in recompute): exposed.
- data parallel: zero 0 all-reduces the fp32 gradients once after backward (exposed, the
  trainer reduces after the last micro-batch); zero 2/3 all-gather parameters and
  reduce-scatter gradients per block, which FSDP2 prefetches behind compute: exposed only
  beyond compute. Per step, zero 2 gathers once and reduce-scatters once (parameters stay
  gathered and gradients unreduced until the last micro-batch, parallel/sharding.py
  set_last_micro_batch); zero 3 gathers twice (forward, backward) and reduce-scatters once per
  micro-batch. The group is the shard group of n = parallel.shard_group ranks (dp·sp by
  default), spanning tp·n consecutive ranks (parallel/mesh.py: a shard group is a block of
  consecutive ranks), so a node-sized group stays on the intra-node link.
- hybrid sharding (HSDP, r = dp·sp / n replicas > 1; parallel/sharding.py): after each block's
  reduce-scatter, FSDP2 all-reduces the rank's fp32 gradient shard across the r replicas, once
  per step (on the last micro-batch only): 4·N/n bytes per rank (N parameters of this tp rank)
  at ring cost 2·(r-1)/r, over a group strided by tp·n ranks, so it spans the world (the
  inter-node link beyond one node). It overlaps backward like the in-group collectives and
  shares their budget: t_zero + t_replica is hidden behind compute, the rest is exposed (the
  in-group collectives take the budget first; the replica all-reduce is the part that waits).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..config.architecture import head_dim, layer_windows
from ..config.schema import Config
from ..model.flops import attention_flops, model_flops, row_spans
from .shapes import Shapes

DEFAULT_TFLOPS = 360.0  # sustained bf16 TFLOP/s per GPU: our H200 runs (docs/benchmarks.md, 36 % MFU)
PEAK_TFLOPS = 989.0  # dense bf16 peak of H100/H200 SXM (metrics.PEAK_FLOPS), for MFU


@dataclass
class Links:
    gpus_per_node: int
    intra_gbps: float  # Gbit/s per GPU inside a node
    inter_gbps: float  # Gbit/s per GPU between nodes

    def bytes_per_s(self, group_span: int) -> float:
        """Bandwidth of a group whose ranks are `group_span` consecutive ranks apart in all."""
        gbps = self.intra_gbps if group_span <= self.gpus_per_node else self.inter_gbps
        return gbps * 1e9 / 8


@dataclass
class StepTime:
    compute_s: float
    exposed_comm_s: float
    comm: dict  # collective -> (seconds, "exposed" | "overlapped")

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s


def step_time(cfg: Config, sh: Shapes, world: int, tflops: float, links: Links,
              device: str = "cuda") -> StepTime:
    """Predicted seconds of one optimizer step of `cfg` laid out as `sh` on `world` ranks
    (`device`: cpu | cuda, which decides the head-group pipeline's kernel, `regroup_recompute`)."""
    rows = cfg.train.global_batch_size
    spans = row_spans(cfg.model, sh.S, rows)  # window -> span count of the global batch
    flops = model_flops(cfg.model, rows * sh.S, spans) / world
    attention = attention_flops(cfg.model, spans) / world
    fwd = flops / 3
    extra = {"none": 0.0, "full": fwd, "selective": fwd - attention / 3}[sh.ac]
    tokens = rows * sh.S / world * sh.tp  # tokens this rank runs (tp ranks run the same ones)
    if 0 < sh.mlp_chunk < sh.s:
        extra += 2 * 3 * sh.d * sh.F * tokens
    if 0 < sh.loss_chunk < sh.s:
        extra += 2 * sh.d * (sh.V // sh.tp) * tokens
    recompute = regroup_recompute(cfg, sh, device)
    if recompute:
        extra += attention / 3
    compute = (flops + extra) / (tflops * 1e12)
    attn_s = attention * (4 / 3 if sh.ac == "full" else 1) / (tflops * 1e12)
    comm = _collectives(sh, world, links, attn_s, compute)
    if sh.G > 1:  # the head-group pipeline hides its all-to-alls behind the kernels
        kernels = [2 * cfg.model.n_heads * head_dim(cfg.model) * spans[w] / world / sh.accum
                   / (tflops * 1e12) for w in layer_windows(cfg.model)]  # one forward, per layer
        comm.update(_pipelined(sh, links, kernels, 3 if recompute else 2))
    exposed = sum(t for t, how in comm.values() if how == "exposed")
    return StepTime(compute, exposed, comm)


def _collectives(sh: Shapes, world: int, links: Links, attn_s: float, compute_s: float) -> dict:
    a, T, L, micro = sh.act_bytes, sh.T, sh.L, sh.accum
    out = {}
    passes = 3 if sh.ac == "full" else 2  # forward, backward (+ recompute)
    if sh.U > 1:
        per_layer = T * (2 * sh.hq + 2 * sh.kv_attn) * sh.D * a * (sh.U - 1) / sh.U
        bw = links.bytes_per_s(sh.tp * sh.U)
        out["ulysses all-to-all"] = (per_layer * L * passes * micro / bw, "exposed")
    if sh.ring > 1:
        sent = sum(sum(ring_layer_bytes(sh, layer)) for layer in range(L))
        t = sent * micro / links.bytes_per_s(sh.tp * sh.sp)
        out["ring K/V"] = (max(0.0, t - attn_s), "exposed")
        out["ring K/V hidden"] = (min(t, attn_s), "overlapped")
    if sh.tp > 1:
        vol = T * sh.d * a * 2 * (sh.tp - 1) / sh.tp
        out["tp all-reduce"] = (vol * 2 * passes * L * micro / links.bytes_per_s(sh.tp), "exposed")
    if sh.dp * sh.sp > 1:
        out.update(_data_parallel(sh, world, links, compute_s))
    return out


def regroup_recompute(cfg: Config, sh: Shapes, device: str) -> bool:
    """Whether the head-group pipeline (G > 1, no ring) runs its kernel as `Recompute`
    (parallel/group_kernels.py): on CUDA the model's kernel is FlexAttention when there are
    documents or sliding layers (model.select_attention), which has no split forward/backward,
    so each group's forward runs again in backward."""
    masked = cfg.data.document_mask or any(layer_windows(cfg.model))
    return sh.G > 1 and sh.ring == 1 and device == "cuda" and masked


def pipelined_exposed(first: float, last: float, kernel: float, groups: int) -> float:
    """Exposed seconds of one pass of one layer's Ulysses exchanges over G = `groups` head
    groups (parallel/ulysses_pipeline.py). `first`: the whole inbound exchange (forward q/k/v,
    backward the output gradient), `last`: the whole outbound one (forward the output, backward
    dq/dk/dv), `kernel`: the attention kernel's seconds for all heads in this pass. Each group
    carries 1/G of either and its kernel takes k = kernel/G. The first group's inbound and the
    last group's outbound exchange wait for nothing to hide behind; group g+1's inbound runs
    during kernel g, and with it group g-1's outbound (one link: they add up), so
        exposed = (first + last)/G + max(0, first/G - k) + (G - 2) max(0, (first + last)/G - k)
                  + max(0, last/G - k),
    and G = 1 (nothing overlaps) is first + last exactly."""
    if groups == 1:
        return first + last
    g, k = groups, kernel / groups
    return ((first + last) / g + max(0.0, first / g - k) + max(0.0, last / g - k)
            + (g - 2) * max(0.0, (first + last) / g - k))


def _pipelined(sh: Shapes, links: Links, kernels: list, backward_kernels: int) -> dict:
    """The Ulysses entries of the step under G > 1 head groups: exposed and hidden seconds,
    summed over layers (`kernels`: each layer's attention forward seconds per micro-batch) and
    passes (forward, backward with `backward_kernels` forwards' worth of kernel time, and the
    recomputed forward under full checkpointing)."""
    frac = (sh.U - 1) / sh.U / links.bytes_per_s(sh.tp * sh.U)
    qkv = sh.T * (sh.hq + 2 * sh.kv_attn) * sh.D * sh.act_bytes * frac  # q/k/v (dq/dk/dv)
    out = sh.T * sh.hq * sh.D * sh.act_bytes * frac  # the output (its gradient)
    exposed = 0.0
    for fwd in kernels:
        forward = pipelined_exposed(qkv, out, fwd, sh.G)
        exposed += forward * (2 if sh.ac == "full" else 1)
        exposed += pipelined_exposed(out, qkv, backward_kernels * fwd, sh.G)
    passes = 3 if sh.ac == "full" else 2
    total = (qkv + out) * len(kernels) * passes * sh.accum
    return {"ulysses all-to-all": (exposed * sh.accum, "exposed"),
            "ulysses all-to-all hidden": (total - exposed * sh.accum, "overlapped")}


def ring_layer_bytes(sh: Shapes, layer: int) -> tuple[int, int]:
    """(forward, backward) bytes one rank sends in the ring of layer `layer`, per micro-batch.

    Full layer: the (2, B, S'/R, kv, D) K/V block R-1 times forward; backward the K/V again and
    fp32 dK/dV R times. Sliding-window layer with 0 < W < S (W >= S runs the full ring): the
    halo exchange's K/V tokens of the busiest ring rank (`halo_tokens_sent`, <= 2(W-1)) forward
    and again backward, plus fp32 dK/dV of the tokens it received (`halo_tokens_received`):
    docs/attention.md's formula, which tests/parallel/test_ring_window.py checks against
    counted bytes."""
    a, kv = sh.act_bytes, sh.B * sh.kv_attn * sh.D  # elements per token of K (or of V)
    window = sh.window(layer)
    if 0 < window < sh.S:
        sent, received = _halo_tokens(sh.ring, sh.S_pad // (2 * sh.ring), window)
        forward = 2 * kv * sent * a
        return forward, forward + 2 * kv * received * 4
    block = 2 * sh.T * sh.kv_attn * sh.D
    return block * a * (sh.ring - 1), block * a * (sh.ring - 1) + block * 4 * sh.ring


@lru_cache(maxsize=256)
def _halo_tokens(ring: int, chunk: int, window: int) -> tuple[int, int]:
    """(sent, received) K tokens of the busiest ring rank per halo exchange."""
    from ..parallel.ring_window import halo_tokens_received, halo_tokens_sent

    return (max(halo_tokens_sent(r, ring, chunk, window) for r in range(ring)),
            max(halo_tokens_received(r, ring, chunk, window) for r in range(ring)))


def _data_parallel(sh: Shapes, world: int, links: Links, compute_s: float) -> dict:
    """Seconds of the gradient (and, under ZeRO, parameter) collectives over dp·sp: see the
    module docstring for the volumes; zero > 0 hides them behind `compute_s` together."""
    n, a, micro = sh.dp * sh.sp, sh.act_bytes, sh.accum
    if sh.zero == 0:
        frac = (n - 1) / n
        return {"dp gradient all-reduce": (4 * sh.params() * 2 * frac / links.bytes_per_s(world),
                                           "exposed")}
    n, r = sh.n_shard, sh.replicas
    gathers, scatters = (1, 1) if sh.zero == 2 else (2 * micro, micro)
    vol = (a * sh.params() * gathers + 4 * sh.params() * scatters) * (n - 1) / n
    t_zero = vol / links.bytes_per_s(sh.tp * n)
    out = {"zero all-gather + reduce-scatter": (max(0.0, t_zero - compute_s), "exposed"),
           "zero hidden": (min(t_zero, compute_s), "overlapped")}
    if r > 1:  # HSDP: all-reduce each rank's fp32 gradient shard across the r replicas
        t = 4 * sh.params() / n * 2 * (r - 1) / r / links.bytes_per_s(world)
        left = max(0.0, compute_s - t_zero)  # compute not already hiding the in-group ones
        out["hsdp replica all-reduce"] = (max(0.0, t - left), "exposed")
        out["hsdp replica hidden"] = (min(t, left), "overlapped")
    return out


def mfu(cfg: Config, step_s: float, world: int) -> float:
    """Model FLOPs (no recompute) per second over the peak of all ranks."""
    rows, S = cfg.train.global_batch_size, cfg.data.seq_len
    flops = model_flops(cfg.model, rows * S, row_spans(cfg.model, S, rows))
    return flops / step_s / (world * PEAK_TFLOPS * 1e12)
