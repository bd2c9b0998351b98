"""Peak anonymous memory per rank while `model.init_from` loads a Hugging Face directory.

Usage (from the repository root; docs/benchmarks.md has the measured figures):
    python scripts/bench_init_from.py [--dir DIR] [--layouts 1:0,4:3]
Builds DIR (default: a temp dir) with transformers' `save_pretrained`: a random 112M-parameter
Llama (d 768, 10 layers, 12 heads / 4 kv heads, ffn 2048, vocab 32000, untied, bf16 on disk,
sharded with an index), unless DIR already holds one. Then, for each layout `ranks:zero`, runs
this script under torchrun (gloo, CPU): every rank builds the model as the trainer does
(`parallelize.build_model`, so it owns only its shards at zero=3) and loads DIR into it under
`rss.AnonPeak`. Prints one JSON line per rank: RssAnon before the load, its peak during the
load, what the load added (peak - before), RSS after (mapped safetensors pages included), time.

glibc's MALLOC_MMAP_THRESHOLD_ is fixed at 64 KiB in the workers, so a freed buffer goes back
to the kernel at once and RssAnon follows live memory (by default glibc raises the threshold
after large frees and keeps such memory for reuse, which hides new allocations from RssAnon).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHAPE = dict(hidden_size=768, num_hidden_layers=10, num_attention_heads=12, num_key_value_heads=4,
             intermediate_size=2048, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=2048, tie_word_embeddings=False)


def make_hf_dir(path: str) -> None:
    """A random Llama of SHAPE in `path` (bf16 safetensors, 100 MB shards + index)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100MB")


def model_config(path: str):
    """Our ModelConfig for the HF dir (architecture keys; config.json as transformers 5 writes
    it). The trainer gets this from model.init_from's config side."""
    from ulysses_train.config.schema import ModelConfig

    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    theta = c.get("rope_theta") or c.get("rope_parameters", {}).get("rope_theta", 10000.0)
    return ModelConfig(name="hf", n_layers=c["num_hidden_layers"], d_model=c["hidden_size"],
                       n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"],
                       ffn_hidden=c["intermediate_size"], vocab_size=c["vocab_size"],
                       rope_theta=float(theta), tie_embeddings=c["tie_word_embeddings"],
                       norm_eps=c["rms_norm_eps"])


def worker(path: str, zero: int) -> None:
    """One torchrun rank: build the model for dp=world at `zero`, load `path`, report."""
    from ulysses_train.config.schema import Config
    from ulysses_train.hf.init_from import load_initial_weights
    from ulysses_train.parallel import ParallelDims
    from ulysses_train.parallel.parallelize import build_model
    from ulysses_train.utils.rss import AnonPeak

    cfg = Config()
    cfg.model, cfg.parallel.zero, cfg.train.precision = model_config(path), zero, "fp32"
    dims = ParallelDims.from_env(cfg.parallel)
    dims.init_process_group()
    dims.build_mesh()
    model = build_model(cfg, dims)
    start = time.perf_counter()
    with AnonPeak() as peak:
        load_initial_weights(model, path, cfg.model, dims)
    seconds = time.perf_counter() - start
    n = sum(p.numel() for p in model.parameters())
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    mb = 1e6
    print(json.dumps({"ranks": dims.world_size, "zero": zero, "rank": dims.rank,
                      "params_M": round(n / 1e6, 1), "fp32_model_MB": round(4 * n / mb),
                      "anon_before_MB": round(peak.before / mb), "anon_peak_MB": round(peak.peak / mb),
                      "load_added_MB": round(peak.added / mb, 1), "rss_after_MB": round(rss / mb),
                      "load_s": round(seconds, 2)}), flush=True)
    if dims.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="", help="HF model dir (built when it has none)")
    parser.add_argument("--layouts", default="1:0,4:3", help="ranks:zero, comma-separated")
    parser.add_argument("--worker", nargs=2, metavar=("DIR", "ZERO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]))
    path = args.dir or tempfile.mkdtemp(prefix="bench_init_from_")
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_hf_dir(path)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    for layout in args.layouts.split(","):
        ranks, zero = layout.split(":")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", os.path.abspath(__file__), "--worker", path, zero]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)


if __name__ == "__main__":
    main()
