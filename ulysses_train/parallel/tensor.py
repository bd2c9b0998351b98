"""Tensor parallelism: a DTensor plan for the single-device GPT, and the vocab-parallel loss.

Megatron-style TP without Megatron's sequence parallel (sequence parallelism here is Ulysses):
the residual stream between blocks is a plain, replicated tensor on every tp rank; inside a
block the head-split and hidden-split projections are sharded:

- attention: wq, wk, wv column-parallel (each rank owns Hq/tp query and Hkv/tp kv heads), wo
  row-parallel (partial sums all-reduced). The model reshapes with `view(B, S, -1, D)`, so it
  sees its Hq/tp, Hkv/tp local heads without knowing it; a Ulysses `attention_fn` then splits
  those local heads over sp. What reaches `attention_fn` is a plain local tensor.
- SwiGLU: w1 (gate) and w3 (up) column-parallel, w2 (down) row-parallel.
- token embedding vocab-parallel: rows sharded, out-of-range ids looked up as zeros, the output
  all-reduced to replicated.
- head column-parallel with the logits *kept* sharded on the vocab dim (a DTensor, Shard(-1)),
  so no rank ever holds full-vocab logits; the model's injected `loss_fn` becomes
  `vocab_parallel_loss_sum` below.
- norms replicated (plain parameters; their gradients are identical on every tp rank). A
  QK-norm (`model.qk_norm`) sees only this rank's heads, so its gradient is a partial sum:
  its injected `weight_fn` (`sum_grad_over`) all-reduces it over tp in backward (what
  transformers' plan calls "replicated_with_grad_allreduce"), one small all-reduce per norm.

Collectives per block: forward 2 all-reduces (wo, w2), backward 2 (one per block input that
fans out to several column-parallel projections: q/k/v share one, gate/up share one, because
`PrepareModuleInput` turns the input into a replicated DTensor *once* and the three partial
input-gradients add up before the single all-reduce). Plus 1 forward for the embedding,
1 backward for the head input, and 2 forward for the loss.

Order (docs/architecture.md §3): build on meta -> `apply_tensor_parallel` -> activation
checkpointing -> compile -> FSDP2 over the dp_sp mesh -> `to_empty` -> `init_weights` (name-seeded,
so every `full_tensor()` equals the single-process init).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from ..config.parallel import check_tp
from ..model.gpt import GPT, IGNORE_INDEX


def tp_plan(model: GPT) -> dict[str, object]:
    """The `parallelize_module` plan for `model` (keys are module paths; `*` = any layer)."""
    plan: dict[str, object] = {
        # Vocab rows sharded; every rank gets all ids (Replicate), looks up the ones it owns and
        # the all-reduce assembles the (B, S, d) embedding, returned as a plain local tensor.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        # attention(x, cos, sin): x becomes a replicated DTensor once, for wq, wk and wv
        # together, so its gradient (the sum of their partial gradients) is all-reduced once, not
        # once per projection. cos/sin stay plain (None).
        "layers.*.attention": PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                                 desired_input_layouts=(Replicate(), None, None),
                                                 use_local_output=False),
        # (B, S, d) -> (B, S, H*D/tp) local: this rank's heads, plain tensors for the kernel.
        # A q/k/v bias (model.qkv_bias) is sharded Shard(0) like its weight's output rows.
        "layers.*.attention.wq": ColwiseParallel(),
        "layers.*.attention.wk": ColwiseParallel(),
        "layers.*.attention.wv": ColwiseParallel(),
        # (B, S, Hq*D/tp) local -> partial (B, S, d) -> all-reduce -> replicated local tensor.
        "layers.*.attention.wo": RowwiseParallel(),
        # The same for the input shared by w1 and w3.
        "layers.*.feed_forward": PrepareModuleInput(input_layouts=(Replicate(),),
                                                    desired_input_layouts=(Replicate(),),
                                                    use_local_output=False),
        "layers.*.feed_forward.w1": ColwiseParallel(),  # (B, S, d) -> (B, S, F/tp)
        "layers.*.feed_forward.w3": ColwiseParallel(),
        "layers.*.feed_forward.w2": RowwiseParallel(),  # (B, S, F/tp) -> all-reduce -> (B, S, d)
    }
    if model.output is not None:
        # (B, S, d) -> (B, S, V/tp) as a DTensor Shard(-1): the loss stays vocab-parallel.
        plan["output"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    else:
        # Tied head: GPT.forward computes F.linear(h, tok_embeddings.weight) itself. That weight
        # is already vocab-sharded (Shard(0)) by the embedding's plan, so a replicated DTensor h
        # is all the matmul needs to produce Shard(-1) logits, the same layout as the untied head.
        plan["norm"] = PrepareModuleOutput(output_layouts=Replicate(),
                                           desired_output_layouts=Replicate(),
                                           use_local_output=False)
    return plan


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Shard `model` in place over the 1-D `tp_mesh` (call on the meta device, before FSDP2).

    Parameters of sharded layers become DTensors on `tp_mesh` (Shard(0) for column-parallel and
    vocab-parallel weights, Shard(1) for row-parallel ones); norms stay plain; `model.loss_fn`
    becomes `vocab_parallel_loss_sum`. Raises `ConfigError` when a dimension does not split
    (see `check_tp`). Tied embeddings are supported. Every tp rank must then be fed the same
    input_ids, position_ids and labels (tp ranks split the weights, not the tokens).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs a 1-D tp mesh, got {tp_mesh.ndim}-D")
    check_tp(model.cfg, tp_mesh.size())
    if tp_mesh.size() == 1:
        return  # size-1 path: exactly the single-device model, no DTensors
    parallelize_module(model, tp_mesh, tp_plan(model))
    model.loss_fn = vocab_parallel_loss_sum  # the head's logits are now vocab-sharded DTensors
    model.tok_embeddings.register_forward_pre_hook(_GradResharder())
    group = tp_mesh.get_group()
    for layer in model.layers:
        for norm in (layer.attention.q_norm, layer.attention.k_norm):
            if norm is not None:
                norm.weight_fn = lambda w, group=group: sum_grad_over(w, group)


class _SumGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over `group`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad, "sum", ctx.group), None


def sum_grad_over(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x unchanged, its gradient summed over `group` in backward: for a replicated weight
    (plain, or FSDP2's unsharded copy) that each rank applies to its own heads, so that every
    rank's gradient is the whole one (Megatron's all-reduce of sequence-parallel norm
    gradients). Shapes unchanged."""
    return _SumGrad.apply(x, group)


class _GradResharder:
    """Forward pre-hook keeping the vocab-parallel embedding's gradient vocab-sharded.

    Why: DTensor has no row-wise strategy for the embedding backward, so it computes the weight
    gradient *replicated*, a full (V, d) tensor on every tp rank stored as `.grad` of a Shard(0)
    parameter: tp times the memory, the optimizer resharding it every step, the dp all-reduce
    sending tp times the bytes. A hook on the weight turns it into this rank's Shard(0) slice
    (a local copy, no communication) before it is accumulated.

    The tensor hook is re-registered at every forward (replacing the previous one) instead of
    once: `to_empty` swaps parameter contents and drops hooks registered earlier. One hook on the
    leaf covers any number of forwards before a backward; it is idempotent. Skipped when the
    weight is not a 1-D-mesh DTensor (e.g. FSDP2's sharded parameter, whose own post-backward
    redistributes gradients to the parameter's tp placements).
    """

    def __init__(self):
        self.handle = None

    def __call__(self, module: nn.Module, args) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        weight = module.weight
        if not (torch.is_grad_enabled() and weight.requires_grad and isinstance(weight, DTensor)
                and weight.device_mesh.ndim == 1):
            return
        placements = weight.placements

        def reshard(grad: DTensor) -> DTensor:
            if grad.placements == placements:
                return grad
            return grad.redistribute(placements=placements)  # Replicate -> Shard(0): local copy

        self.handle = weight.register_hook(reshard)


def all_reduce(t: torch.Tensor, op: str, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Out-of-place all-reduce through torch's functional collective op (the op DTensor, the
    Ulysses all-to-alls and torch.compile use), waited at once: the next op needs the result.
    `group` None (the vocabulary is not sharded): `t` itself."""
    if group is None:
        return t
    out = torch.ops._c10d_functional.all_reduce(t.contiguous(), op, group.group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


@torch.no_grad()
def vocab_parallel_terms(logits: torch.Tensor, labels: torch.Tensor, start: int, group
                         ) -> tuple[torch.Tensor, ...]:
    """The per-token terms of cross-entropy for logits sharded on the vocab dim (Megatron's
    vocab-parallel cross-entropy, Shoeybi et al. 2019, sec. 3): `logits` (N, V/tp) fp32, this
    rank's columns [start, start + V/tp); labels (N,); `group` the tp group (None: unsharded).

    Returns (exp, sum_exp, target, valid, owned, local_target):
        m       = all_reduce_max(max_local(z))           (not returned; exp and target use it)
        exp     = exp(z - m), (N, V/tp) — `logits` itself, overwritten (the caller's copy)
        sum_exp = all_reduce_sum(sum_local(exp)), (N,)   the global softmax denominator
        target  = all_reduce_sum(z_t - m on the owning rank, 0 elsewhere), (N,)
    so loss = log(sum_exp) - target and t is a top-1 token iff target >= 0. The two sums go in
    one all-reduce. Used by the training loss (its backward below) and by evaluation.
    The model's padding columns arrive as -inf (model/vocab.py): their exp is 0, and a rank
    whose columns are all padding has a local max of -inf, which the max all-reduce replaces.
    """
    valid = labels != IGNORE_INDEX
    owned = valid & (labels >= start) & (labels < start + logits.shape[-1])
    local_target = torch.where(owned, labels - start, 0)  # (N,) index into this shard
    max_z = all_reduce(logits.max(dim=-1).values, "max", group)  # (N,)
    picked = torch.gather(logits, 1, local_target[:, None])[:, 0]  # (N, V/tp) -> (N,)
    target_z = torch.where(owned, picked - max_z, 0.0)
    exp = logits.sub_(max_z.unsqueeze(-1)).exp_()  # in place: z is not needed again
    sums = all_reduce(torch.stack([exp.sum(dim=-1), target_z]), "sum", group)  # (2, N)
    return exp, sums[0], sums[1], valid, owned, local_target


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over valid labels for logits sharded on the vocab dim.

    Forward, for N tokens and this rank's vocab columns [start, start + V/tp):
        m   = all_reduce_max(max_local(z))                        per token, for stability
        se  = all_reduce_sum(sum_local(exp(z - m)))               the global softmax denominator
        zt  = all_reduce_sum(z[target] - m on the owning rank, 0 elsewhere)
        sum over valid tokens of log(se) - zt
    Backward (no communication): d/dz = (softmax(z) - onehot(target)) * valid * grad, each rank
    for its own columns. The result is replicated over tp, so every rank's backward seeds the
    same grad and produces exactly its shard of the full-logits gradient.

    Why not torch's `loss_parallel()` context (which does support reduction="sum" and
    ignore_index): its backward must also run inside the context — outside it, torch 2.13 raises
    "aten.nll_loss_backward.default got mixed torch.Tensor and DTensor" — and it swaps global
    DTensor op handlers; our trainer calls `.backward()` later, on a divided loss.

    Precision: the loss is fp32 by policy (`model/precision.py`), so forward and backward both
    run with autocast disabled on the logits' device — the same state in both directions, which
    is what `torch.amp.custom_fwd(cast_inputs=torch.float32)` / `custom_bwd` would give.
    """

    @staticmethod
    def forward(ctx, logits, labels, start, group):  # logits (N, V/tp) fp32, labels (N,)
        ctx.device_type = logits.device.type
        with torch.autocast(ctx.device_type, enabled=False):
            return _VocabParallelCrossEntropy._forward(ctx, logits.float(), labels, start, group)

    @staticmethod
    def _forward(ctx, logits, labels, start, group):
        exp, sum_exp, target_z, valid, owned, local_target = vocab_parallel_terms(
            logits.clone(), labels, start, group)  # clone: the input stays as autograd saw it
        loss = torch.where(valid, sum_exp.log() - target_z, 0.0).sum()
        softmax = exp.div_(sum_exp.unsqueeze(-1))  # (N, V/tp), reuses the exp buffer
        ctx.save_for_backward(softmax, valid, owned, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.autocast(ctx.device_type, enabled=False):
            return _VocabParallelCrossEntropy._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        softmax, valid, owned, local_target = ctx.saved_tensors
        scale = valid.to(softmax.dtype) * grad_loss  # (N,): 0 for ignored tokens
        grad = softmax * scale.unsqueeze(-1)  # new buffer: the graph may be retained
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= owned.to(grad.dtype) * scale  # - onehot, on the owning rank
        return grad, None, None, None


def vocab_parallel_loss_sum(logits: DTensor, labels: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_loss_sum` for logits sharded on the vocab dim over a 1-D tp mesh.

    logits: DTensor (B, S, V) with placement Shard(-1), local (B, S, V/tp); labels: (B, S) plain,
    identical on the tp ranks. Returns (fp32 loss sum, valid count) as plain tensors with the
    same value on every tp rank, like the single-device function: the trainer divides and
    all-reduces them over dp_sp as before. The backward needs no context manager.
    """
    mesh = logits.device_mesh
    if mesh.ndim != 1 or logits.placements[0] != Shard(logits.ndim - 1):
        raise ValueError(f"vocab_parallel_loss_sum expects logits sharded on the last dim over a "
                         f"1-D mesh, got {logits.placements} on a {mesh.ndim}-D mesh")
    local = logits.to_local()  # (B, S, V/tp); its backward wraps the gradient back as Shard(-1)
    n_local = local.shape[-1]
    if n_local * mesh.size() != logits.shape[-1]:
        raise ValueError(f"vocab {logits.shape[-1]} is not evenly sharded over tp={mesh.size()}")
    start = mesh.get_local_rank() * n_local
    flat = local.float().reshape(-1, n_local)  # (B, S, V/tp) -> (B*S, V/tp), fp32 as in the ref
    flat_labels = labels.reshape(-1)  # (B, S) -> (B*S,)
    loss_sum = _VocabParallelCrossEntropy.apply(flat, flat_labels, start, mesh.get_group())
    return loss_sum, (flat_labels != IGNORE_INDEX).sum()
