"""Checkpoints: DCP save (sync or async), verified resume, the `latest` pointer, retention.

This module saves; choosing and loading what to resume from is checkpoint/resume.py's `Resume`.

Layout under the run dir (kept by `store.CheckpointDir`):
    checkpoints/step_00000100/   a committed checkpoint: DCP files + `.metadata`, `meta.json`,
                                 `manifest.json` (sizes and hashes of the others; manifest.py)
    checkpoints/latest           text file naming the newest committed step directory
    checkpoints/.tmp_step_...    a save in progress (never read; removed, with a log line, on start)

Crash safety (a `kill -9` at any instant leaves a resumable run):
- The commit is a rename. DCP writes into `.tmp_step_N`; rank 0 adds `meta.json`, then the
  manifest, then renames the directory into place, and only then replaces `latest` atomically
  (`os.replace`). A step directory therefore always holds every file its manifest lists, and
  `latest` always names a committed one (or is a step behind, when the kill fell between the
  rename and the pointer: resume then follows `latest`, per docs/architecture.md §2, and redoes
  those steps).
- Nothing here deletes a checkpoint on its own. Resuming from step N moves this run dir's
  checkpoints newer than N to `checkpoints/abandoned/` (as metrics.jsonl drops its rows after
  N, so a later fallback can never land beyond the logged curve); `checkpoint.keep` removes only
  older complete checkpoints of the current line (`CheckpointDir.prune`).
- Async (`checkpoint.async_save`): `dcp.async_save` copies ("stages") the state to CPU memory,
  training goes on, and a background thread writes the files on the checkpoint's own gloo group
  (never the training group: two threads issuing collectives on one group can interleave
  differently on different ranks). The commit above runs in that thread once DCP has finished on
  every rank, so `latest` never names a save in flight. At most one save is in flight: the next
  save, and the end of training (`close`), wait for it; a failed background save is logged at
  once and raised on every rank at that wait — it is never marked `latest`. A single process
  needs no process group (DCP saves with `no_dist`).
- Hashing on save: each rank hashes the shard files it wrote itself (known from DCP's write
  results, `state.RecordingWriter`), all ranks at once; rank 0 gathers the entries
  and adds `.metadata` and `meta.json` — it never reads every shard alone.
- Verification on resume: sizes of every file of each candidate (one stat each: free), then the
  hashes of the checkpoint actually being loaded — loading reads those bytes anyway, so verifying
  costs about one extra read, and older checkpoints are only hashed if we fall back to them. With
  several ranks each rank hashes a share of the files and the verdict is gathered, so every rank
  picks the same checkpoint. Only verified corruption (manifest, missing file, size, hash) leads
  to a fallback; any other error verifying or loading stops the run (InputUnreadable, exit
  1), since a checkpoint that merely failed to load may be perfectly good.
- The state is layout-independent (FQN-keyed model/optimizer state from DCP's state_dict helpers,
  data position = global step), so DCP can reshard it across parallel layouts; `meta.json`
  records the model shape so an incompatible checkpoint is refused before any tensor is read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..config.schema import CheckpointConfig, ModelConfig
from ..utils.atomic import fsync_dir, write_durably
from . import manifest
from . import store as files
from .resume import Resume
from .state import RecordingWriter, brief, state_to_save
from .store import (  # noqa: F401 (re-exported)
    TMP_PREFIX,
    is_complete,
    step_dirname,
)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; `latest` still names the previous one."""


class CheckpointManager:
    """Owns `run_dir/checkpoints`: saving, retention and choosing what to resume from.

    Every rank writes its shards through DCP; only the main rank touches the directory structure
    (temp dir, manifest, rename, `latest`, pruning). Methods that take a collective (`save`,
    `wait`, `restore`) must be called by every rank at the same point; `close` takes none.
    """

    def __init__(self, run_dir: str, cfg: CheckpointConfig, model_cfg: ModelConfig,
                 log: Callable[[str], None] = print, is_main: bool = True,
                 distributed: bool = False, identity: dict | None = None,
                 on_save_point: Callable[[int, str], None] | None = None,
                 extra_meta: dict | None = None):
        self.run_dir = run_dir
        # More meta.json entries, written as given (hf/source.py: what an export needs from
        # model.init_from's source, so a step dir exports without it). None: none.
        self.extra_meta = extra_meta or {}
        # What makes this run's data (and its hyper-parameters): recorded in meta.json and
        # compared before loading (checkpoint/identity.py check_resume). None: neither (library use).
        self.identity = identity
        self.dir = os.path.join(run_dir, "checkpoints")
        self.ckdir = files.CheckpointDir(self.dir, log)
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.log = log
        # Called with (step, "commit" | "latest") at those two points of a save: where tests
        # inject crashes and pauses (train/faults.py). None: nothing happens there.
        self.on_save_point = on_save_point or (lambda step, point: None)
        self.is_main = is_main
        self.distributed = distributed
        self._group = None  # the checkpoint's own gloo group, made once on first use
        self._executor: ThreadPoolExecutor | None = None  # finishes async saves
        self._pending: tuple[int, Future] | None = None  # the async save in flight
        self.resume = Resume(self.ckdir, cfg, model_cfg, identity, log, is_main, distributed,
                             group=self._pg)

    @property
    def origin(self) -> str | None:
        """The `checkpoint.resume=PATH` this run's line started from (realpath), recorded in
        every meta.json it saves: rerunning the same command then continues that line."""
        return self.resume.origin

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                trainer_state: dict) -> tuple[dict | None, str | None]:
        """Apply `checkpoint.resume` (Resume.restore): (saved trainer state, path) or (None,
        None). A collective: every rank calls it."""
        return self.resume.restore(model, optimizer, trainer_state)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _pg(self):
        """Gloo group for async saves and verification verdicts; None alone. Collective once."""
        if self.distributed and self._group is None:
            from ..parallel.mesh import (
                new_group,  # with the world group's parallel.timeout_s
            )

            self._group = new_group(backend="gloo")
        return self._group

    # ---- saving -------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict) -> str:
        """Save checkpoint `step` and return its final path.

        Sync: returns once it is committed and `latest` names it. Async: returns once the state
        is copied; the commit follows in the background (see the module docstring).
        """
        self.wait()  # at most one save in flight; a failed one stops the run here
        final = os.path.join(self.dir, step_dirname(step))
        tmp = os.path.join(self.dir, TMP_PREFIX + step_dirname(step))
        if self.is_main:
            os.makedirs(self.dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()  # nobody writes into tmp before it is fresh
        state = state_to_save(model, optimizer, trainer_state)
        writer = RecordingWriter(tmp)  # learns which shard files this rank writes
        if not self.cfg.async_save:
            # Collective: returns once every rank's files (and rank 0's `.metadata`) are written.
            dcp.save(state, checkpoint_id=tmp, storage_writer=writer,
                     no_dist=not self.distributed)
            self._finish(step, tmp, final, writer)
            self._barrier()  # nobody goes on (and maybe saves again) before the commit
            self.log(f"saved checkpoint {final}")
            return final
        future = dcp.async_save(state, checkpoint_id=tmp, storage_writer=writer,
                                process_group=self._pg(),
                                no_dist=not self.distributed)  # returns once staged (copied)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending = (step, self._executor.submit(self._finish_async, step, future, tmp, final,
                                                     writer))
        self.log(f"saving checkpoint {final} in the background")
        return final

    def _finish_async(self, step: int, future: Future, tmp: str, final: str,
                      writer: RecordingWriter) -> None:
        try:
            future.result()  # DCP's write on every rank (rank 0 wrote `.metadata` last)
            self._finish(step, tmp, final, writer)
        except BaseException as exc:
            self.log(f"error: background save of checkpoint step {step} failed "
                     f"({brief(exc)}); `latest` still names the previous checkpoint")
            raise
        if self.is_main:
            self.log(f"saved checkpoint {final}")

    def _finish(self, step: int, tmp: str, final: str, writer: RecordingWriter) -> None:
        self.on_save_point(step, "commit")
        hashed, algorithm = self._hash_own_files(tmp, writer.written)  # collective
        if self.is_main:
            self._commit(step, tmp, final, hashed, algorithm)

    def _hash_own_files(self, tmp: str, written: list[str]) -> tuple[dict, str]:
        """Every rank hashes the shard files it wrote, all at once; rank 0 gathers the entries
        (on the checkpoint's gloo group) and returns them with their algorithm ({} elsewhere).
        A rank's read error fails the save on that rank and on rank 0, which never commits."""
        algorithm = manifest.default_algorithm()
        try:
            mine = (algorithm, manifest.hash_files(tmp, written, algorithm), None)
        except OSError as exc:
            mine = (algorithm, {}, f"{exc.filename}: {exc.strerror or exc}")
        every = [mine]
        if self.distributed:
            every = [None] * dist.get_world_size() if self.is_main else None
            dist.gather_object(mine, every, dst=0, group=self._pg())  # -> rank 0: one per rank
        rank = dist.get_rank() if self.distributed else 0
        errors = [f"rank {r}: {e[2]}" for r, e in (enumerate(every) if every else [(rank, mine)])
                  if e[2]]
        if errors:
            raise OSError(f"hashing the checkpoint's files failed ({errors[0]})")
        # A rank hashing with another algorithm (it lacks xxhash) leaves its files to rank 0.
        hashed = {n: v for alg, entries, _ in (every or []) if alg == algorithm
                  for n, v in entries.items()}
        return hashed, algorithm

    def _commit(self, step: int, tmp: str, final: str, hashed: dict, algorithm: str) -> None:
        meta = {"step": step, "model": dataclasses.asdict(self.model_cfg),
                "torch": torch.__version__}
        if self.identity is not None:
            meta["identity"] = self.identity
        if self.origin is not None:
            meta["origin"] = self.origin
        meta.update({k: v for k, v in self.extra_meta.items() if k not in meta})
        write_durably(os.path.join(tmp, manifest.META), json.dumps(meta, indent=1))
        manifest.write_manifest(tmp, hashed, algorithm)  # last file in: it covers all the others
        if os.path.exists(final):  # cannot happen after `abandon_after`; never delete it anyway
            self.ckdir.move_aside(step_dirname(step), "another save of the same step committed")
        os.rename(tmp, final)  # the commit
        fsync_dir(self.dir)
        self.on_save_point(step, "latest")
        self.ckdir.point_latest(step_dirname(step))
        self.ckdir.prune(self.cfg.keep, step_dirname(step))

    def wait(self) -> None:
        """Block until the async save in flight (if any) is committed; raise, on every rank, if
        it failed on any. A collective when there is one in flight (all ranks have one)."""
        if self._pending is None:
            return
        (step, future), self._pending = self._pending, None
        error = future.exception()
        failed = error is not None
        if self.distributed:  # agree, so no rank trains on while another stops
            flag = torch.tensor([int(failed)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._pg())
            failed = bool(flag.item())
        if failed:
            why = brief(error) if error is not None else "it failed on another rank"
            raise CheckpointSaveError(f"checkpoint step {step} was not saved ({why}); `latest` "
                                      "still names the previous checkpoint") from error

    def close(self) -> None:
        """End of training: let a save in flight finish (its failure is logged, not raised —
        call `wait` first for that) and stop the background thread. Takes no collective."""
        if self._pending is not None:
            self._pending[1].exception()  # blocks; `_finish_async` has logged any error
            self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
