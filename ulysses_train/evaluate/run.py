"""What `scripts/eval.py` (cli/eval.py) runs: load a checkpoint into the training layout, evaluate, write
`eval.json` and `eval.png` into the run dir (rank 0, atomically).

`eval.checkpoint` is one of our run dirs (its `checkpoints/latest`), a `checkpoints/step_N` dir,
or a Hugging Face model dir. It is read exactly as `model.init_from` is in training (one path:
hf/config.py decides `model.*`, hf/init_from.py loads the weights into this layout, the tokenizer
defaults to the checkpoint's): scripts/eval.py sets `model.init_from` to it. For our
checkpoints a `model.rope_*` given on the command line wins (e.g. RoPE scaling to evaluate
beyond the trained context); architecture keys must agree.
"""
from __future__ import annotations

import json
import os
import time

import torch

from ..config.errors import ConfigError
from ..config.schema import Config
from ..hf.config import rope_notes
from ..hf.init_from import load_initial_weights, resolve
from ..model.precision import resolve_dtype
from ..parallel import ParallelDims
from ..parallel.parallelize import build_model
from ..utils.atomic import atomic_write
from . import evaluate_model
from .suite import passkey_plan

RESULT, PLOT = "eval.json", "eval.png"


def write_results(result: dict, run_dir: str) -> tuple[str, str]:
    """eval.json and eval.png into run_dir, each atomically; returns their paths."""
    from .plot import write_png

    os.makedirs(run_dir, exist_ok=True)
    json_path, png_path = os.path.join(run_dir, RESULT), os.path.join(run_dir, PLOT)

    atomic_write(json_path, json.dumps(result, indent=1, allow_nan=False) + "\n")
    atomic_write(png_path, lambda tmp: write_png(result, tmp))
    return json_path, png_path


def rope_settings(m) -> dict:
    """The RoPE the model was evaluated with (eval.json "rope"): an override of the checkpoint's
    (`model.rope_theta=`, a larger `model.rope_factor`) changes the result, so it is recorded."""
    keys = ["theta", "scaling"] + (["factor", "original_seq_len"] if m.rope_scaling != "none"
                                   else [])
    return {k: getattr(m, "rope_" + k) for k in keys}


def run(cfg: Config, run_dir: str) -> int:
    """Evaluate `cfg.model.init_from` (= eval.checkpoint) in the layout of `cfg.parallel`;
    return the exit code. `cfg.model` is already the checkpoint's (cli.apply_init_from)."""
    dims = ParallelDims.from_env(cfg.parallel)
    dims.init_process_group()
    try:
        dims.build_mesh()
        return _evaluate(cfg, run_dir, dims)
    finally:
        if dims.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _evaluate(cfg: Config, run_dir: str, dims: ParallelDims) -> int:
    from ..data import build_data

    say = print if dims.is_main else (lambda _: None)
    t0 = time.perf_counter()
    data = build_data(cfg.data, seed=cfg.train.seed,
                      global_batch_size=cfg.train.global_batch_size,
                      model_vocab_size=cfg.model.vocab_size, log=say,
                      is_main=dims.is_main, init_from=cfg.model.init_from,
                      max_tokenizer_vocab=cfg.model.vocab_size)
    passkey_plan(cfg, dims, data)  # bad eval lengths fail here, before any weights are read
    model = build_model(cfg, dims)
    try:  # the load verifies our checkpoint's hashes: a damaged one fails here
        loaded = load_initial_weights(model, cfg.model.init_from, cfg.model, dims)
    except ConfigError as error:  # the user named eval.checkpoint: say that key
        if error.key != "model.init_from":
            raise
        raise type(error)("eval.checkpoint", error.message) from None  # keeps its exit code
    say(f"eval: {loaded} | layout dp={dims.dp} sp={dims.sp} (ring={dims.ring}) tp={dims.tp}")
    for note in rope_notes(cfg.model.init_from, cfg.model):  # a RoPE override, as training says
        say(f"eval: {note}")
    dtype = resolve_dtype(cfg.train.precision, dims.device)
    result = evaluate_model(model, cfg, dims, data, dtype, log=say)
    _, source = resolve(cfg.model.init_from)  # a run dir: the step it read; an HF dir: itself
    result = {"checkpoint": os.path.abspath(source), "seq_len": cfg.data.seq_len,
              "rope": rope_settings(cfg.model), **result,
              "seconds": round(time.perf_counter() - t0, 1)}
    if dims.is_main:
        json_path, png_path = write_results(result, run_dir)
        say(f"eval: wrote {json_path} and {png_path}")
    if dims.distributed:
        # Every rank leaves together: a rank that tore its process group down while rank 0 was
        # still drawing eval.png aborted in gloo's teardown ("terminate called without an active
        # exception", SIGABRT, seen on a loaded 2-core machine), failing a finished evaluation.
        torch.distributed.barrier()
    return 0
