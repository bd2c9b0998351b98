"""Training-step benchmark of the single-device model: forward + backward + optimizer step.

    python scripts/bench.py --model tiny --n-layers 4 --d-model 256 --n-heads 8 --n-kv-heads 2 \\
        --ffn-hidden 688 --vocab-size 8192 --seq-lens 16384 --steps 1 --device cpu
    python scripts/bench.py --model tinyllama_1b --seq-lens 8192,32768,65536,131072   # one GPU

Prints one JSON line per sequence length: seq_len, tokens_per_s, model_tflops, mfu (null where
the device's peak is unknown), peak_mem_gib, plus the options used (ac, offload, mlp_chunk, ...).
Batch size 1, synthetic tokens. The model is built exactly as the trainer builds it
(`parallelize.build_model`: same checkpointing, tiling and compile passes), and the optimizer is
the trainer's AdamW (fused on CUDA), so the numbers are the trainer's step minus data loading.

Defaults are the long-context recipe: bf16 autocast on GPU (fp32 on CPU), tiled loss (no
full-vocab logits), and `--ac auto`, which picks per sequence length the cheapest choice that
fits: no checkpointing, then selective (keeps attention outputs), selective with a tiled MLP,
full, full with CPU offload — on CUDA by trying them in that order (an out-of-memory attempt
is reported in `attempts` and costs only its partial forward).

Memory: CUDA = allocator peak of the measured steps. CPU = peak RSS of the process, so every
sequence length runs in a fresh subprocess (RSS never shrinks); `setup_mem_gib` is the RSS
after the model and optimizer exist, so peak - setup is what the step itself needed.
FLOPs: `model.flops_per_token` (6 N + 6 L Hq D S per token, causal attention counted once,
recompute not counted). An MFU above 1 means a wrong formula or peak table; it is printed as
computed.

Imports only torch and this package (no hydra/wandb/datasets): runs on the GPU box's torch.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long-seq fragmentation
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ulysses_train.config.schema import Config
from ulysses_train.config.validate import TrainConfig  # noqa: E402
from ulysses_train.model import flops_per_token, model_config  # noqa: E402
from ulysses_train.model.presets import PRESETS  # noqa: E402
from ulysses_train.parallel import ParallelDims  # noqa: E402
from ulysses_train.parallel.parallelize import build_model, resolve_dtype  # noqa: E402
from ulysses_train.train.metrics import mfu_of, peak_flops  # noqa: E402
from ulysses_train.train.optim import build_optimizer  # noqa: E402

SHAPE_FLAGS = {"n_layers": int, "d_model": int, "n_heads": int, "n_kv_heads": int,
               "ffn_hidden": int, "vocab_size": int}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
# (activation_checkpointing, offload, tile the MLP) in the order --ac auto tries them.
AUTO_LADDER = [("none", False, False), ("selective", False, False), ("selective", False, True),
               ("full", False, True), ("full", True, True)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyllama_1b", choices=sorted(PRESETS))
    for name, kind in SHAPE_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"override model.{name}")
    p.add_argument("--seq-lens", default="8192", help="comma-separated sequence lengths")
    p.add_argument("--steps", type=int, default=3, help="measured steps per sequence length")
    p.add_argument("--warmup", type=int, default=None,
                   help="unmeasured steps first (default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--ac", default="auto", choices=["auto", "none", "full", "selective"])
    p.add_argument("--offload", action="store_true", help="checkpointed inputs to CPU (not with auto)")
    p.add_argument("--loss-chunk", type=int, default=4096, help="tokens per loss tile (0 = off)")
    p.add_argument("--mlp-chunk", type=int, default=4096,
                   help="tokens per MLP tile where tiling is chosen (0 = never tile)")
    p.add_argument("--tile-mlp", action="store_true", help="tile the MLP (not with --ac auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--sdpa-backend", default="auto", choices=sorted(SDPA_BACKENDS) + ["auto"],
                   help="force one SDPA kernel (diagnostics: which one runs fastest here)")
    p.add_argument("--extrapolate-layers", type=int, default=0,
                   help="also report memory and time scaled to this many layers (proxy runs)")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.warmup is None:
        args.warmup = 1 if args.device == "cuda" else 0
    return args


def model_overrides(args) -> dict:
    return {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}


def child_env() -> dict:
    """Environment of the fresh per-length processes on CPU.

    glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay in
    the heap and peak RSS records allocation history instead of live memory (the same run
    measured 11-56 KB/token of growth depending on chunk sizes). A fixed threshold makes every
    large tensor its own mapping, returned on free; bench_hf.py uses the same, so both
    implementations are measured alike."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_memory_probe(model, device):
    """Allocated bytes at the start of each block's forward (CUDA): their spacing is what one
    layer keeps for backward."""
    marks: list[int] = []
    if device.type == "cuda":
        for block in model.layers:
            block.register_forward_pre_hook(lambda m, a: marks.append(torch.cuda.memory_allocated(device)))
    return marks


def sdpa_backend(name: str):
    """Context forcing one SDPA kernel (auto: torch's own choice)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def run_steps(step_fn, device, warmup: int, steps: int) -> float:
    """Seconds per measured step (median-free: total / steps, after `warmup` steps)."""
    for _ in range(warmup):
        step_fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def measure(args, seq_len: int, ac: str, offload: bool, tile_mlp: bool) -> dict:
    device = torch.device(args.device)
    mcfg = model_config(args.model, **model_overrides(args))
    train = TrainConfig(precision=args.dtype, activation_checkpointing=ac, activation_offload=offload,
                        loss_chunk=args.loss_chunk, mlp_chunk=args.mlp_chunk if tile_mlp else 0,
                        compile=args.compile)
    cfg = Config(model=mcfg, train=train)
    dims = ParallelDims(tp=1, sp=1, dp=1, world_size=1, rank=0, device=device)
    torch.manual_seed(0)
    model = build_model(cfg, dims)
    optimizer = build_optimizer(model, cfg.optim)
    dtype = resolve_dtype(args.dtype, device)
    ids = torch.randint(0, mcfg.vocab_size, (1, seq_len + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]  # (1, S+1) -> (1, S) each
    pos = torch.arange(seq_len, device=device)[None]  # (1, S)
    marks = layer_memory_probe(model, device)
    setup = rss_gib() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**30

    def step():
        marks.clear()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss_sum, n = model(inputs, pos, labels)
        (loss_sum / n).backward()
        optimizer.step()

    with sdpa_backend(args.sdpa_backend):
        step_s = run_steps(step, device, args.warmup, args.steps)
    row = rate_row("ulysses_train", args, mcfg, seq_len, step_s, setup, dtype)
    row.update(ac=ac, offload=offload, mlp_chunk=train.mlp_chunk, loss_chunk=args.loss_chunk,
               compile=args.compile, sdpa_backend=args.sdpa_backend)
    if len(marks) > 1:
        add_layer_figures(row, marks, args, mcfg, step_s)
    return row


def rate_row(impl: str, args, mcfg, seq_len: int, step_s: float, setup: float, dtype) -> dict:
    """The JSON fields every implementation reports (same FLOPs formula for all)."""
    device = torch.device(args.device)
    tok_s = seq_len / step_s
    flops_tok = flops_per_token(mcfg, seq_len)
    peak = peak_flops(device)
    return {"seq_len": seq_len, "tokens_per_s": round(tok_s, 1),
            "model_tflops": round(flops_tok * tok_s / 1e12, 3),
            "mfu": None if peak is None else round(mfu_of(flops_tok, tok_s, peak), 4),
            "peak_mem_gib": round(peak_gib(device), 3), "setup_mem_gib": round(setup, 3),
            "step_s": round(step_s, 4), "impl": impl, "model": args.model,
            "n_layers": mcfg.n_layers, "dtype": str(dtype).replace("torch.", ""),
            "device": device_name(device)}


def add_layer_figures(row: dict, marks: list[int], args, mcfg, step_s: float) -> None:
    """GPU memory each further layer keeps, and (with --extrapolate-layers) the labelled
    estimate for a deeper model: peak + extra layers x per layer, time x the FLOPs ratio."""
    per_layer = (marks[-1] - marks[0]) / (len(marks) - 1) / 2**30
    row["per_layer_gib"] = round(per_layer, 3)
    if args.extrapolate_layers:
        seq, target = row["seq_len"], args.extrapolate_layers
        deep = model_config(args.model, **{**model_overrides(args), "n_layers": target})
        row["extrapolated"] = {  # estimates, not measurements
            "n_layers": target,
            "peak_mem_gib": round(row["peak_mem_gib"] + (target - mcfg.n_layers) * per_layer, 2),
            "step_s": round(step_s * flops_per_token(deep, seq) / flops_per_token(mcfg, seq), 1)}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def ladder(args) -> list[tuple[str, bool, bool]]:
    if args.ac != "auto":
        return [(args.ac, args.offload, args.tile_mlp)]
    # CPU: no allocator to try against; the least-memory choice without offload (pointless here).
    return AUTO_LADDER if args.device == "cuda" else [("full", False, True)]


def bench_one(args, seq_len: int) -> dict:
    """The first choice of the ladder that fits; failed attempts are listed in the row."""
    attempts = []
    for ac, offload, tile in ladder(args):
        try:
            row = measure(args, seq_len, ac, offload, tile)
            if attempts:
                row["attempts"] = attempts
            return row
        except torch.cuda.OutOfMemoryError:
            attempts.append(f"{ac}{'+offload' if offload else ''}{'+tiled_mlp' if tile else ''}: OOM")
        except Exception as exc:  # noqa: BLE001 — one length failing must not hide the others
            return {"seq_len": seq_len, "impl": "ulysses_train", "ac": ac,
                    "error": f"{type(exc).__name__}: {exc}"[:500], "attempts": attempts}
        # Outside the except block: its traceback no longer pins the failed attempt's tensors.
        gc.collect()
        torch.cuda.empty_cache()
    return {"seq_len": seq_len, "impl": "ulysses_train", "error": "out of memory", "attempts": attempts}


def run_lengths(args, argv, script: str, one) -> int:
    """Print `one(args, seq)` as a JSON line per length. On CPU with several lengths each runs in
    a fresh process of `script` (peak RSS only grows), each printing its own line."""
    if args.device == "cpu" and len(args.seq_lens) > 1 and not args.in_process:
        base = list(argv if argv is not None else sys.argv[1:])
        for seq in args.seq_lens:
            rc = subprocess.call([sys.executable, os.path.abspath(script), *base,
                                  "--seq-lens", str(seq), "--in-process"], env=child_env())
            if rc != 0:
                return rc
        return 0
    for seq in args.seq_lens:
        print(json.dumps(one(args, seq)), flush=True)
    return 0


def main(argv=None) -> int:
    return run_lengths(parse_args(argv), argv, __file__, bench_one)


if __name__ == "__main__":
    sys.exit(main())
