"""`build_mixture`: a `DataSource` over several weighted sources (`data.sources`, docs/data.md).

Each source is made on its own (so changing one weight rebuilds nothing):
- text (`stdlib | files | hf`): its own token cache (text_source.py), train/val split by
  document content as for one corpus;
- pre-tokenized (`megatron | tokens`): its files read in place (pretokenized.py), split into
  train/val by a hash of the document index (shaping.unit_hash).
Then each split is shaped (shaping.py: length filters, long-document upsampling on train),
packed into windows (`PackedTokens`, over `DocumentSpans` unless the split is a cache file used
whole), and the splits of all sources are mixed by weight (mixture.py). The tokenizer is shared:
the given one (data.tokenizer_path / model.init_from), else one trained on the first text
source; pre-tokenized ids must come from the tokenizer the text sources use.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config.errors import ConfigError
from ..config.schema import DataConfig, SourceConfig
from .build import SPLITS, assign_val
from .cache import tokenizer_files
from .datasource import DataSource
from .mixture import MixtureStream
from .packing import PackedTokens
from .pretokenized import open_token_documents
from .shaping import copies, keep_by_length, occurrences, unit_hash
from .source_checks import TEXT_KINDS, check_sources, ignored_keys
from .spans import DocumentSpans
from .text_source import (
    cache_root,
    cache_tokenizer_identity,
    count_str,
    load_text_splits,
    offsets_digest,
    text_cache,
)
from .tokenizer import MODEL_FILES, Tokenizer, open_tokenizer


@dataclass
class SourceSplits:
    """One source's documents per split before shaping: token arrays (`parts`), and per
    document its start in their concatenation and its length (int64 `(n,)` each)."""

    parts: dict[str, list] = field(default_factory=dict)
    starts: dict[str, np.ndarray] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    label: str = ""
    cache: str = ""  # the text cache's directory name, "" for pre-tokenized files


def source_name(src: SourceConfig, index: int) -> str:
    """The name metrics use for `data.sources[index]`: its own, else kind + index."""
    return src.name or f"{src.kind}{index}"


# The salts of shaping.unit_hash: constants, so a source's split and repetitions depend on its
# documents and the seed, never on its name (the same files in two entries split alike).
VAL_SALT = 0x5EED_0F_5A11
UPSAMPLE_SALT = 0x5EED_0F_0C5


def _text_config(cfg: DataConfig, src: SourceConfig) -> DataConfig:
    """The one-corpus DataConfig a text source is cached as (shared keys from `cfg`)."""
    return dataclasses.replace(cfg, name=src.kind, paths=list(src.paths),
                               text_field=src.text_field, hf_name=src.hf_name,
                               hf_config=src.hf_config, hf_split=src.hf_split,
                               max_docs=src.max_docs, sources=[])


def _text_splits(cfg: DataConfig, index: int, src: SourceConfig, tok: Tokenizer | None,
                 limit: int, log, is_main: bool) -> tuple[SourceSplits, Path, dict]:
    one = _text_config(cfg, src)
    try:
        path, meta = text_cache(one, tok, limit, log=log, is_main=is_main)
    except ConfigError as e:  # the one-corpus keys it names are this entry's own
        field_name = e.key.removeprefix("data.")
        field_name = "kind" if field_name == "name" else field_name
        if e.key.startswith("data.") and hasattr(src, field_name):
            key = f"data.sources[{index}].{field_name}"
            raise ConfigError(key, e.message.replace(e.key, key)) from None
        raise
    out = SourceSplits(label=meta["label"], cache=path.name)  # label: e.g. "files"
    for split, ids, offsets in load_text_splits(path, meta, one):
        out.parts[split] = [ids]
        out.starts[split] = offsets[:-1].astype(np.int64)
        out.lengths[split] = np.diff(offsets).astype(np.int64)
    return out, path, meta


def _token_splits(cfg: DataConfig, i: int, src: SourceConfig, name: str, eos: int | None,
                  limit: int, log, is_main: bool) -> SourceSplits:
    docs = open_token_documents(src, where=f"data.sources[{i}]", vocab_limit=limit,
                                eos_id=eos, cache_root=cache_root(cfg), log=log, is_main=is_main)
    sizes = np.array([len(t) for t, _ in docs.parts], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(sizes)])[:-1]  # where each part starts in the whole
    starts = np.concatenate([b + o[:-1] for b, (_, o) in zip(base, docs.parts)]).astype(np.int64)
    lengths = np.concatenate([np.diff(o) for _, o in docs.parts]).astype(np.int64)
    is_val = assign_val(unit_hash(np.arange(len(starts)), VAL_SALT), lengths > 0,
                        cfg.val_fraction)
    out = SourceSplits(label=docs.label)
    for split, mask in (("train", ~is_val & (lengths > 0)), ("val", is_val)):
        if split == "val" and cfg.val_fraction == 0:
            continue
        out.parts[split] = [t for t, _ in docs.parts]
        out.starts[split], out.lengths[split] = starts[mask], lengths[mask]
    return out


def _stream(splits: SourceSplits, split: str, src: SourceConfig, name: str, where: str,
            cfg: DataConfig, seed: int) -> tuple[PackedTokens, np.ndarray]:
    """(windows, document lengths in stream order) of one split of one source, shaped."""
    starts, lengths = splits.starts[split], splits.lengths[split]
    keep = keep_by_length(lengths, src.min_tokens, src.max_tokens)
    counts = np.ones(int(keep.sum()), dtype=np.int64)
    if split == "train":
        long_tokens = src.long_tokens or cfg.seq_len
        counts = copies(lengths[keep], src.length_upsample, long_tokens, UPSAMPLE_SALT ^ seed,
                        index=np.flatnonzero(keep))
    order = occurrences(np.flatnonzero(keep), counts)
    if len(order) == 0 or lengths[order].sum() <= cfg.seq_len:
        raise _too_little(src, name, where, split, order, lengths, cfg)
    whole = len(splits.parts[split]) == 1 and len(order) == len(starts) and \
        bool(np.all(order == np.arange(len(starts)))) and \
        int(starts[0]) == 0 and int(lengths.sum()) == len(splits.parts[split][0])
    if whole:  # the cache's split file as it is: exactly the one-corpus windows
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = splits.parts[split][0]
    else:
        tokens = DocumentSpans(splits.parts[split], starts[order], lengths[order])
        offsets = tokens.offsets
    # seeded like one corpus: a one-source mixture serves exactly that corpus's windows
    return PackedTokens(tokens, offsets, cfg.seq_len, seed=seed, split=split), lengths[order]


def _prefixed(log, name: str):
    """`log` with the source's name after "data: " (warnings keep their "warning: " first)."""
    def say(line: str) -> None:
        for head in ("warning: data: ", "data: "):
            if line.startswith(head):
                line = f"{head}{name}: {line[len(head):]}"
                break
        log(line)
    return say


def _too_little(src: SourceConfig, name: str, where: str, split: str, order: np.ndarray,
                lengths: np.ndarray, cfg: DataConfig) -> ConfigError:
    """The error for a split with less than one window of tokens, naming what to change."""
    have = f"source {name!r} leaves {int(lengths[order].sum())} {split} tokens in {len(order)} " \
           f"documents, fewer than one window of data.seq_len={cfg.seq_len}"
    if split == "val":
        return ConfigError("data.val_fraction", f"{have}; raise data.val_fraction (it is "
                           f"{cfg.val_fraction:g}) or set it to 0 (no validation)")
    key = "max_tokens" if src.max_tokens and not src.min_tokens else \
        "min_tokens" if src.min_tokens else "paths"
    return ConfigError(f"{where}.{key}", f"{have}; "
                       + ("loosen its min_tokens/max_tokens" if key != "paths"
                          else "give it more documents"))


def _tokenizer(cfg: DataConfig, given: Tokenizer | None, limit: int, log,
               is_main: bool) -> tuple[Tokenizer | None, dict]:
    """The mixture's shared tokenizer: the given one, else the one trained for the first text
    source's cache (None when every source is pre-tokenized); and {index: that source's
    `_text_splits`} when one was trained, so it is not opened twice."""
    kinds = [s.kind for s in cfg.sources]  # (check_sources refused text + ids without one)
    first_text = next((i for i, k in enumerate(kinds) if k in TEXT_KINDS), None)
    if given is not None or first_text is None:
        return given, {}
    src = cfg.sources[first_text]
    built = _text_splits(cfg, first_text, src, None, limit,
                         _prefixed(log, source_name(src, first_text)), is_main)
    model = next(n for n in tokenizer_files(built[2]) if n in MODEL_FILES)
    return open_tokenizer(str(built[1] / model)), {first_text: built}


def build_mixture(cfg: DataConfig, *, seed: int, global_batch_size: int,
                  given: Tokenizer | None, limit: int, log, is_main: bool) -> DataSource:
    """The DataSource of `cfg.sources` (see the module docstring). `given`: the tokenizer of
    data.tokenizer_path / model.init_from, or None; `limit`: ids must be below it. Raises
    ConfigError (exit 2) for bad input, before anything is built where it can tell."""
    check_sources(cfg, has_tokenizer=given is not None)
    for note in ignored_keys(cfg):
        log(f"warning: data: {note}")
    tok, trained = _tokenizer(cfg, given, limit, log, is_main)
    names = [source_name(s, i) for i, s in enumerate(cfg.sources)]
    per_split: dict[str, list] = {s: [] for s in SPLITS}
    lengths, identity_tokens, caches, labels = {}, {}, [], []
    first_meta = None
    for i, (src, name) in enumerate(zip(cfg.sources, names)):
        log_i = _prefixed(log, name)  # "data: books: cached ..." says which source
        if src.kind in TEXT_KINDS:
            splits, path, meta = trained.get(i) or _text_splits(cfg, i, src, tok, limit, log_i,
                                                                 is_main)
            first_meta = first_meta or (path, meta)
        else:
            eos = src.eos_id if src.eos_id >= 0 else (tok.eos_id if tok else None)
            splits = _token_splits(cfg, i, src, name, eos, limit, log_i, is_main)
        caches.append(splits.cache)
        for split in splits.parts:
            stream, order_lengths = _stream(splits, split, src, name, f"data.sources[{i}]",
                                            cfg, seed)
            per_split[split].append(stream)
            identity_tokens[f"{name}/{split}"] = [len(order_lengths), int(order_lengths.sum()),
                                                  offsets_digest(stream.doc_offsets)]
            if split == "train":
                lengths[name] = order_lengths
                kept = keep_by_length(splits.lengths["train"], src.min_tokens, src.max_tokens)
                if src.length_upsample > 1 and len(order_lengths) == int(kept.sum()):
                    log_i(f"warning: data: length_upsample={src.length_upsample:g} repeats no "
                          f"document: none has long_tokens={src.long_tokens or cfg.seq_len} "
                          "tokens or more")
        docs = lengths[name]
        labels.append(f"{name} (weight {src.weight:g}, {splits.label}): {count_str(docs.sum())} "
                      f"train tokens in {len(docs)} documents")
    weights = [s.weight for s in cfg.sources]
    streams = {split: MixtureStream(got, weights)
               for split, got in per_split.items() if got}
    identity = {"data.tokens": identity_tokens, "data.cache": caches}
    if tok is not None:
        identity["data.tokenizer"] = tok.identity()
    elif first_meta is not None:
        identity["data.tokenizer"] = cache_tokenizer_identity(*first_meta)
    source = DataSource(streams, vocab_size=tok.vocab_size if tok else limit,
                        eos_id=tok.eos_id if tok else -1, global_batch_size=global_batch_size,
                        summary=f"mixture of {len(names)}: " + "; ".join(labels),
                        cache_path=first_meta[0] if first_meta else None,
                        document_positions=cfg.document_mask, identity=identity,
                        bos_id=tok.bos_id if tok and tok.add_bos else None,
                        tokenizer_files=tokenizer_files(first_meta[1]) if first_meta else ())
    source.sources = {name: {split: per_split[split][i] for split in per_split
                             if len(per_split[split]) > i} for i, name in enumerate(names)}
    if first_meta is None:
        source.tokenizer = tok
    return source
