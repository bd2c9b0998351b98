"""Validation of the parallel layout (`parallel.*` against the world size and the model).

config/validate.py keeps the per-section checks and calls these. Every check is pure and collective-free: each rank runs it on the config alone,
before any process group exists, and the first bad value is raised as a `ConfigError` naming
its key (`error: <key>: ...`, exit 2 at the entry point).

The layout (docs/architecture.md §1): world = dp x sp x tp; the sequence-parallel group of `sp`
ranks is `ring` ring ranks x U = sp/ring Ulysses ranks. Heads are split over tp first, then the
Ulysses all-to-all splits each tp rank's heads over U (the ring passes K/V around instead of
splitting heads, so it adds no head rule). Any `data.seq_len` fits: rows are padded to
`SequenceLayout.padded_len` inside the data path.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import one_of, positive, require

if TYPE_CHECKING:  # schema.py imports padded_vocab from here; the types are for readers only
    from .schema import Config, ModelConfig, ParallelConfig

ZERO_STAGES = (0, 2, 3)
BACKENDS = ("auto", "nccl", "gloo")
MAX_TIMEOUT_S = 7 * 24 * 3600  # parallel.timeout_s upper bound
VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int) -> int:
    """Embedding/head rows: `vocab_size` rounded up to a multiple of 128.

    Why: matmul kernels are fastest on multiples of 128, and a tensor-parallel split of the head
    needs a row count divisible by tp. The extra rows are never inputs nor targets, and their
    logits are -inf (model/vocab.py): they take no probability and get no gradient.
    """
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def validate_parallel(p: "ParallelConfig", world_size: int) -> None:
    """The degrees alone: each positive, `ring` dividing `sp`, tp x sp x dp = `world_size`."""
    positive(p.tp, "parallel.tp")
    positive(p.sp, "parallel.sp")
    require(p.ring > 0, "parallel.ring", f"must be a positive number (1 = no ring), got {p.ring}")
    require(p.sp % p.ring == 0, "parallel.ring",
            f"{p.ring} does not divide parallel.sp={p.sp}: the sequence group of sp ranks is "
            "ring x Ulysses ranks; choose a ring that divides sp (1 = Ulysses only)")
    require(p.dp == -1 or p.dp > 0, "parallel.dp", f"must be -1 (the rest) or positive, got {p.dp}")
    one_of(p.zero, ZERO_STAGES, "parallel.zero")
    one_of(p.backend, BACKENDS, "parallel.backend")
    positive(p.timeout_s, "parallel.timeout_s")
    # torch stores it as a timedelta (at most ~2.7 million years); a week is a generous cap
    require(p.timeout_s <= MAX_TIMEOUT_S, "parallel.timeout_s", f"must be at most "
            f"{MAX_TIMEOUT_S} seconds (a week), got {p.timeout_s}")
    inner = p.tp * p.sp
    require(world_size % inner == 0, "parallel.tp" if world_size % p.tp else "parallel.sp",
            f"tp x sp = {p.tp} x {p.sp} does not divide the world size {world_size}; launch "
            f"a multiple of {inner} processes (torchrun --nproc_per_node=...)")
    dp = p.dp if p.dp > 0 else world_size // inner
    require(p.tp * p.sp * dp == world_size, "parallel.dp",
            f"tp x sp x dp = {p.tp} x {p.sp} x {dp} = {inner * dp} but {world_size} processes "
            "were launched; use parallel.dp=-1 or launch that many")
    validate_shard_group(p, dp)


def shard_group_size(shard_group: int, dp_sp: int) -> int:
    """The ranks ZeRO shards over for `parallel.shard_group`: 0 / -1 mean the whole dp x sp
    group (`dp_sp` ranks), any other value is itself (validate_shard_group checks it)."""
    return dp_sp if shard_group in (0, -1) else shard_group


def validate_shard_group(p: "ParallelConfig", dp: int) -> None:
    """`parallel.shard_group`: 0/-1 (whole dp x sp), or a size that divides dp x sp into groups
    made of whole sequence-parallel groups (an sp group's ranks hold one sequence's slices and
    must share every weight shard), with ZeRO on (without sharding there is nothing to group)."""
    n, dp_sp = p.shard_group, dp * p.sp
    if n in (0, -1):
        return
    key = "parallel.shard_group"
    # no group size in the first line: the planner checks a value before any layout has one
    require(n > 0, key, f"must be a positive group size, or 0 / -1 for the whole dp x sp group, "
            f"got {n}")
    # refused at zero=0 even when n is the whole group: the key would silently do nothing
    ranks = f"{n} rank{'s' if n > 1 else ''}"
    require(p.zero > 0, key, f"hybrid sharding ({ranks} per shard group) needs sharding: set "
            "parallel.zero=2 or 3, or drop parallel.shard_group (at zero=0 every rank holds "
            "everything already)")
    if n == dp_sp:
        return  # one group: plain ZeRO
    require(n % p.sp == 0, key, f"{n} ranks per shard group would split a sequence-parallel "
            f"group (parallel.sp={p.sp}); use a multiple of {p.sp}")
    require(dp_sp % n == 0, key, f"{n} does not divide the dp x sp group ({dp} x {p.sp} = "
            f"{dp_sp} ranks); use a divisor of {dp_sp}, e.g. the ranks of one node")


def check_tp(cfg: "ModelConfig", tp: int) -> None:
    """Raise `ConfigError` unless every dimension the plan shards splits evenly over `tp`.

    Pure and collective-free: every rank can run it on the config alone, before any heavy work.
    """
    hint = f"tensor parallel (parallel.tp={tp}) splits it over tp ranks"
    require(cfg.n_heads % tp == 0, "model.n_heads",
            f"{cfg.n_heads} query heads are not divisible by parallel.tp={tp}; {hint}: "
            "choose a tp that divides n_heads")
    require(cfg.n_kv_heads % tp == 0, "model.n_kv_heads",
            f"{cfg.n_kv_heads} kv heads are not divisible by parallel.tp={tp}; {hint}: "
            "choose a tp that divides n_kv_heads")
    vocab = padded_vocab(cfg.vocab_size)
    require(vocab % tp == 0, "model.vocab_size",
            f"the padded vocabulary ({vocab} rows, vocab_size={cfg.vocab_size} rounded up to a "
            f"multiple of 128) is not divisible by parallel.tp={tp}; {hint}: use a tp that "
            f"divides {vocab}")
    require(cfg.ffn_hidden % tp == 0, "model.ffn_hidden",
            f"{cfg.ffn_hidden} is not divisible by parallel.tp={tp}; {hint}: choose a "
            f"ffn_hidden that is a multiple of {tp}")


def check_ulysses_heads(m: "ModelConfig", p: "ParallelConfig") -> None:
    """Heads vs the Ulysses degree U = sp / ring (after tp): query heads divisible by tp x U;
    kv heads per tp rank and U dividing one another (split, or replicated when fewer than U).

    Without a ring the error names the model key (the model is what does not fit sp); with a
    ring it names `parallel.ring`, whose degree decides U.
    """
    u = p.sp // p.ring
    if p.ring == 1:  # the messages and keys of Ulysses alone
        require(m.n_heads % (p.tp * u) == 0, "model.n_heads",
                f"{m.n_heads} heads cannot be split over tp x sp = {p.tp * u} ranks; use a "
                "layout whose tp x sp divides the head count (or parallel.ring > 1)")
        kv = m.n_kv_heads // p.tp
        require(kv % u == 0 or u % kv == 0, "model.n_kv_heads",
                f"{kv} kv heads per tp rank and sp={p.sp}: one must divide the other (kv heads "
                "are split over sp, or replicated when fewer than sp)")
        return
    require(m.n_heads % (p.tp * u) == 0, "parallel.ring",
            f"model.n_heads={m.n_heads} cannot be split over tp x sp/ring = {p.tp} x "
            f"{p.sp}/{p.ring} = {p.tp * u} ranks; raise parallel.ring (the ring splits the "
            "sequence, not the heads) until tp x sp/ring divides the head count")
    kv = m.n_kv_heads // p.tp
    require(kv % u == 0 or u % kv == 0, "parallel.ring",
            f"{kv} kv heads per tp rank and the Ulysses degree sp/ring = {p.sp}/{p.ring} = {u}: "
            "one must divide the other (kv heads are split over the Ulysses ranks, or "
            "replicated when fewer); choose a ring for which they do")


def valid_ulysses_chunks(hq: int, hkv: int, u: int) -> list[int]:
    """The head-group counts G a Ulysses rank can pipeline (parallel/ulysses_pipeline.py), for
    `hq`/`hkv` query/kv heads per tp rank over `u` Ulysses ranks: G divides the hq/u query
    heads of a rank and divides, or is a multiple of, its max(hkv/u, 1) kv heads (so every
    group reads whole kv heads). Ascending; [1] at least."""
    hq_l, hkv_l = hq // u, max(hkv // u, 1)
    return [g for g in range(1, hq_l + 1) if hq_l % g == 0 and (hkv_l % g == 0 or g % hkv_l == 0)]


def check_ulysses_chunks(m: "ModelConfig", p: "ParallelConfig") -> None:
    """`parallel.ulysses_chunks` against the heads each Ulysses rank holds (after tp)."""
    g, u = p.ulysses_chunks, p.sp // p.ring
    require(isinstance(g, int) and not isinstance(g, bool) and g >= 1, "parallel.ulysses_chunks",
            f"must be a positive number of head groups (1 = no pipeline), got {g!r}")
    if g == 1:
        return
    require(u > 1, "parallel.ulysses_chunks",
            f"{g} head groups but no Ulysses all-to-all to pipeline (sp/ring = {p.sp}/{p.ring} "
            "= 1); set it to 1, or use parallel.sp > parallel.ring")
    hq, hkv = m.n_heads // p.tp, m.n_kv_heads // p.tp
    valid = valid_ulysses_chunks(hq, hkv, u)
    require(g in valid, "parallel.ulysses_chunks",
            f"{g} head groups do not split the {hq // u} query heads and {max(hkv // u, 1)} kv "
            f"heads of a Ulysses rank (tp={p.tp}, sp/ring={u}) into groups of whole kv heads; "
            f"choose one of {valid}")


def validate_layout(cfg: "Config", world_size: int) -> int:
    """Checks that need both the model and the layout; returns the resolved dp degree.

    No rule on `data.seq_len`: rows are padded to `SequenceLayout.padded_len` (parallel/layout.py).
    """
    p = cfg.parallel
    dp = p.dp if p.dp > 0 else world_size // (p.tp * p.sp)
    check_tp(cfg.model, p.tp)
    check_ulysses_heads(cfg.model, p)
    check_ulysses_chunks(cfg.model, p)
    return dp
