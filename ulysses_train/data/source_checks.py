"""What can be checked of a mixture (`data.sources`) before anything is read or built.

The entry points' pre-check (cli/checks.py) and `build_mixture` both run `check_sources`, so a
missing file, a damaged Megatron header, a weight too small for a block, or a tokenizer the
sources need and do not have is one `error:` line before the run dir has a single cache file.
`ignored_keys` names the one-corpus keys a mixture replaces, which would otherwise be silently
ignored (docs/data.md).
"""
from __future__ import annotations

from ..config.errors import ConfigError
from ..config.schema import DataConfig
from .mixture import BLOCK, block_counts
from .paths import resolve_paths
from .pretokenized import check_paths

TEXT_KINDS = ("stdlib", "files", "hf")
_REPLACED = ("paths", "hf_name", "hf_config", "hf_split", "text_field", "max_docs")


def check_sources(cfg: DataConfig, has_tokenizer: bool) -> None:
    """Raise ConfigError for the first problem of `cfg.sources` knowable without reading a
    token: every input exists (text files of a known type, both files of a Megatron dataset
    and its index header), every weight gets samples in a block (mixture.py), and the ids have
    a tokenizer where they need one (`has_tokenizer`: data.tokenizer_path or model.init_from
    is set). Names the entry's key, e.g. data.sources[1].paths."""
    kinds = {s.kind for s in cfg.sources}
    for i, src in enumerate(cfg.sources):
        if src.kind == "files":
            resolve_paths(list(src.paths), key=f"data.sources[{i}].paths")
        elif src.kind in ("megatron", "tokens"):
            check_paths(src, f"data.sources[{i}]")
        flat = src.kind == "tokens" and any(str(p).endswith((".npy", ".bin")) for p in src.paths)
        if flat and src.eos_id == -1 and not has_tokenizer and not kinds & set(TEXT_KINDS):
            raise ConfigError(f"data.sources[{i}].eos_id", "is -1 (the tokenizer's EOS), but "
                              "no tokenizer is given; set the id that ends each document, or "
                              "data.tokenizer_path")
    if not has_tokenizer and kinds & set(TEXT_KINDS) and kinds - set(TEXT_KINDS):
        raise ConfigError("data.tokenizer_path", "a mixture of text and pre-tokenized sources "
                          "needs the tokenizer the pre-tokenized ids were made with; set "
                          "data.tokenizer_path to it")
    counts = block_counts([s.weight for s in cfg.sources])
    for i, n in enumerate(counts):
        if n == 0:
            raise ConfigError(f"data.sources[{i}].weight", f"{cfg.sources[i].weight:g} is "
                              f"below 1/{BLOCK} of the total weight, so the source would get "
                              "no sample; raise it or drop the source")


def ignored_keys(cfg: DataConfig) -> list[str]:
    """One note per one-corpus key set beside `data.sources`, which replaces it."""
    default = DataConfig()
    changed = [k for k in _REPLACED if getattr(cfg, k) != getattr(default, k)]
    return [f"data.{k} is ignored: data.sources replaces the one corpus it describes (set "
            f"{k} in each entry instead)" for k in changed]
