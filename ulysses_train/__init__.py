"""ulysses_train: long-sequence GPT pretraining with Ulysses sequence parallelism.

Importing the package is cheap: it pulls in torch and nothing else heavy (no hydra, omegaconf,
datasets, wandb or sentencepiece — those are imported where they are used).

An older torch fails here, at import, with one line naming the version needed: the oldest torch
whose APIs the package uses is 2.8 (FSDP2's `set_gradient_divide_factor`; the evidence for every
API is listed in pyproject.toml).
"""
import re

import torch

__version__ = "0.1.0"
MIN_TORCH = (2, 8)  # keep in step with pyproject.toml's `torch>=`


def check_torch(version: str) -> None:
    """Raise ImportError (one line, with the fix) if torch `version` is older than MIN_TORCH.

    `version` is `torch.__version__`, e.g. "2.8.0+cu128" or "2.9.0a0+git1234"; a pre-release of
    the minimum counts as the minimum (its APIs are those of the release branch).
    """
    match = re.match(r"(\d+)\.(\d+)", str(version))
    found = tuple(int(part) for part in match.groups()) if match else (0, 0)
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"ulysses_train needs torch>={need}, found {version}: "
                          f"pip install 'torch>={need}'")


check_torch(torch.__version__)
