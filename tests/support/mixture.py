"""Two tiny text corpora of different document lengths and mixture configs over them
(tests/data/test_mixture.py, test_shaping.py, tests/train/test_trainer_mixture.py)."""
from __future__ import annotations

import json
import random

from ulysses_train.config.schema import DataConfig, SourceConfig

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()


def write_corpora(root) -> tuple[str, str]:
    """short.jsonl: 300 documents of 3-30 words; long.jsonl: 120 of 40-300 words."""
    rng = random.Random(0)
    paths = []
    for name, n, lo, hi in (("short", 300, 3, 30), ("long", 120, 40, 300)):
        path = root / f"{name}.jsonl"
        paths.append(str(path))
        if path.exists():  # written once: a rewrite would change the cache key
            continue
        with open(path, "w") as f:
            for _ in range(n):
                words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
                f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return paths[0], paths[1]


def mixture_cfg(root, weights=(0.25, 0.75), seq_len=64, val_fraction=0.1, **long_keys):
    """A DataConfig mixing short (weight[0]) and long (weight[1], with `long_keys`)."""
    short, long = write_corpora(root)
    return DataConfig(name="files", seq_len=seq_len, val_fraction=val_fraction,
                      cache_dir=str(root / "cache"), tokenizer_sample_bytes=100_000,
                      sources=[SourceConfig(name="short", kind="files", paths=[short],
                                            weight=weights[0]),
                               SourceConfig(name="long", kind="files", paths=[long],
                                            weight=weights[1], **long_keys)])
