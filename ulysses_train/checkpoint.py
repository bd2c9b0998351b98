"""Checkpoints: DCP save/load, the `latest` pointer, retention and the resume decision.

Layout under the run dir:
    checkpoints/step_00000100/   a complete checkpoint (DCP files + `.metadata` + `meta.json`)
    checkpoints/latest           text file naming the newest complete step directory
    checkpoints/.tmp_step_...    a save in progress (never read; removed on the next start)

Invariants:
- A step directory exists only once every file in it is written: DCP writes into `.tmp_step_N`,
  we add `meta.json`, and only then rename the directory into place; `latest` is replaced
  atomically with `os.replace` afterwards. A crash at any point leaves `latest` naming a complete
  checkpoint (or nothing).
- The state is layout-independent (FQN-keyed model/optimizer state from DCP's state_dict helpers,
  data position = global step), so DCP can later reshard it across parallel layouts.
- `meta.json` records the model shape so an incompatible checkpoint is refused before any
  tensor is read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .config import CheckpointConfig, ModelConfig
from .errors import ConfigError

# DCP wraps read failures in CheckpointException, which derives from BaseException.
LOAD_ERRORS = (Exception, CheckpointException)
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size",
              "tie_embeddings")


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def is_complete(path: str) -> bool:
    """A committed checkpoint: DCP's `.metadata` (written last by DCP) and our `meta.json`."""
    return (os.path.isfile(os.path.join(path, ".metadata"))
            and os.path.isfile(os.path.join(path, "meta.json")))


def _quiet(fn, *args, **kwargs):
    # DCP warns that it runs without a process group; single-process runs are intended.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, **kwargs)


class CheckpointManager:
    """Owns `run_dir/checkpoints`: saving, retention and choosing what to resume from."""

    def __init__(self, run_dir: str, cfg: CheckpointConfig, model_cfg: ModelConfig,
                 log: Callable[[str], None] = print, crash_at_step: int = 0,
                 is_main: bool = True, distributed: bool = False):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.log = log
        self.crash_at_step = crash_at_step
        # Every rank writes its shards through DCP; only the main rank touches the directory
        # structure (temp dir, rename, `latest`, pruning), between barriers.
        self.is_main = is_main
        self.distributed = distributed

    def _barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    # ---- saving -------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict) -> str:
        """Write checkpoint `step` atomically, point `latest` at it, prune old ones."""
        final = os.path.join(self.dir, step_dirname(step))
        tmp = os.path.join(self.dir, TMP_PREFIX + step_dirname(step))
        if self.is_main:
            os.makedirs(self.dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()  # nobody writes into tmp before it is fresh
        model_sd, optim_sd = get_state_dict(model, optimizer)
        _quiet(dcp.save, {"model": model_sd, "optim": optim_sd, "trainer": trainer_state},
               checkpoint_id=tmp)  # collective; returns once every rank's files are written
        if self.crash_at_step == step:  # debug.crash_in_save_at_step: die with files half-committed
            os._exit(17)
        if self.is_main:
            self._commit(step, tmp, final)
        self._barrier()  # nobody goes on (and maybe saves again) before the commit
        return final

    def _commit(self, step: int, tmp: str, final: str) -> None:
        meta = {"step": step, "model": dataclasses.asdict(self.model_cfg),
                "torch": torch.__version__}
        _write_durably(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_durably(os.path.join(self.dir, "latest.tmp"), step_dirname(step) + "\n")
        os.replace(os.path.join(self.dir, "latest.tmp"), os.path.join(self.dir, "latest"))
        self._prune(keep_name=step_dirname(step))

    def _prune(self, keep_name: str) -> None:
        old = [n for n in self.complete_steps() if n != keep_name]
        for name in old[: max(0, len(old) - (self.cfg.keep - 1))]:
            shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    # ---- finding ------------------------------------------------------------------------
    def complete_steps(self) -> list[str]:
        """Names of complete step directories, oldest first."""
        if not os.path.isdir(self.dir):
            return []
        names = sorted(n for n in os.listdir(self.dir) if n.startswith(STEP_PREFIX))
        return [n for n in names if is_complete(os.path.join(self.dir, n))]

    def _latest_name(self) -> str | None:
        try:
            with open(os.path.join(self.dir, "latest")) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def clean_partial(self) -> None:
        """Remove saves that never committed (crash mid-save); they are never read."""
        if not self.is_main or not os.path.isdir(self.dir):
            return
        for name in os.listdir(self.dir):
            if name.startswith(TMP_PREFIX):
                self.log(f"removing incomplete checkpoint {os.path.join(self.dir, name)}")
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def candidates(self) -> list[str]:
        """What `resume=auto` tries, in order: `latest`, then complete ones newest first."""
        names = list(reversed(self.complete_steps()))
        latest = self._latest_name()
        if latest in names:
            names.remove(latest)
            names.insert(0, latest)
        elif latest is not None:
            self.log(f"warning: checkpoints/latest names {latest!r}, which is missing or "
                     "incomplete; falling back to the newest complete checkpoint")
        return [os.path.join(self.dir, n) for n in names]

    def has_any(self) -> bool:
        return os.path.isdir(self.dir) and any(
            n.startswith(STEP_PREFIX) for n in os.listdir(self.dir))

    # ---- loading ------------------------------------------------------------------------
    def check_shape(self, path: str) -> None:
        """Refuse a checkpoint of another model shape, from its meta.json alone."""
        try:
            with open(os.path.join(path, "meta.json")) as f:
                saved = json.load(f)["model"]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError("checkpoint.resume", f"{path} is not a readable checkpoint "
                              f"(meta.json: {exc}); point it at a checkpoints/step_* dir") from exc
        diffs = [f"{k}={saved.get(k)} (this run: {getattr(self.model_cfg, k)})"
                 for k in SHAPE_KEYS if saved.get(k) != getattr(self.model_cfg, k)]
        if diffs:
            raise ConfigError("checkpoint.resume", f"{path} holds a different model shape: "
                              + ", ".join(diffs) + "; resume with the same model settings")

    def load(self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict) -> dict:
        """Load `path` into model/optimizer; return the saved trainer state (same keys)."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "trainer": dict(trainer_state)}
        _quiet(dcp.load, state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        return state["trainer"]

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                trainer_state: dict) -> tuple[dict | None, str | None]:
        """Apply `checkpoint.resume`; return (saved trainer state, path) or (None, None).

        auto: `latest`, falling back (with a warning) to older complete checkpoints; an error if
        checkpoints exist but none loads — never silently train over them. never: start fresh,
        refusing a run dir that already holds checkpoints. PATH: exactly that one, or an error.
        """
        self.clean_partial()
        mode = self.cfg.resume
        if mode == "never":
            if self.has_any():
                raise ConfigError("checkpoint.resume", f"'never', but {self.dir} already holds "
                                  "checkpoints; use a fresh hydra.run.dir or resume=auto")
            return None, None
        if mode != "auto":
            path = os.path.abspath(os.path.expanduser(mode))
            return self._load_explicit(path, model, optimizer, trainer_state), path
        candidates = self.candidates()
        for path in candidates:
            self.check_shape(path)
            try:
                return self.load(path, model, optimizer, trainer_state), path
            except LOAD_ERRORS as exc:  # corrupt files surface as many exception types
                self.log(f"warning: checkpoint {path} could not be loaded ({_brief(exc)}); "
                         "trying an older one")
        if self.has_any():
            raise ConfigError("checkpoint.resume", f"{self.dir} holds checkpoints but none is "
                              f"loadable (tried {len(candidates)}); repair or move them, or give "
                              "a fresh hydra.run.dir — refusing to train over them")
        return None, None

    def _load_explicit(self, path: str, model, optimizer, trainer_state: dict) -> dict:
        if not os.path.isdir(path) or not is_complete(path):
            raise ConfigError("checkpoint.resume", f"{path} is not a complete checkpoint "
                              "(missing, or a partial save); give a checkpoints/step_* directory")
        self.check_shape(path)
        try:
            return self.load(path, model, optimizer, trainer_state)
        except LOAD_ERRORS as exc:
            raise ConfigError("checkpoint.resume", f"{path} could not be loaded ({_brief(exc)}); "
                              "it is corrupt — pick another step directory") from exc


def _brief(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0][:200]}" if first else type(exc).__name__


def _write_durably(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
