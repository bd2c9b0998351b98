"""Host bytes that activation offload actually parks per layer, measured on CPU.

    python scripts/offload_bytes.py --seq-len 4096 --precision bf16   # tinyllama_1b width

Builds the model as the trainer does for `train.activation_checkpointing=full
train.activation_offload=true` (`ActivationOffload` with its default 1 MiB threshold), runs one
forward of batch 1 under the given precision (bf16 = CPU autocast) with n1 and n2 layers, and
prints one JSON line: the bytes parked (`ActivationOffload.parked_bytes`: each parked tensor
once) for both depths, their difference per layer — what each further layer costs on the host —
the dtypes parked, and S x d x element size for comparison. pin_memory needs CUDA, so the
copies are plain CPU tensors here; their number and size are what a GPU run pins.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ulysses_train.config.validate import Config  # noqa: E402
from ulysses_train.model.presets import model_config  # noqa: E402
from ulysses_train.parallel import ParallelDims  # noqa: E402
from ulysses_train.parallel.activations import ActivationOffload  # noqa: E402
from ulysses_train.parallel.parallelize import build_model  # noqa: E402


def parked(cfg: Config, n_layers: int, seq: int, dtype: torch.dtype) -> tuple[int, list[str]]:
    """(bytes parked by one forward, sorted 'shape dtype' of the parked tensors)."""
    cfg.model.n_layers = n_layers
    dims = ParallelDims(tp=1, sp=1, dp=1, world_size=1, rank=0, device=torch.device("cpu"))
    model = build_model(cfg, dims)
    offload = ActivationOffload()  # the trainer's threshold
    offload.attach(model)
    ids = torch.randint(0, cfg.model.vocab_size, (1, seq))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        model(ids, torch.arange(seq)[None], ids)
    kinds = sorted({f"{tuple(p.cpu.shape)} {str(p.cpu.dtype)[6:]}" for p in offload._handles})
    return offload.parked_bytes, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tinyllama_1b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--layers", default="1,3", help="two depths n1,n2")
    args = ap.parse_args()
    cfg = Config()
    cfg.model = model_config(args.model)
    cfg.data.seq_len = args.seq_len
    cfg.train.activation_checkpointing, cfg.train.loss_chunk = "full", 1024  # tiled, as trained
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    n1, n2 = (int(n) for n in args.layers.split(","))
    b1, kinds = parked(cfg, n1, args.seq_len, dtype)
    b2, _ = parked(cfg, n2, args.seq_len, dtype)
    d = cfg.model.d_model
    print(json.dumps({"model": args.model, "seq_len": args.seq_len, "precision": args.precision,
                      "d_model": d, f"parked_bytes_{n1}_layers": b1,
                      f"parked_bytes_{n2}_layers": b2, "per_layer_bytes": (b2 - b1) // (n2 - n1),
                      "S_x_d_x_elem": args.seq_len * d * dtype.itemsize, "parked": kinds}))


if __name__ == "__main__":
    main()
