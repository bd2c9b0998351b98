"""`python -m ulysses_train.export CHECKPOINT OUT_DIR [--dtype bf16|fp32] [--max-shard-size 5GB]`
or `ulysses-export ...`: a checkpoint of ours as a Hugging Face model directory (hf/export.py).
Errors: one `error: ...` line; exit 2 for bad input, 1 for what could not be read or written.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from ..config.errors import ConfigError
from ..hf.export import DTYPES, export, parse_size


def main(argv=None) -> int:
    called = os.path.basename(sys.argv[0])  # the console script, or `-m`'s module path
    parser = argparse.ArgumentParser(prog=called if called == "ulysses-export"
                                     else "python -m ulysses_train.export",
                                     description="Export a checkpoint as a Hugging Face model dir")
    parser.add_argument("checkpoint", help="a run dir (its checkpoints/latest), its checkpoints/ or a step_* dir")
    parser.add_argument("out_dir", help="a new or empty directory")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16",
                        help="weights on disk (default bf16: half the size, rounded once from "
                             "the fp32 master weights; fp32: exactly as trained)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out_dir, args.dtype, parse_size(args.max_shard_size))
    except ConfigError as error:
        print(re.sub(r"\s*\n\s*", " ", f"error: {error}"), file=sys.stderr, flush=True)
        return error.exit_code
    return 0

