"""Optimizer and learning-rate schedule.

AdamW with decoupled weight decay on matrices only (norm gains stay undecayed): fused on CUDA
(one kernel launch for all parameters, step counts on the device), for-each on the CPU (the same
arithmetic as torch's per-parameter loop, bit for bit; torch's CPU fused kernel orders the
weight decay differently, ~1 ulp apart). A step the non-finite guard rejects is skipped on the
device, without a host sync (`step_unless`).
The schedule is a pure function of the step and `train.steps`, so a run stopped early by
`train.exit_after_steps` resumes on exactly the curve of an uninterrupted run.

On resume the config wins for hyper-parameters and the checkpoint for state: lr, min_lr_ratio,
schedule, warmup, betas, eps, weight decay (and train.grad_clip, read every step) are this
run's config — the schedule is a function of the step and the config — while Adam's moments and
step counts are the checkpoint's (`apply_config`). So "lower optim.lr and rerun" does what it
says; `Trainer._restore` logs every value that changed.
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from ..config.schema import OptimConfig


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of `cfg.lr` for optimizer step `step` (0-based): linear warmup, then decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True if on_cuda else None, foreach=None if on_cuda else True)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()`, a no-op where the device bool scalar `skip` is True: weights, moments
    and step counts stay bit-for-bit as they were (the non-finite guard, guards.py). No host sync.

    Fused AdamW takes `found_inf` as torch.amp.GradScaler sets it: its kernel leaves every tensor
    untouched and takes back the step count it added. The for-each (CPU) path has no such input:
    it steps one parameter at a time (the same elementwise arithmetic, so the same bits) and puts
    back, where `skip` holds, the tensors copied before — at most 3 copies of one parameter alive
    (copying all at once would add 3x the model to the step's peak memory).
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.to(torch.float32)
        optimizer.step()
        return
    groups = optimizer.param_groups
    every = [group["params"] for group in groups]
    try:
        with torch.no_grad():
            for group, params in zip(groups, every):
                for p in params:
                    if p.grad is None:
                        continue
                    for other in groups:
                        other["params"] = []
                    group["params"] = [p]  # this parameter alone, with its group's settings
                    old = [_local(t).clone() for t in _step_tensors(optimizer, p)]
                    optimizer.step()
                    for i, t in enumerate(_step_tensors(optimizer, p)):
                        t = _local(t)  # the shard of a DTensor, a view: written in place
                        # without state before (the first step) its new state goes back to zero
                        t.copy_(torch.where(skip.to(t.device), old[i] if i < len(old) else 0, t))
    finally:
        for group, params in zip(groups, every):
            group["params"] = params


def _step_tensors(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    """The parameter and the state tensors a step changes (moments, step count), in a fixed order."""
    state = optimizer.state.get(p, {})
    return [p] + [state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, total_steps))


def hyperparameters(cfg: OptimConfig, grad_clip: float) -> dict:
    """The hyper-parameters a checkpoint records (meta.json), keyed by their config keys."""
    keys = ("lr", "min_lr_ratio", "schedule", "warmup_steps", "beta1", "beta2", "eps",
            "weight_decay")
    return {**{f"optim.{k}": getattr(cfg, k) for k in keys}, "train.grad_clip": grad_clip}


def loaded_hyperparameters(optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """Those a loaded optimizer and scheduler hold (all a checkpoint without meta's record has).
    Group 0 is the decayed one (`build_optimizer`)."""
    group = optimizer.param_groups[0]
    return {"optim.lr": float(scheduler.base_lrs[0]), "optim.beta1": float(group["betas"][0]),
            "optim.beta2": float(group["betas"][1]), "optim.eps": float(group["eps"]),
            "optim.weight_decay": float(group["weight_decay"])}


def apply_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 cfg: OptimConfig) -> None:
    """After loading a checkpoint: put the config's hyper-parameters back into the optimizer's
    groups (loading restored the checkpoint's) and the scheduler's base lr, keeping the loaded
    state (moments, step counts, the scheduler's step). The current lr is recomputed exactly as
    `LambdaLR` does (base_lr * factor(last_epoch)), so an unchanged config resumes bit-exact."""
    for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
        group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=decay,
                     initial_lr=cfg.lr)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    lrs = [base * factor(scheduler.last_epoch)
           for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (LambdaLR keeps it privately)


def config_wins(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                cfg: OptimConfig, grad_clip: float, recorded: dict) -> list[str]:
    """Right after loading a checkpoint: apply the config's hyper-parameters (`apply_config`)
    and return 'key: old -> new' for each that differs from the checkpoint's. `recorded` is
    what its meta.json holds ({} for older checkpoints; the loaded groups say the rest)."""
    old = {**recorded, **loaded_hyperparameters(optimizer, scheduler)}
    apply_config(optimizer, scheduler, cfg)
    new = hyperparameters(cfg, grad_clip)
    return [f"{k}: {old[k]} -> {new[k]}" for k in new if k in old and old[k] != new[k]]
