"""Choosing and loading the checkpoint to resume from: `Resume`, which `CheckpointManager.restore`
delegates to (it is given what it reads: the checkpoints dir, checkpoint.*, the model config, the
data identity and the checkpoint's gloo group). The rules it keeps:
- `resume=auto` follows `latest` and falls back to an older checkpoint only past *verified*
  corruption (manifest, sizes, hashes); any other failure to verify or load is a
  `InputUnreadable (store.read_error)` (exit 1) that leaves everything on disk.
- Every pickle in the checkpoint is read restricted (safe_read.py): a planted one is
  `RefusedPickle` (exit 1, naming the file), in both modes — no fallback past it, nothing run.
- `resume=PATH` loads exactly PATH, unless this run dir's `latest` already continues the line
  that started from PATH (a rerun, restart or requeue of the same command): then it continues.
- Checkpoints newer than the one resumed from are moved to `checkpoints/abandoned/`, never
  deleted (`CheckpointDir.abandon_after`).
- Verification is split over the ranks: each hashes a share of the files, verdicts gathered.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import set_state_dict

from ..config.errors import ConfigError, InputUnreadable
from . import manifest
from . import store as files
from .identity import check_resume
from .manifest import read_error
from .safe_read import RefusedPickle, load
from .state import load_failure, state_to_load

# DCP wraps read failures in CheckpointException, which derives from BaseException.
LOAD_ERRORS = (Exception, CheckpointException)


def verify_collectively(path: str, group, **share_args) -> list[str]:
    """`manifest.verify_share` split over the ranks of gloo `group` (None: this process
    alone): each rank hashes its share of the files and the verdicts are gathered, so every rank
    returns the same problems (deduplicated) or raises the same InputUnreadable (store.read_error).
    `share_args`: verify_share's `hashes`, `check`, `log`. A collective over `group`."""
    rank, world = ((dist.get_rank(group), dist.get_world_size(group)) if group is not None
                   else (0, 1))
    try:
        mine = (manifest.verify_share(path, (rank, world), **share_args), None)
    except InputUnreadable as exc:
        mine = ([], exc.why)
    every = [mine]
    if group is not None:
        every = [None] * world
        dist.all_gather_object(every, mine, group=group)  # -> every rank: world verdicts
    errors = [f"rank {r}: {why}" if group is not None else why
              for r, (_, why) in enumerate(every) if why]
    if errors:
        raise read_error(path, errors[0])
    return list(dict.fromkeys(p for problems, _ in every for p in problems))  # dedup


class Resume:
    """Applies `checkpoint.resume` to a run's `checkpoints/` dir (see the module docstring).

    `identity`: what the run's data stream is (checked against each checkpoint's meta.json;
    None: not checked). `group`: a function returning the checkpoint's gloo group (None alone),
    made on first use. After `restore`, `origin` is the `checkpoint.resume=PATH` the run's line
    started from (recorded in every later meta.json), or None."""

    def __init__(self, ckdir: files.CheckpointDir, cfg, model_cfg, identity: dict | None,
                 log: Callable[[str], None], is_main: bool, distributed: bool,
                 group: Callable[[], object]):
        self.ckdir, self.dir, self.cfg, self.model_cfg = ckdir, ckdir.path, cfg, model_cfg
        self.identity, self.log, self.is_main = identity, log, is_main
        self.distributed, self._pg = distributed, group
        self.origin: str | None = None

    # ---- verifying ----------------------------------------------------------------------
    def check_shape(self, path: str) -> None:
        """Refuse a checkpoint of another model (shape, flag or function: store.check_shape) or
        data identity, from meta.json alone."""
        files.check_shape(path, self.model_cfg, self.cfg.resume)
        if self.identity is not None:
            check_resume(files.read_meta(path), self.identity, path, self.cfg.resume, self.log)

    def verify(self, path: str) -> list[str]:
        """Problems ('PATH: what') that make `path` unusable — verified corruption: a missing
        or unreadable manifest, a missing file, a size or hash that differs from it; empty when
        verified. ConfigError if it holds another model shape; InputUnreadable (store.read_error) for any other
        read error (I/O, ...) on any rank. A collective: every rank gets the same verdict."""
        return verify_collectively(path, self._pg() if self.distributed else None,
                                   check=self.check_shape, log=self.log)

    # ---- loading ------------------------------------------------------------------------
    def load(self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict) -> dict:
        """Load `path` into model/optimizer; return the saved trainer state (same keys)."""
        request, state = state_to_load(path, model, optimizer, trainer_state)
        load(request, path, self.distributed)  # every pickle in it restricted (safe_read.py)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        return request["trainer"]

    def _load_verified(self, path: str, model, optimizer, trainer_state: dict) -> dict:
        """`load` a verified checkpoint. Its files match the manifest, so a failure here (I/O
        error, out of memory, a bug) is no evidence of corruption: InputUnreadable (store.read_error), which
        stops the run (exit 1) — falling back would abandon a checkpoint that may be good."""
        try:
            return self.load(path, model, optimizer, trainer_state)
        except RefusedPickle:  # a planted pickle: the file is named, nothing falls back past it
            raise
        except LOAD_ERRORS as exc:
            raise read_error(path, f"loading it failed: {load_failure(exc)}") from exc

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                trainer_state: dict) -> tuple[dict | None, str | None]:
        """Apply `checkpoint.resume`; return (saved trainer state, path) or (None, None).

        auto: `latest`, falling back (with a warning naming the bad file) to older checkpoints
        only past verified corruption; an error if checkpoints exist but none is intact — never
        silently train over them. never: start fresh, refusing a run dir that already holds
        checkpoints. PATH: exactly that one, verified, or an error. Another model shape is
        always an error; so is any other failure to read (InputUnreadable (store.read_error), exit 1). Newer
        checkpoints than the one resumed from are moved aside, never deleted.
        """
        if self.is_main:
            self.ckdir.clean_partial()
        mode = self.cfg.resume
        if mode == "never":
            if self.ckdir.has_any():
                raise ConfigError("checkpoint.resume", f"'never', but {self.dir} already holds "
                                  "checkpoints; use a fresh hydra.run.dir or "
                                  "checkpoint.resume=auto")
            return None, None
        explicit = None if mode == "auto" else os.path.abspath(os.path.expanduser(mode))
        if explicit is not None and self._continued_from(explicit):
            explicit = None  # a rerun (or torchrun/SLURM restart) of the same command
        if explicit is None:
            state, path = self._load_auto(model, optimizer, trainer_state)
            self.origin = files.read_meta(path).get("origin") if path else None
        else:
            path = explicit
            state = self._load_explicit(path, model, optimizer, trainer_state)
            self.origin = os.path.realpath(path)
        if path is not None and self.is_main:
            self.ckdir.abandon_after(path)
        return state, path

    def _continued_from(self, path: str) -> bool:
        """True when this run dir's `latest` checkpoint is newer than `path` and its line
        started from `path` (its meta.json's `origin`): `checkpoint.resume=PATH` was applied
        already, so rerunning the same command — by hand, a torchrun restart or a SLURM requeue
        — continues that line instead of going back to PATH again (and again)."""
        latest = self.ckdir.latest_name()
        if latest is None or not os.path.isdir(os.path.join(self.dir, latest)):
            return False
        try:
            ours, theirs = files.read_meta(os.path.join(self.dir, latest)), files.read_meta(path)
        except (OSError, ValueError, ConfigError):
            return False
        if ours.get("origin") != os.path.realpath(path) or ours["step"] <= theirs["step"]:
            return False
        self.log(f"checkpoint.resume={path} was applied already: this run dir continued from it "
                 f"to step {ours['step']}, so resuming from its latest checkpoint (to go back to "
                 "that path again, move the newer step directories out of checkpoints/ first)")
        return True

    def _load_auto(self, model, optimizer, trainer_state: dict) -> tuple[dict | None, str | None]:
        candidates = self.ckdir.candidates()
        for path in candidates:
            problems = self.verify(path)
            if problems:
                self.log(f"warning: checkpoint {path} is corrupt ({manifest.summary(problems)}); "
                         "trying the next newest")
                continue
            return self._load_verified(path, model, optimizer, trainer_state), path
        if self.ckdir.has_any():
            raise ConfigError("checkpoint.resume", f"{self.dir} holds checkpoints but none is "
                              f"loadable (tried {len(candidates)}); repair or move them, or give "
                              "a fresh hydra.run.dir — refusing to train over them")
        return None, None

    def _load_explicit(self, path: str, model, optimizer, trainer_state: dict) -> dict:
        files.check_resume_path(path, self.model_cfg)  # exists, complete, same shape
        problems = self.verify(path)
        if problems:
            raise ConfigError("checkpoint.resume", f"{path} is corrupt: "
                              f"{manifest.summary(problems)}; pick another step directory")
        return self._load_verified(path, model, optimizer, trainer_state)
