"""What `scripts/eval.py` runs: load a checkpoint into the training layout, evaluate, write
`eval.json` and `eval.png` into the run dir (rank 0, atomically).

`eval.checkpoint` is one of our run dirs (its `checkpoints/latest`), a `checkpoints/step_N` dir,
or a Hugging Face model dir. For our checkpoints the architecture is the checkpoint's own
(meta.json "model"); a `model.<key>=...` given on the command line wins (e.g. RoPE scaling to
evaluate at a longer context than trained).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from .. import checkpoint  # noqa: F401 (filters DCP's one-process warning, as saving does)
from ..checkpoint_files import CheckpointDir, is_complete, read_meta
from ..config import Config, ModelConfig, padded_vocab, validate
from ..errors import ConfigError
from ..model_build import build_model, resolve_dtype
from ..parallel import ParallelDims
from . import evaluate_model

RESULT, PLOT = "eval.json", "eval.png"


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(kind, directory): ("ours", a complete step dir) or ("hf", a dir with config.json).
    Raises ConfigError naming eval.checkpoint otherwise."""
    where = os.path.abspath(os.path.expanduser(path))
    if not path or not os.path.isdir(where):
        raise ConfigError("eval.checkpoint", f"{path or '(empty)'} is not a directory; give a run "
                          "dir, a checkpoints/step_N dir or a Hugging Face model dir")
    if os.path.isfile(os.path.join(where, "config.json")):
        return "hf", where
    checkpoints = os.path.join(where, "checkpoints")
    if os.path.isdir(checkpoints):
        latest = CheckpointDir(checkpoints, log=lambda _: None).latest_name()
        if latest is None:
            raise ConfigError("eval.checkpoint", f"{path} has no checkpoints/latest; give a "
                              "checkpoints/step_N dir")
        where = os.path.join(checkpoints, latest)
    if not is_complete(where):
        raise ConfigError("eval.checkpoint", f"{where} is not a complete checkpoint (no "
                          "meta.json/manifest, or a partial save)")
    return "ours", where


def model_config(cfg: Config, path: str, explicit: set[str]) -> ModelConfig:
    """The checkpoint's ModelConfig (meta.json), with the `explicit` model keys from `cfg`."""
    saved = read_meta(path)["model"]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    for key in explicit:
        setattr(model, key, getattr(cfg.model, key))
    return model


def _load_own_checkpoint(model: torch.nn.Module, path: str, distributed: bool) -> str:
    """Weights only from our DCP checkpoint `path` into the built (possibly sharded) model.

    Replaced by init_from.load_initial_weights at merge (issue 11, hf-load), which also reads
    Hugging Face dirs. DCP reads each rank's own shards straight into its (DTensor) parameters.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=path, no_dist=not distributed)
    set_model_state_dict(model, state["model"])
    return f"weights of {path} (step {read_meta(path)['step']})"


def atomic_write(path: str, write) -> None:
    """write(tmp_path), then rename over `path`: a reader never sees a torn file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_results(result: dict, run_dir: str) -> tuple[str, str]:
    """eval.json and eval.png into run_dir, each atomically; returns their paths."""
    from .plot import write_png

    os.makedirs(run_dir, exist_ok=True)
    json_path, png_path = os.path.join(run_dir, RESULT), os.path.join(run_dir, PLOT)

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(json.dumps(result, indent=1, allow_nan=False) + "\n")

    atomic_write(json_path, dump)
    atomic_write(png_path, lambda tmp: write_png(result, tmp))
    return json_path, png_path


def run(cfg: Config, run_dir: str, explicit_model_keys: set[str]) -> int:
    """Evaluate `cfg.eval.checkpoint` in the layout of `cfg.parallel`; return the exit code."""
    kind, path = resolve_checkpoint(cfg.eval.checkpoint)
    if kind == "hf":  # the architecture comes from model.init_from's config side at merge
        raise ConfigError("eval.checkpoint", f"{path} is a Hugging Face dir; this build reads "
                          "only our checkpoints (run dir or step_N)")
    cfg = dataclasses.replace(cfg, model=model_config(cfg, path, explicit_model_keys))
    dims = ParallelDims.from_env(cfg.parallel)
    validate(cfg, dims.world_size)  # the checkpoint's model with this layout
    dims.init_process_group()
    try:
        dims.build_mesh()
        return _evaluate(cfg, run_dir, dims, path)
    finally:
        if dims.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _evaluate(cfg: Config, run_dir: str, dims: ParallelDims, path: str) -> int:
    from ..data import build_data

    say = print if dims.is_main else (lambda _: None)
    t0 = time.perf_counter()
    data = build_data(cfg.data, seed=cfg.train.seed,
                      global_batch_size=cfg.train.global_batch_size,
                      model_vocab_size=padded_vocab(cfg.model.vocab_size), log=say,
                      is_main=dims.is_main)
    model = build_model(cfg, dims)
    say(f"eval: {_load_own_checkpoint(model, path, dims.distributed)} | layout dp={dims.dp} "
        f"sp={dims.sp} tp={dims.tp}")
    dtype = resolve_dtype(cfg.train.precision, dims.device)
    result = evaluate_model(model, cfg, dims, data, dtype, log=say)
    result = {"checkpoint": path, "seq_len": cfg.data.seq_len, **result,
              "seconds": round(time.perf_counter() - t0, 1)}
    if dims.is_main:
        json_path, png_path = write_results(result, run_dir)
        say(f"eval: wrote {json_path} and {png_path}")
    return 0
