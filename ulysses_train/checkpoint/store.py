"""Checkpoints as plain files: the `checkpoints/` directory, the step directories and their
meta.json, and which checkpoint a run resumes from.

`CheckpointDir` owns the directory structure: step directories, `latest`, partial saves,
retention; only the main rank changes it. A committed checkpoint `step_XXXXXXXX/` holds DCP's
shard files (`__<rank>_<i>.distcp`) and `.metadata`, our `meta.json` (step, model config, torch
version, data identity) and, written last, our `manifest.json` (checkpoint/manifest.py: every
other file's size and content hash). Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable

from ..config.architecture import DIMENSIONS, FLAGS, RESUME_KEYS, architecture_diffs, describe
from ..config.errors import ConfigError
from ..config.overrides import override
from ..utils.atomic import atomic_write, fsync_dir
from .manifest import DCP_METADATA, MANIFEST, META

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
ABANDONED = "abandoned"  # newer steps a resume from an older one moved aside (never deleted)


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def is_complete(path: str) -> bool:
    """Committed: DCP's `.metadata`, our `meta.json` and the manifest (written last) are there."""
    return all(os.path.isfile(os.path.join(path, n)) for n in (DCP_METADATA, META, MANIFEST))


def read_meta(path: str) -> dict:
    """A checkpoint's meta.json: step, model config, torch version; ConfigError if unreadable."""
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
        meta["step"], meta["model"].items()
        return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError("checkpoint.resume", f"{path} is not a readable checkpoint ({META}: "
                          f"{type(exc).__name__}); point it at a checkpoints/step_* dir") from exc


def check_shape(path: str, model_cfg, mode: str = "auto") -> None:
    """Refuse to resume a checkpoint of another model, from its meta.json alone (no tensor
    read), comparing config/architecture.py's RESUME_KEYS: another model (a dimension differs)
    names checkpoint.resume; the same dimensions with another flag (tie_embeddings, qkv_bias)
    or function key (RoPE, norm_eps) name that model.* key, which is what to change. A
    function key alone can be changed by a new run from these weights (model.init_from), which
    the line says. `mode`: checkpoint.resume (auto, or the PATH given), for that advice.
    ConfigError (exit 2)."""
    saved = read_meta(path)["model"]
    diffs = architecture_diffs(saved, model_cfg, RESUME_KEYS)
    if not diffs:
        return
    if any(k in DIMENSIONS for k, _, _ in diffs):
        # A run started from model.init_from took its architecture from there; without the
        # key again the preset's comes back, which is what differs.
        again = (f"; this run started from {override('model.init_from', saved['init_from'])}: "
                 "give it again" if saved.get("init_from") and not model_cfg.init_from else "")
        raise ConfigError("checkpoint.resume", f"{path} holds a different model shape: "
                          f"{describe(diffs)}; resume with the same model settings{again}")
    restore = " ".join(override(f"model.{k}", saved) for k, saved, _ in diffs)
    why = f"{os.path.abspath(path)} was trained with {describe(diffs)}"
    if any(k in FLAGS for k, _, _ in diffs):
        raise ConfigError(f"model.{diffs[0][0]}", f"{why}; set {restore} to resume it (or resume "
                          "another checkpoint)")
    new_run = override("model.init_from", os.path.abspath(path)) + " hydra.run.dir=NEW_DIR"
    if mode != "auto":
        new_run = "drop checkpoint.resume and add " + new_run
    raise ConfigError(f"model.{diffs[0][0]}", f"{why}, which changes what its weights compute, "
                      f"so resuming would train another function; set {restore} to resume it, "
                      f"or start the next stage from it as a new run: {new_run} (an empty "
                      "directory)")


def check_resume_path(path: str, model_cfg) -> None:
    """The cheap checks of an explicit `checkpoint.resume=PATH`: a complete checkpoint directory
    of this model (`check_shape`). File sizes and hashes are checked when it is loaded (it may
    be big)."""
    if not os.path.isdir(path) or not is_complete(path):
        raise ConfigError("checkpoint.resume", f"{path} is not a complete checkpoint (missing, "
                          "or a partial save); give a checkpoints/step_* directory")
    check_shape(path, model_cfg, mode=path)


class CheckpointDir:
    """`run_dir/checkpoints`: which step directories are complete, `latest`, partial saves,
    retention. Callers make sure only the main rank calls the methods that change it."""

    def __init__(self, path: str, log: Callable[[str], None]):
        self.path = path
        self.log = log
        self.protected: str | None = None  # the step dir resumed from: retention keeps it
        self.line_start = 0  # the oldest step of the current line (set by `abandon_after`)

    def complete_steps(self) -> list[str]:
        """Names of complete step directories, oldest first."""
        if not os.path.isdir(self.path):
            return []
        names = sorted(n for n in os.listdir(self.path) if n.startswith(STEP_PREFIX))
        return [n for n in names if is_complete(os.path.join(self.path, n))]

    def has_any(self) -> bool:
        return os.path.isdir(self.path) and any(
            n.startswith(STEP_PREFIX) for n in os.listdir(self.path))

    def latest_name(self) -> str | None:
        try:
            with open(os.path.join(self.path, "latest")) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def point_latest(self, name: str | None) -> None:
        """Atomically make `latest` name `name` (None: remove it)."""
        latest = os.path.join(self.path, "latest")
        if name is None:
            if os.path.exists(latest):
                os.remove(latest)
            return
        atomic_write(latest, name + "\n", durable=True)

    def candidates(self) -> list[str]:
        """What `resume=auto` tries, in order: `latest`, then complete ones newest first."""
        names = list(reversed(self.complete_steps()))
        latest = self.latest_name()
        if latest in names:
            names.remove(latest)
            names.insert(0, latest)
        elif latest is not None:
            self.log(f"warning: checkpoints/latest names {latest!r}, which is missing or "
                     "incomplete; falling back to the newest complete checkpoint")
        return [os.path.join(self.path, n) for n in names]

    def clean_partial(self) -> None:
        """Remove saves that never committed (a crash mid-save); they are never read."""
        if not os.path.isdir(self.path):
            return
        for name in os.listdir(self.path):
            where = os.path.join(self.path, name)
            if name.startswith(TMP_PREFIX):
                self.log(f"removing incomplete checkpoint {where} (a save that never committed)")
                shutil.rmtree(where, ignore_errors=True)
            elif name == "latest.tmp":  # a crash while replacing `latest`
                os.remove(where)

    def prune(self, keep: int, saved: str) -> None:
        """Retention (`checkpoint.keep`), after committing `saved`: of the complete checkpoints
        of the current line (this dir's steps from `line_start` up to `saved`), remove all but
        the newest `keep` — never `protected` (the one resumed from), never one newer than
        `saved`, never an abandoned one (they live in `abandoned/`, outside this listing)."""
        newest = _step_of(saved)
        line = [n for n in self.complete_steps()
                if self.line_start <= _step_of(n) <= newest]
        for name in line[: max(0, len(line) - keep)]:
            if name != self.protected:
                self.log(f"removing checkpoint {os.path.join(self.path, name)} "
                         f"(checkpoint.keep={keep})")
                shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)

    def move_aside(self, name: str, why: str) -> str:
        """Move step directory `name` to `abandoned/` (a numbered suffix if that name is taken
        there, e.g. `step_00000006.1`), log where and why; return the new path. Never deletes."""
        target_dir = os.path.join(self.path, ABANDONED)
        os.makedirs(target_dir, exist_ok=True)
        target, n = os.path.join(target_dir, name), 0
        while os.path.exists(target):
            n += 1
            target = os.path.join(target_dir, f"{name}.{n}")
        os.rename(os.path.join(self.path, name), target)
        fsync_dir(self.path)
        self.log(f"moved checkpoint {os.path.join(self.path, name)} aside to {target}: {why}")
        return target

    def abandon_after(self, path: str) -> None:
        """Resuming from `path` (step N) starts a new line after N, just as metrics.jsonl drops
        its rows after N: move this dir's newer checkpoints (a commit that a kill kept from
        becoming `latest`, ones we fell back past, or the steps after an explicitly chosen older
        one) to `abandoned/`, and point `latest` at `path` — else a later fallback could land on
        a state whose metrics rows were dropped. Sets what `prune` may remove: never `path`;
        when `path` lies outside this dir, only what this line saves after N."""
        step = read_meta(path)["step"]
        names = os.listdir(self.path) if os.path.isdir(self.path) else []
        for name in sorted(n for n in names if _step_of(n) > step):
            self.move_aside(name, f"newer than the step resumed from ({step}), so no longer on "
                            "this run's curve; move it back to resume from it")
        inside = os.path.dirname(os.path.realpath(path)) == os.path.realpath(self.path)
        self.protected = os.path.basename(path) if inside else None
        self.line_start = 0 if inside else step + 1
        if inside:
            if self.latest_name() != os.path.basename(path):
                self.point_latest(os.path.basename(path))
        elif self.latest_name() not in self.complete_steps():  # resumed from elsewhere
            self.point_latest((self.complete_steps() or [None])[-1])


def _step_of(name: str) -> int:
    """The step of a step directory's name; -1 for any other name."""
    digits = name[len(STEP_PREFIX):]
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else -1


def resume_source(run_dir: str, resume: str) -> str | None:
    """The step dir a run in `run_dir` with `checkpoint.resume=resume` will resume from, known
    before anything is built: PATH itself if complete, auto's first candidate (`latest`, else
    the newest complete step; CheckpointDir.candidates), None for `never`, an incomplete PATH
    (its own check reports it) or a run with no checkpoint. Resume wins over model.init_from,
    so this is what decides the run's architecture then."""
    if resume == "never":
        return None
    if resume != "auto":
        path = os.path.abspath(os.path.expanduser(resume))
        return path if is_complete(path) else None
    found = CheckpointDir(os.path.join(run_dir, "checkpoints"), log=lambda _: None).candidates()
    return found[0] if found else None
