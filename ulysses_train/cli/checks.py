"""The input checks that read files, run by the entry points after config/validate.py's pure rules
and before any heavy work (no torch.distributed, no tensor data): `data.paths` exist and have a
known type, `model.init_from` is a usable source (files, safetensors headers, our manifest's
sizes, and no pickle of our checkpoint outside checkpoint/safe_read.py's allow-list), and an
explicit `checkpoint.resume=PATH` is a complete checkpoint of this model's architecture (its
meta.json). Each failure is one `ConfigError` naming its key (a planted pickle: its file).
"""
from __future__ import annotations

import os

from ..checkpoint.safe_read import check_pickles
from ..checkpoint.store import check_resume_path, resume_source
from ..config.errors import require
from ..config.schema import Config
from ..data.paths import resolve_paths
from ..data.source_checks import check_sources
from ..hf.init_from import OURS, check_initial_weights


def check_inputs(cfg: Config, run_dir: str | None = None) -> None:
    """Raise ConfigError for the first input file that is missing or unusable. A run in
    `run_dir` that will resume does not read model.init_from (resume wins): its source may be
    gone, so it is not checked then."""
    if cfg.data.sources:  # a mixture: each entry's files, weights that get samples, tokenizer
        check_sources(cfg.data, bool(cfg.data.tokenizer_path or cfg.model.init_from))
    elif cfg.data.name == "files":  # missing files, directories, unknown types
        resolve_paths(list(cfg.data.paths))
    if cfg.model.init_from and not (run_dir and resume_source(run_dir, cfg.checkpoint.resume)):
        kind, where = check_initial_weights(cfg.model.init_from, cfg.model)
        if kind == OURS:  # a planted pickle: refused before Hydra writes .hydra/ (exit 1)
            check_pickles(where)
    resume = cfg.checkpoint.resume
    if resume in ("auto", "never"):
        return
    path = os.path.expanduser(resume)
    require(os.path.isdir(path), "checkpoint.resume",
            f"{resume} {'is not a directory' if os.path.exists(path) else 'does not exist'}"
            "; give auto, never or a checkpoints/step_* directory")
    check_resume_path(os.path.abspath(path), cfg.model)  # complete, this architecture


def check_run_dir(run_dir: str) -> None:
    """`hydra.run.dir` names a directory this process can create or use. ConfigError for an
    empty value (Hydra would use the current directory), a path that is a file, or one under a
    file or an unwritable directory — Hydra itself would fail with a traceback there."""
    key = "hydra.run.dir"
    require(bool(run_dir.strip()), key, "is empty; give a directory for the run (or drop the "
            "override to get the default runs/<model>-<data>-<hash>)")
    path = os.path.abspath(run_dir)
    if os.path.exists(path):
        require(os.path.isdir(path), key, f"{path} is a file, not a directory; choose another "
                "hydra.run.dir")
        require(os.access(path, os.W_OK | os.X_OK), key, f"{path} is not writable; choose "
                "another hydra.run.dir")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    require(os.path.isdir(parent), key, f"{path} cannot be created: {parent} is a file; choose "
            "another hydra.run.dir")
    require(os.access(parent, os.W_OK | os.X_OK), key, f"{path} cannot be created: {parent} is "
            "not writable; choose another hydra.run.dir")
