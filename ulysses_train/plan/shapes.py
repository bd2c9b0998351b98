"""Per-rank sizes of one layout: parameters, local tokens, heads. Pure arithmetic (no torch).

Notation (per rank): B micro-batch rows, s = S'/P local tokens (S' = seq_len padded by
parallel/layout.py), T = B * s, tp tensor-parallel degree, P = sp, R = ring, U = P / R
Ulysses degree, hq = Hq / tp and hkv = Hkv / tp local heads of D = model.head_dim (d / Hq when
0; config/architecture.py head_dim: Qwen3 and Gemma 3 have Hq * D != d), F = ffn_hidden / tp,
V = padded vocabulary, n = the ZeRO sharding group: dp * sp, or parallel.shard_group ranks of it
under hybrid sharding (HSDP), whose dp * sp / n replicas each hold a full copy of the shards
(parallel/sharding.py, parallel/mesh.py ParallelDims.replicas), G = parallel.ulysses_chunks
head groups of the Ulysses exchange.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config.architecture import head_dim, layer_windows
from ..config.parallel import padded_vocab, shard_group_size
from ..config.schema import Config


@dataclass(frozen=True)
class Shapes:
    """Everything the memory and time models read, resolved for one rank of one layout."""

    L: int
    d: int
    hq: int
    hkv: int
    D: int
    F: int
    V: int
    B: int
    S: int  # true tokens per row
    s: int  # local tokens per row
    tp: int
    sp: int
    ring: int
    dp: int
    zero: int
    ac: str
    offload: bool
    mlp_chunk: int
    loss_chunk: int
    tied: bool
    qkv_bias: bool
    act_bytes: int  # 4 (fp32) or 2 (bf16 autocast)
    accum: int  # micro-batches per optimizer step
    shard_group: int  # ranks of dp * sp that ZeRO shards over, resolved (0 / -1 -> dp * sp)
    windows: tuple[int, ...] = ()  # each layer's attention window (0 = full; layer_windows)
    documents: bool = False  # data.document_mask: a per-row mask on top of causal
    qk_norm: bool = False  # model.qk_norm: an RMSNorm over each head's q and k (Qwen3, Gemma 3)
    sandwich: bool = False  # model.sandwich_norm: norms after attention and the MLP (Gemma 3)
    local_rope: bool = False  # sliding layers have their own RoPE tables (model.rope_local_theta)
    chunks: int = 1  # parallel.ulysses_chunks: G pipelined head groups of the Ulysses exchange
    compile: bool = False  # train.compile: bf16 weights are cast per use (no WeightCasts cache)

    @property
    def S_pad(self) -> int:
        """Tokens per row the attention kernel sees whole (S' = s * sp): under Ulysses each
        rank's kernel runs the whole padded row for its share of the heads."""
        return self.s * self.sp

    def window(self, layer: int) -> int:
        """Layer `layer`'s attention window (0 = full causal)."""
        return self.windows[layer] if self.windows else 0

    @property
    def T(self) -> int:
        return self.B * self.s

    @property
    def U(self) -> int:
        return self.sp // self.ring

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 wraps the model: zero > 0 with more than one rank in dp * sp
        (parallel/sharding.py apply_sharding), even when a shard group is one rank."""
        return self.zero > 0 and self.dp * self.sp > 1

    @property
    def n_shard(self) -> int:
        """How many ways ZeRO divides parameters, gradients and optimizer state: the shard group
        (dp * sp unless parallel.shard_group makes it smaller); 1 at zero 0."""
        return self.shard_group if self.zero > 0 else 1

    @property
    def replicas(self) -> int:
        """Copies of each shard (dp * sp / shard_group; 1 = plain ZeRO): HSDP all-reduces the
        reduce-scattered gradients across them."""
        return self.dp * self.sp // self.shard_group

    @property
    def G(self) -> int:
        """Head groups the Ulysses exchange is pipelined in (parallel/ulysses_pipeline.py); 1
        without Ulysses (U = 1), where parallel.ulysses_chunks must be 1."""
        return self.chunks if self.U > 1 else 1

    @property
    def kv_resident(self) -> bool:
        """Whether the pipeline's kv heads travel once, with group 0, and stay (HeadGroups.resident:
        G does not divide the max(hkv / U, 1) kv heads a rank attends with)."""
        return max(self.hkv // self.U, 1) % self.G != 0

    @property
    def kv_attn(self) -> int:
        """kv heads per local token in the attention layout: max(hkv, U) (parallel/comm.py
        replicates a kv head to every Ulysses rank whose query heads read it when hkv < U)."""
        return max(self.hkv, self.U)

    def block_matrix_params(self) -> int:
        """Matmul weights of one block on this rank: wq, wo (d x hq D), wk, wv (d x hkv D),
        w1, w3, w2 (d x F)."""
        d, D = self.d, self.D
        return 2 * d * self.hq * D + 2 * d * self.hkv * D + 3 * d * self.F

    def block_params(self) -> int:
        """All parameters of one block on this rank: matrices, q/k/v biases, the two pre-norms
        (2 d), with `qk_norm` the q and k norms (2 D, one weight shared by every head, whole on
        every tp rank), with `sandwich` the post-attention and post-MLP norms (2 d)."""
        bias = (self.hq + 2 * self.hkv) * self.D if self.qkv_bias else 0
        norms = 2 * self.d * (2 if self.sandwich else 1) + (2 * self.D if self.qk_norm else 0)
        return self.block_matrix_params() + bias + norms

    def root_params(self) -> int:
        """Embedding (V x d, vocab-parallel over tp), head (unless tied), final norm."""
        table = self.V * self.d // self.tp
        return table * (1 if self.tied else 2) + self.d

    def params(self) -> int:
        return self.L * self.block_params() + self.root_params()


def padded_seq(seq_len: int, sp: int, ring: int) -> int:
    """S' of parallel/layout.py: S rounded up to a multiple of P (ring 1) or 2P (ring > 1)."""
    multiple = sp if ring == 1 else 2 * sp
    return -(-seq_len // multiple) * multiple


def shapes_of(cfg: Config, world_size: int, device: str = "cuda") -> Shapes:
    """The per-rank shapes of `cfg` on `world_size` ranks; `device` (cpu | cuda) decides what
    train.precision=auto means (model/precision.py resolve_dtype: fp32 on CPU, bf16 on GPU)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    ring = getattr(p, "ring", 1)  # parallel.ring arrives with the ring branch
    dp = p.dp if p.dp > 0 else world_size // (p.tp * p.sp)
    precision = t.precision if t.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    s = padded_seq(cfg.data.seq_len, p.sp, ring) // p.sp
    accum = max(1, t.global_batch_size // (t.micro_batch_size * dp))
    windows = tuple(layer_windows(m))
    return Shapes(L=m.n_layers, d=m.d_model, hq=m.n_heads // p.tp, hkv=m.n_kv_heads // p.tp,
                  D=head_dim(m), F=m.ffn_hidden // p.tp,
                  V=padded_vocab(m.vocab_size), B=t.micro_batch_size, S=cfg.data.seq_len, s=s,
                  tp=p.tp, sp=p.sp, ring=ring, dp=dp, zero=p.zero,
                  ac=t.activation_checkpointing, offload=t.activation_offload,
                  mlp_chunk=t.mlp_chunk, loss_chunk=t.loss_chunk, tied=m.tie_embeddings,
                  qkv_bias=m.qkv_bias, act_bytes=2 if precision == "bf16" else 4, accum=accum,
                  shard_group=shard_group_size(p.shard_group, dp * p.sp),
                  windows=windows, documents=cfg.data.document_mask, qk_norm=m.qk_norm,
                  sandwich=m.sandwich_norm,
                  local_rope=bool(m.rope_local_theta) and any(windows),
                  chunks=getattr(p, "ulysses_chunks", 1), compile=t.compile)
