"""The baseline for scripts/bench.py: transformers' `LlamaForCausalLM` of the same shape.

    python scripts/bench_hf.py --model tiny --n-layers 4 --d-model 256 --n-heads 8 --n-kv-heads 2 \\
        --ffn-hidden 688 --vocab-size 8192 --seq-lens 8192,16384 --steps 1 --device cpu --gc on

Same command line, step (forward + backward + AdamW, batch 1, synthetic tokens), timing and
memory accounting as bench.py, and the same JSON line with "impl": "transformers". The HF model
runs as its users run it fast: SDPA attention, fp32 weights under bf16 autocast on GPU, fused
AdamW, and `--gc auto` = no gradient checkpointing where it fits, HF's gradient checkpointing
beyond (on CUDA, tried in that order; out of memory is reported like bench.py does).
FLOPs per token use the same formula as bench.py, so tokens/s and TFLOP/s compare directly.
Needs transformers (not a dependency of the package).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (sets the allocator config before torch starts)
import torch  # noqa: E402

from ulysses_train.model import model_config, padded_vocab  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gc", default="auto", choices=["auto", "on", "off"])
    known, rest = p.parse_known_args(argv)
    args = bench.parse_args(rest)
    args.gc = known.gc
    return args


def hf_model(mcfg, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=padded_vocab(mcfg.vocab_size), hidden_size=mcfg.d_model,
                         intermediate_size=mcfg.ffn_hidden, num_hidden_layers=mcfg.n_layers,
                         num_attention_heads=mcfg.n_heads, num_key_value_heads=mcfg.n_kv_heads,
                         rope_theta=mcfg.rope_theta, rms_norm_eps=mcfg.norm_eps,
                         tie_word_embeddings=mcfg.tie_embeddings, max_position_embeddings=1 << 21,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device)


def measure(args, seq_len: int, use_gc: bool) -> dict:
    device = torch.device(args.device)
    mcfg = model_config(args.model, **bench.model_overrides(args))
    torch.manual_seed(0)
    model = hf_model(mcfg, device)
    if use_gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    dtype = bench.resolve_dtype(args.dtype, device)
    ids = torch.randint(0, mcfg.vocab_size, (1, seq_len), device=device)
    setup = bench.rss_gib() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**30

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss  # HF shifts the labels itself
        loss.backward()
        optimizer.step()

    step_s = bench.run_steps(step, device, args.warmup, args.steps)
    row = bench.rate_row("transformers", args, mcfg, seq_len, step_s, setup, dtype)
    row["gradient_checkpointing"] = use_gc
    return row


def bench_one(args, seq_len: int) -> dict:
    choices = {"on": [True], "off": [False], "auto": [False, True]}[args.gc]
    attempts = []
    for use_gc in choices:
        try:
            row = measure(args, seq_len, use_gc)
            if attempts:
                row["attempts"] = attempts
            return row
        except torch.cuda.OutOfMemoryError:
            attempts.append(f"gradient_checkpointing={use_gc}: OOM")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"seq_len": seq_len, "impl": "transformers", "error": "out of memory", "attempts": attempts}


def main(argv=None) -> int:
    return bench.run_lengths(parse_args(argv), argv, __file__, bench_one)


if __name__ == "__main__":
    sys.exit(main())
