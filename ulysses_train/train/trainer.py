"""The training loop, assembled from `build_*` helpers.

`run(cfg, run_dir)` is what `train.py` calls: validate (no collectives, before heavy work), build
data → model → optimizer → checkpoints, restore, then `fit`. Invariants the loop keeps:
- The loss is token-weighted: each micro-batch returns the *sum* of its per-token losses, and
  the gradient is of sum / (valid tokens of the whole global batch) — never a mean of means.
- The data position is the global step, and the schedule is a function of the step and
  `train.steps`; together with DCP's exact model/optimizer state this makes resume bit-exact.
- A step whose loss or gradient norm is not finite changes no weight (guards.py); a stop signal
  ends the run after the step every rank agrees on, with a checkpoint (stop.py).
- A step that does not log never waits for the device (step_stats.py): counts, loss, norm and
  the skip stay tensors; its numbers reach the host a step later, a logging step reads them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import torch

from ..checkpoint.identity import check_before_start, config_identity, lower_lr_fragment
from ..checkpoint.manager import CheckpointManager
from ..checkpoint.store import read_meta, resume_source
from ..config.schema import Config
from ..config.validate import validate
from ..data import build_data
from ..data.tokenizer_files import init_from_or_run
from ..evaluate import training as eval_in_training
from ..hf.config import rope_notes
from ..hf.init_from import load_initial_weights
from ..hf.source import KEY as SOURCE_KEY
from ..hf.source import source_record
from ..model import num_params
from ..model.precision import autocast_to, resolve_dtype
from ..parallel import ParallelDims
from ..parallel.batching import step_micro_batches
from ..parallel.grad_norm import clip_grad_norm_
from ..parallel.grad_sync import all_reduce_
from ..parallel.parallelize import parallelize
from . import mixture_report, optim, step_stats
from .faults import Faults
from .guards import NonFiniteGuard, set_deterministic
from .metrics import Reporter, Throughput, peak_flops
from .optim import build_optimizer, build_scheduler, step_unless
from .step_stats import LaggedRead, StepResult
from .stop import StopSignals
from .wandb_run import with_wandb_fallback


def run(cfg: Config, run_dir: str) -> int:
    """Train according to `cfg` in `run_dir`; return the process exit code.

    Validation needs no collective (every rank checks the same config alone), so a bad config
    fails before any process group exists.
    """
    set_deterministic(cfg.train.deterministic)  # before anything touches CUDA (cuBLAS env)
    dims = ParallelDims.from_env(cfg.parallel)
    validate(cfg, dims.world_size)  # pure rules; the entry point checked the input files
    check_before_start(cfg, run_dir)  # a changed data.seq_len etc. fails before data is built
    dims.init_process_group()
    try:
        dims.build_mesh()
        return Trainer(cfg, run_dir, dims).fit()
    finally:
        if dims.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Trainer:
    def __init__(self, cfg: Config, run_dir: str, dims: ParallelDims):
        self.cfg, self.run_dir, self.dims = cfg, run_dir, dims
        self.device = dims.device
        self.dtype = resolve_dtype(cfg.train.precision, self.device)
        set_deterministic(cfg.train.deterministic)
        torch.manual_seed(cfg.train.seed)
        self._say(f"run dir: {os.path.abspath(run_dir)}")
        # wandb online without a login: offline, said before the heavy work (data, model)
        self.cfg = cfg = with_wandb_fallback(cfg, run_dir, dims.is_main)
        self.data = build_data(cfg.data, seed=cfg.train.seed,
                               global_batch_size=cfg.train.global_batch_size,
                               model_vocab_size=cfg.model.vocab_size,
                               log=self._say, is_main=dims.is_main,
                               init_from=init_from_or_run(
                                   cfg.model.init_from, run_dir,
                                   resume_source(run_dir, cfg.checkpoint.resume) is not None),
                               max_tokenizer_vocab=cfg.model.vocab_size)
        if dims.is_main:  # <run_dir>/tokenizer/: what AutoTokenizer and the export load
            self.data.save_tokenizer(os.path.join(run_dir, "tokenizer"))
        # The one place parallelism enters: the model of this layout and its gradient sync.
        self.model, self.grad_sync = parallelize(cfg, dims)
        self.layout = dims.sequence_layout(cfg.data.seq_len)  # who holds which token (padded)
        self.dp_sp = dims.group("dp_sp")  # None alone: every reduction is then the identity
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.faults = Faults(cfg.debug, run_dir, dims, log=self._say)  # tests only
        self.ckpt = CheckpointManager(run_dir, cfg.checkpoint, cfg.model, log=self._say,
                                      is_main=dims.is_main, distributed=dims.distributed,
                                      identity=self._identity(),
                                      on_save_point=self.faults.save_point,
                                      extra_meta=self._source_record())
        self.guard = NonFiniteGuard(cfg.train.max_skipped_steps)
        self.step = 0  # completed optimizer steps (skipped ones too) == data position
        self.tokens = 0  # tokens trained on so far, each counted once
        self.resumed_from = self._restore()
        self._init_from()
        self.has_val = "val" in self.data.splits  # data.val_fraction=0 leaves no val split

    def _say(self, text: str) -> None:
        if self.dims.is_main:
            print(text, flush=True)

    # ---- state --------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.guard.total,
                "scheduler": self.scheduler.state_dict(), "rng": rng}

    def _identity(self) -> dict:
        """What checkpoints record and resuming compares (checkpoint/identity.py): the data stream
        (must match) and the optimizer's hyper-parameters (the config wins, logged)."""
        data = {**config_identity(self.cfg), **getattr(self.data, "identity", {})}
        return {"data": data, "optim": optim.hyperparameters(self.cfg.optim,
                                                             self.cfg.train.grad_clip)}

    def _source_record(self) -> dict:
        """meta.json's record of what an export needs from model.init_from's source
        (hf/source.py); a resuming run keeps its checkpoint's (the source may be gone)."""
        resumed = resume_source(self.run_dir, self.cfg.checkpoint.resume)
        record = source_record(self.cfg.model.init_from, resumed)
        return {SOURCE_KEY: record} if record else {}

    def _restore(self) -> str | None:
        """Load the checkpoint `checkpoint.resume` picks: state from it, hyper-parameters from
        the config (optim.py), each changed one said in one line."""
        state, path = self.ckpt.restore(self.model, self.optimizer, self.trainer_state())
        if state is None:
            return None
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.guard.total = int(state["skipped_steps"])
        self.scheduler.load_state_dict(state["scheduler"])
        recorded = (read_meta(path).get("identity") or {}).get("optim", {})
        changed = optim.config_wins(self.optimizer, self.scheduler, self.cfg.optim,
                                    self.cfg.train.grad_clip, recorded)
        if changed:
            self._say(f"resuming with new settings: {', '.join(changed)} (the config wins for "
                      "hyper-parameters; moments and step counts are the checkpoint's)")
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        return path

    def _init_from(self) -> None:
        """`model.init_from`: weights only, into a run that starts now; a run resuming from its
        own checkpoint keeps that checkpoint's weights (resume wins), and says so."""
        source = self.cfg.model.init_from
        if not source:
            return
        if self.resumed_from:
            self._say(f"model.init_from={source} not loaded: resuming from {self.resumed_from}, "
                      "the run's own checkpoint wins")
            return
        self._say(load_initial_weights(self.model, source, self.cfg.model, self.dims))
        for note in rope_notes(source, self.cfg.model):  # adjusted base frequency, scaling
            self._say(note)

    def save(self) -> str:
        """Checkpoint this step; return its path (the manager logs it; async: commits later)."""
        return self.ckpt.save(self.step, self.model, self.optimizer, self.trainer_state())

    # ---- one step -----------------------------------------------------------------------
    def _micro_batches(self, step: int, split: str, data=None):
        """Yield this rank's (input_ids, position_ids, labels, mask) micro-batches of global
        batch `step` of `split` of `data` (default: the run's; parallel/batching.py, which
        evaluation and the planner's measurement share)."""
        t = self.cfg.train
        return step_micro_batches(data or self.data, step, split, self.dims, self.layout,
                                  t.global_batch_size, t.micro_batch_size, self.model,
                                  self.cfg.data.document_mask)

    def train_step(self) -> StepResult:
        """One optimizer step over the global batch of `self.step`, with accumulation; skipped
        on the device (weights and optimizer state untouched) if the loss or gradient norm is
        not finite. No host sync: the result's device values are read when first accessed."""
        micro = list(self._micro_batches(self.step, "train"))
        poison = self.faults.poison_loss(self.step + 1)  # fault injection (tests only)
        # Divide by the valid-token count of the whole global batch, exactly once.
        counts = step_stats.global_counts(micro, self)
        n_valid = counts[0].clamp(min=1)  # a device tensor: no host round trip
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for i, (input_ids, position_ids, labels, mask) in enumerate(micro):
            # gradients are communicated on the last micro-batch (GradSync: plain, DDP or FSDP2)
            with self.grad_sync.micro_batch(last=i == len(micro) - 1):
                with autocast_to(self.dtype, self.device):
                    part, _ = self.grad_sync.module(input_ids, position_ids, labels,
                                                    attn_mask=mask)
                if poison:
                    part = part * math.nan
                (part / n_valid).backward()
            loss_sum += part.detach()
        self.grad_sync.finish()
        # Gradients are now the global ones (replicated, or tp/FSDP shards): the norm sums each
        # shard once over the dimensions it is split on, so norm and clipping are global.
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm_(self.model.parameters(), clip)
        loss = all_reduce_(loss_sum, self.dp_sp).double() / n_valid  # float64, as float() was
        lr = self.scheduler.get_last_lr()[0]
        skipped = self.guard.is_bad(loss, grad_norm)  # global values: every rank agrees
        step_unless(self.optimizer, skipped)
        self.scheduler.step()  # a skipped step still advances the data and the schedule
        self.step += 1
        n_tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_len  # each token once
        self.tokens += n_tokens
        return StepResult(self.cfg, self.step, self.tokens, lr, n_tokens, loss, grad_norm,
                          skipped, counts[1:])

    @torch.no_grad()
    def evaluate(self, data=None) -> float:
        """Token-weighted loss over `train.val_batches` fixed validation batches of `data`
        (default: the run's; a mixture's source alone: `DataSource.for_source`)."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, count)
        for i in range(self.cfg.train.val_batches):
            for input_ids, position_ids, labels, mask in self._micro_batches(i, "val", data):
                with autocast_to(self.dtype, self.device):
                    part, n = self.model(input_ids, position_ids, labels, attn_mask=mask)
                sums += torch.stack([part.double(), n.double()])
        self.model.train()
        total, count = all_reduce_(sums, self.dp_sp).tolist()
        return total / max(count, 1)

    # ---- the loop -----------------------------------------------------------------------
    def _banner(self) -> None:
        n = num_params(self.model)
        p = self.cfg.parallel
        layout = (f" | layout: {self.dims.describe(p.zero, p.ulysses_chunks)}"
                  if self.dims.distributed else "")
        self._say(f"model: {self.cfg.model.name}, {n / 1e6:.2f}M parameters | device: "
                  f"{self.device} | precision: {str(self.dtype).replace('torch.', '')}{layout}")
        self._say(f"data: {self.data.describe()}")
        mixture_report.announce(self.data, self.cfg.train.steps, self.run_dir, self._say,
                                self.dims.is_main)  # epochs per source, tokens_by_length.png
        if self.resumed_from:
            self._say(f"resumed from {self.resumed_from} at step {self.step}")

    def fit(self) -> int:
        cfg = self.cfg
        total, start = cfg.train.steps, self.step
        if start >= total:
            self._say(f"run in {os.path.abspath(self.run_dir)} already finished at step {start} "
                      f"(train.steps={total}); nothing to do — raise train.steps to go on")
            return 0
        self._banner()
        reporter = Reporter(self.run_dir, self.dims.is_main, total, start,
                            progress=cfg.logging.progress, wandb_cfg=cfg.logging.wandb,
                            config_dict=dataclasses.asdict(cfg))
        try:
            with StopSignals() as stop:
                self._loop(reporter, stop, start, total)
                self.ckpt.wait()  # an async save in flight commits (or fails loudly) first
        finally:
            self.ckpt.close()
            reporter.close()
        return 0

    def _loop(self, reporter: Reporter, stop: StopSignals, start: int, total: int) -> None:
        """Steps until `total`. A step that does not log reads nothing from the device: its
        numbers are posted to the host and observed at the next step (step_stats.py)."""
        self._meter, self._lag, self._posted = Throughput(), LaggedRead(), None
        while self.step < total:
            t0 = time.perf_counter()
            out = self.train_step()
            self._settle(reporter, total)  # the previous step's numbers, if posted
            if step_stats.due(self.cfg, self.has_val, out.step, total)[0]:  # this step logs: one read of its numbers
                self._observe(reporter, out, total)
            else:
                self._lag.post(out.stats)
                self._posted = out
            reporter.tick(out.host.get("loss"), out.host["n_tokens"] / (time.perf_counter() - t0))
            self.faults.after_step(self.step)
            signal_name = stop.agree(self.dims.distributed, self.device)  # collective
            if self._end_of_step(reporter, signal_name, start, total):
                return

    def _settle(self, reporter: Reporter, total: int) -> None:
        """Observe the step posted without a read, if any (waits for it: a step behind)."""
        if self._posted is not None:
            self._posted.fill(self._lag.take())
            self._observe(reporter, self._posted, total)
            self._posted = None

    def _observe(self, reporter: Reporter, out: StepResult, total: int) -> None:
        """Count step `out` (guard, throughput) once its numbers are on the host; log it."""
        self._meter.add(out["n_tokens"], out["flops"])
        self.guard.observe(out.step, out["skipped"])
        self._report(reporter, out, total)

    def _report(self, reporter: Reporter, out: StepResult, total: int) -> None:
        """Log step `out`'s row when due (always for the last step and a skipped one)."""
        cfg, step = self.cfg, out.step
        logs, val_due, eval_due = step_stats.due(cfg, self.has_val, step, total)
        if out["skipped"]:
            reporter.info(f"warning: step {step}: loss {out['loss']}, grad_norm "
                          f"{out['grad_norm']}; optimizer step skipped ({self.guard.in_a_row} in "
                          f"a row, at most train.max_skipped_steps={self.guard.max_in_a_row})")
        if not (logs or out["skipped"]):
            return
        peak = cfg.debug.peak_flops or peak_flops(self.device)
        row = {"step": step, "loss": out["loss"], "grad_norm": out["grad_norm"],
               "lr": out["lr"], "tokens": out.tokens, "skipped": out["skipped"],
               "skipped_steps": self.guard.total,
               **self._meter.fields(self.device, self.dims, peak)}
        row.update(mixture_report.token_fields(self.data, step, cfg.data.seq_len))
        if val_due:
            row["val_loss"] = self.evaluate()
            for name in self.data.sources:  # a mixture: each source's own validation loss
                row[f"val_loss/{name}"] = self.evaluate(self.data.for_source(name))
        if eval_due:  # held-out loss per position bucket (evaluate/training.py)
            row.update(eval_in_training.row_of(self.model, cfg, self.dims, self.data,
                                                  self.dtype))
        reporter.log(row, total)  # never raises: a metric must not end the run

    def _end_of_step(self, reporter: Reporter, signal_name: str | None, start: int,
                     total: int) -> bool:
        """Save when due; return True when the run stops here. Saves always: at the last step,
        at `exit_after_steps`, on a stop signal and when the non-finite guard gives up."""
        every, limit = self.cfg.checkpoint.every, self.cfg.train.exit_after_steps
        early = limit > 0 and self.step - start >= limit
        periodic = every > 0 and self.step % every == 0
        if not (periodic or self.step == total or early or signal_name or self.guard.exhausted):
            return False
        self._settle(reporter, total)  # the checkpoint's skip count includes this step
        path = self.save()
        if self.guard.exhausted:  # the weights are the last good ones: skipped steps kept them
            self.ckpt.wait()
            raise self.guard.stop_error(self.step, path, lower_lr_fragment(self.cfg, self.run_dir))
        if signal_name:
            reporter.info(f"stopped by {signal_name} after step {self.step}/{total}, with a "
                          f"checkpoint ({path}); rerun the same command to resume")
            return True
        if early:
            reporter.info(f"stopping after {limit} step{'s' * (limit != 1)} "
                          "(train.exit_after_steps); rerun the same command to resume")
        return early
