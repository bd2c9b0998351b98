"""`model.init_from`: initial weights from a Hugging Face model directory or one of our runs.

Weights only: the run that loads them is a new run, with its own optimizer state, schedule and
data position (stage 2 of a context extension starts from stage 1 this way). What PATH may be:
- a Hugging Face model dir (config.json + `model.safetensors`, or shards + index): the tensors
  are checked from the safetensors headers (hf/weights_dir.py) and read slice by slice into each
  rank's shards (hf/load.py);
- one of our run dirs (its `checkpoints/latest`), its `checkpoints/` dir, or a `step_N` dir:
  DCP reads the `model.*` entries only, resharding between any two layouts for free.

`check_initial_weights` is the cheap half (files, headers, meta.json, our manifest's sizes; no
torch, no tensor data), called by config validation before any heavy work; `load_initial_weights`
is the load, called by every rank after the model is built, sharded and initialised
(parallel/parallelize.py). Our checkpoints' content hashes are verified there, once per load, split over
the ranks as resume splits them (`verify_checkpoint`; export calls it too): validation runs on
every rank, and more than once per process, so hashing there would read the checkpoint over and
over (resume too checks only what meta.json says at validation, and hashes at the load).
"""
from __future__ import annotations

import os
import time

from ..checkpoint import manifest
from ..checkpoint import store as files
from ..config.architecture import architecture_diffs, describe
from ..config.errors import ConfigError, InputUnreadable
from . import weights_dir
from .weights_dir import KEY, fail

HF, OURS = "Hugging Face model dir", "checkpoint"


def resolve(path: str, key: str = KEY, hf: bool = True) -> tuple[str, str]:
    """(kind, directory to read) for a weights source: (HF, path) for a Hugging Face model dir,
    (OURS, step dir) for one of our run dirs (its `checkpoints/latest`), its `checkpoints/` dir
    or a `step_*` dir. The one place that turns such a PATH into a directory: model.init_from,
    its config precheck (hf/config.py), eval and export all call it. `hf=False` refuses HF dirs
    (export reads only our checkpoints). ConfigError named `key` for anything else (a run dir or
    checkpoints/ dir without `latest` says so), or for a step that is missing or a partial save."""
    accepted = ("a Hugging Face model directory, " if hf else "") + \
        "a run dir or a checkpoints/step_* directory"
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        problem = "is not a directory" if os.path.exists(path) else "does not exist"
        raise ConfigError(key, f"{path} {problem}; give {accepted}")
    for ckdir in (os.path.join(path, "checkpoints"), path):  # a run dir, or its checkpoints/
        latest = files.CheckpointDir(ckdir, log=lambda _: None).latest_name()
        if latest is not None:
            return OURS, _complete_step(os.path.join(ckdir, latest), f"{ckdir}/latest names", key)
    if os.path.basename(path).startswith(files.STEP_PREFIX) or any(
            os.path.isfile(os.path.join(path, n)) for n in (manifest.META, manifest.DCP_METADATA)):
        return OURS, _complete_step(path, "", key)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise ConfigError(key, f"{path} is a run dir without checkpoints/latest (no committed "
                               "checkpoint yet); give one of its checkpoints/step_* directories")
    if os.path.basename(path) == "checkpoints" or files.CheckpointDir(
            path, log=lambda _: None).has_any():  # step_* dirs inside: a checkpoints/ dir
        raise ConfigError(key, f"{path} is a checkpoints/ dir without `latest` (no committed "
                               "checkpoint named yet); give one of its step_* directories")
    if weights_dir.is_hf_dir(path):
        if hf:
            return HF, path
        raise ConfigError(key, f"{path} is a Hugging Face model directory, not one of our "
                               f"checkpoints; give {accepted}")
    ours = "one of our checkpoints (a run dir with checkpoints/latest, or a step_* directory)"
    raise ConfigError(key, f"{path} is neither a Hugging Face model directory (config.json + "
                      f"{weights_dir.SINGLE}, or shards + {weights_dir.INDEX}) nor {ours}" if hf
                      else f"{path} is not {ours}")


def _complete_step(step_dir: str, named_by: str, key: str) -> str:
    if not os.path.isdir(step_dir) or not files.is_complete(step_dir):
        who = f"{named_by} {step_dir}, which" if named_by else step_dir
        raise ConfigError(key, f"{who} is not a complete checkpoint (missing, or a partial "
                               "save); give a complete checkpoints/step_* directory")
    return step_dir


def check_checkpoint(step_dir: str, model_cfg) -> None:
    """Our checkpoint must hold this model's architecture (meta.json "model",
    config/architecture.py's keys) and be intact in size (manifest.json; the hashes are verified
    when it is loaded: `verify_checkpoint`). Its pickles are checked by the entry points'
    pre-check (cli/checks.py) and read restricted by the load itself (checkpoint/safe_read.py)."""
    try:
        saved = files.read_meta(step_dir)["model"]
    except ConfigError as exc:
        raise fail(exc.message) from exc
    diffs = architecture_diffs(saved, model_cfg)
    if diffs:
        raise fail(f"{step_dir} holds another architecture: {describe(diffs)}; set model.* "
                   "(or the model= preset) to the checkpoint's")
    verify_checkpoint(step_dir, KEY, hashes=False)


def verify_checkpoint(step_dir: str, key: str = KEY, distributed: bool = False,
                      hashes: bool = True) -> str | None:
    """Verify our checkpoint `step_dir` against its manifest.json as resume does
    (checkpoint/resume.py): every file's size, then (`hashes`) every file's content hash. With
    `distributed`, each rank hashes every world-th file and the verdicts are gathered on a
    gloo group, so every rank raises the same error or none (a collective: every rank calls it).

    Returns None, or a warning line when the manifest's hash algorithm is missing here (sizes
    only, then). The checks are manifest.verify_share's, split over the ranks by
    checkpoint/resume.py verify_collectively when `distributed`: the code resume runs. ConfigError(`key`, "... is damaged: ...", exit 2) for a missing or unreadable
    manifest, a missing file, a size or a hash that differs; InputUnreadable (exit 1) for
    any other read error. Costs one read of the checkpoint's bytes (xxh3: ~0.3-0.5 s/GiB).
    """
    warnings: list[str] = []
    try:
        if distributed:  # each rank hashes a share; verdicts gathered (resume's own mechanism)
            import torch.distributed as dist

            from ..checkpoint.resume import verify_collectively
            from ..parallel.mesh import new_group

            group = new_group(backend="gloo")  # CPU objects; never the training (NCCL) group
            try:
                problems = verify_collectively(step_dir, group, hashes=hashes,
                                               log=warnings.append)
            finally:
                dist.destroy_process_group(group)
        else:  # no torch.distributed: config validation calls this too
            problems = manifest.verify_share(step_dir, hashes=hashes, log=warnings.append)
    except InputUnreadable as exc:
        raise InputUnreadable(key, f"{step_dir} could not be read ({exc.why}); nothing "
                                        "shows it is damaged: fix the cause and rerun") from None
    if problems:
        raise ConfigError(key, f"{step_dir} is damaged: {manifest.summary(problems)}; use another "
                               "step_* dir")
    return warnings[0] if warnings else None


def check_initial_weights(path: str, model_cfg) -> tuple[str, str]:
    """Everything about `model.init_from=path` that can be checked without reading a tensor;
    returns (kind, directory). ConfigError (`model.init_from: ...`, exit 2) on any problem."""
    kind, where = resolve(path)
    if kind == HF:
        weights_dir.check_tensors(weights_dir.tensor_table(where), model_cfg)
    else:
        check_checkpoint(where, model_cfg)
    return kind, where


def load_initial_weights(model, path: str, model_cfg, dims) -> str:
    """Load the weights at `path` (see the module docstring) into `model`, which
    `parallelize.build_model` has built, sharded and initialised for layout `dims`; return one
    line for the log: what was loaded, from where, in how long.

    A collective: every rank calls it at the same point. ConfigError as `check_initial_weights`;
    a checkpoint whose DCP metadata disagrees with the model is a ConfigError too; one whose
    pickles name anything outside the allow-list is safe_read.RefusedPickle (exit 1, every rank).
    """
    start = time.perf_counter()
    kind, where = check_initial_weights(path, model_cfg)
    if kind == HF:
        from .load import load_hf_weights

        table = weights_dir.tensor_table(where)
        mapping = weights_dir.check_tensors(table, model_cfg)
        n = load_hf_weights(model, where, mapping, table, dims.distributed)
        dtypes = sorted({table[t].dtype for t in mapping.values()})
        what = f"{n / 1e6:.2f}M parameters ({'/'.join(dtypes).lower()} -> fp32)"
        ignored = weights_dir.language_model_layout(table)[2]
        if ignored:  # a Gemma3ForConditionalGeneration: its language model only
            what += (f" of the language model, ignoring the {len(ignored)} vision tower / "
                     "projector tensors")
    else:
        warning = verify_checkpoint(where, KEY, dims.distributed)  # before any tensor is read
        n = _load_our_weights(model, where, dims.distributed)
        what = (f"{n / 1e6:.2f}M parameters (weights only: new optimizer, schedule, data; "
                + (warning.removeprefix("warning: ") if warning else "hashes verified") + ")")
    return (f"{KEY}: loaded {what} from {kind} {where} in "
            f"{time.perf_counter() - start:.1f} s")


def _load_our_weights(model, step_dir: str, distributed: bool) -> int:
    """DCP-load the `model.*` entries of our checkpoint `step_dir` (nothing else) into `model`;
    return the parameter count. Checks every entry's presence and global shape first."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    from ..checkpoint.safe_read import load, read_metadata

    state = get_model_state_dict(model)  # FQN-keyed, sharded like the model (no copies)
    saved = read_metadata(step_dir).state_dict_metadata  # restricted: safe_read.py
    missing = [k for k in state if f"model.{k}" not in saved]
    if missing:
        raise fail(f"{step_dir} lacks model tensors {weights_dir.listing(missing)}")
    for k, v in state.items():
        if tuple(saved[f"model.{k}"].size) != tuple(v.shape):
            raise fail(f"{step_dir}: model.{k} has shape {list(saved[f'model.{k}'].size)}, the "
                       f"model {list(v.shape)}; set model.* to the checkpoint's architecture")
    load({"model": state}, step_dir, distributed)
    set_model_state_dict(model, state)  # a no-op copy when DCP filled the parameters in place
    return sum(v.numel() for v in state.values())
