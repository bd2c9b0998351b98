"""A run's data identity: what makes its stream of training samples, and the check on resume.

The data position of a run is its global step (row r of step t is sample t * global_batch_size
+ r of a stream fixed by the seed and the tokens; data/source.py). Resuming is only the same run
if every input of that stream is the same, so each checkpoint's `meta.json` records, under
`identity.data`, flat keys named like the config keys that carry them:

- the stream's shape, checked from the config alone (in the pre-check, before data is built):
  `data.name`, `data.seq_len`, `train.global_batch_size`, `train.seed`, `data.document_mask`,
  `data.val_fraction`, and for a mixture `data.mixture` (names, normalised weights, shaping)
  (`STREAM_KEYS`);
- the content, known once the data is built: `data.tokenizer` (sha256 of the files defining
  the tokenizer, sentencepiece or Hugging Face: data/tokenizer.py) and `data.tokens` (per
  split: documents, tokens, sha256 of the document offsets), plus `data.cache` (the token
  cache's name: kind and cache key), for the message only (`CONTENT_KEYS`);
- where the text comes from (`SOURCE_KEYS`: paths, hf_*, text_field, max_docs, tokenizer path
  and sample size; `model.init_from` when its tokenizer is the default; for the stdlib the
  Python version; for a mixture `data.sources`, what each source reads). Their effect *is* the content, so they
  only decide which key an error names: a corpus moved or touched (a new cache key, the same
  tokens) resumes with a note, a corpus with appended documents or a Python upgrade that
  retrains the tokenizer is refused.

Not caught: a document edited in place to the same number of tokens under an unchanged
tokenizer (the token files themselves are not hashed: that would re-read the whole corpus at
every start). Checkpoints written before the identity existed resume with a warning.

Resuming with a different identity is bad input (`ConfigError`, exit 2) naming the key. The
optimizer's hyper-parameters are recorded too (`identity.optim`), but there the config wins
(train/optim.py, `Trainer._restore`).
"""
from __future__ import annotations

import os
import platform
import re
from typing import Callable

from ..config.errors import ConfigError
from ..config.overrides import override
from .safe_read import check_pickles
from .store import check_shape, read_meta, resume_source

STREAM_KEYS = ("data.name", "data.seq_len", "train.global_batch_size", "train.seed",
               "data.document_mask", "data.val_fraction", "data.mixture")
SOURCE_KEYS = ("data.paths", "data.hf_name", "data.hf_config", "data.hf_split",
               "data.text_field", "data.max_docs", "data.tokenizer_path",
               "data.tokenizer_sample_bytes", "data.python", "model.init_from", "data.sources")
CONTENT_KEYS = ("data.tokenizer", "data.tokens")
_WHAT = {"data.tokenizer": "the tokenizer", "data.tokens": "the tokenized corpus"}


def config_identity(cfg) -> dict:
    """The identity keys read from the config (a `Config`); no file is read but `data.paths`'s
    glob. Values are JSON types, so they compare equal after a round trip through meta.json."""
    d, t = cfg.data, cfg.train
    out = {"data.name": d.name, "data.seq_len": d.seq_len,
           "train.global_batch_size": t.global_batch_size, "train.seed": t.seed,
           "data.document_mask": d.document_mask, "data.val_fraction": d.val_fraction}
    if d.sources:  # a mixture: its weights and shaping fix the stream, its inputs the tokens
        return {**out, **_mixture_identity(cfg)}
    if d.name == "synthetic":  # a pure function of the keys above and the model's vocab
        return out
    if d.name == "files":
        from ..data.paths import resolve_paths

        out["data.paths"] = resolve_paths(list(d.paths))
    if d.name == "hf":
        out.update({"data.hf_name": d.hf_name, "data.hf_config": d.hf_config,
                    "data.hf_split": d.hf_split})
    if d.name == "stdlib":  # the corpus is this Python's stdlib: another version, other text
        out["data.python"] = platform.python_version()
    if d.name in ("files", "hf"):
        out["data.text_field"] = d.text_field
    out.update({"data.max_docs": d.max_docs, "data.tokenizer_path": d.tokenizer_path,
                "data.tokenizer_sample_bytes": d.tokenizer_sample_bytes})
    if not d.tokenizer_path and cfg.model.init_from:  # its tokenizer files are the default
        out["model.init_from"] = cfg.model.init_from
    return out


def _mixture_identity(cfg) -> dict:
    """`data.mixture` (a stream key: names, normalised weights, shaping) and `data.sources`
    (a source key: what each source reads) of a mixture config; `data.name` becomes
    "mixture" whatever data= group the sources replaced."""
    from ..data.paths import resolve_paths

    d = cfg.data
    total = sum(s.weight for s in d.sources)
    mixture, inputs = [], []
    for i, s in enumerate(d.sources):
        mixture.append({"name": s.name or f"{s.kind}{i}", "weight": s.weight / total,
                        "min_tokens": s.min_tokens, "max_tokens": s.max_tokens,
                        "length_upsample": s.length_upsample, "long_tokens": s.long_tokens})
        inputs.append({"kind": s.kind, "paths": resolve_paths(list(s.paths))
                       if s.kind == "files" else list(s.paths), "hf_name": s.hf_name,
                       "hf_config": s.hf_config, "hf_split": s.hf_split,
                       "text_field": s.text_field, "ids_field": s.ids_field, "dtype": s.dtype,
                       "eos_id": s.eos_id, "max_docs": s.max_docs})
    out = {"data.name": "mixture", "data.mixture": mixture, "data.sources": inputs,
           "data.tokenizer_path": d.tokenizer_path,
           "data.tokenizer_sample_bytes": d.tokenizer_sample_bytes}
    if not d.tokenizer_path and cfg.model.init_from:
        out["model.init_from"] = cfg.model.init_from
    return out


def lower_lr_fragment(cfg, run_dir: str) -> str:
    """What to add to the command to resume this run with half the learning rate. The run dir
    is named: the default one hashes optim.lr, so without it the rerun would start a new run."""
    words = {"hydra.run.dir": os.path.abspath(run_dir), "optim.lr": f"{cfg.optim.lr / 2:g}"}
    if cfg.checkpoint.resume != "auto":  # else the rerun would load that checkpoint again
        words["checkpoint.resume"] = "auto"
    return " ".join(override(k, v) for k, v in words.items())


def _new_run_advice(mode: str) -> str:
    if mode in ("auto", "never"):
        return "start a new run in an empty directory: add hydra.run.dir=NEW_DIR"
    return ("start a new run: drop checkpoint.resume and add hydra.run.dir=NEW_DIR (an empty "
            "directory)")


def _short(value) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12]  # a sha256
    if isinstance(value, dict):  # data.tokens: {split: [documents, tokens, offsets sha256]}
        return ", ".join(f"{s}: {v[0]} documents / {v[1]} tokens" for s, v in value.items())
    return repr(value)


def check_resume(meta: dict, current: dict, path: str, mode: str,
                 log: Callable[[str], None]) -> None:
    """Refuse to resume checkpoint `path` (its `meta`) with another data identity.

    `current` is {"data": {...}} as `Trainer` builds it, or only its config part (the early
    pre-check: content keys absent are not compared). Raises ConfigError naming the
    key (exit 2); logs a warning for a checkpoint without an identity, and a note when only
    the source changed but the tokens did not.
    """
    saved = (meta.get("identity") or {}).get("data")
    if saved is None:
        log(f"warning: {path} predates the data identity in meta.json, so resuming cannot check "
            "that the tokenizer, corpus, data.seq_len, train.global_batch_size and train.seed "
            "are the ones it was trained with; make sure they are")
        return
    now = current.get("data", {})
    for key in STREAM_KEYS:
        if key in saved and key in now and saved[key] != now[key]:
            if key == "data.mixture":
                raise _mixture_error(saved[key], now[key], path, mode)
            raise ConfigError(key, _stream_message(key, saved[key], now[key], path, mode))
    changed_sources = [k for k in SOURCE_KEYS if k in saved and k in now and saved[k] != now[k]]
    for key in CONTENT_KEYS:
        if key in saved and key in now and saved[key] != now[key]:
            blame = changed_sources[0] if changed_sources else _default_blame(key, now)
            raise ConfigError(blame, _content_message(key, saved, now, changed_sources, path,
                                                      mode))
    if changed_sources and all(k in now for k in CONTENT_KEYS):
        log("note: " + ", ".join(f"{k} changed ({_short(saved[k])} -> {_short(now[k])})"
                                 for k in changed_sources)
            + f", but the tokenizer and tokens equal those {path} was trained on; resuming")


def _stream_message(key: str, old, new, path: str, mode: str) -> str:
    msg = (f"{new!r} here, but {path} was trained with {old!r}; resuming needs the same data "
           f"stream (the data position is step x train.global_batch_size over a stream fixed "
           f"by the seed, data.seq_len and the tokens): rerun with {override(key, old)} to "
           f"resume, or {_new_run_advice(mode)}")
    if key == "data.seq_len":
        msg += (" (to train these weights at another length, start a new run from them: "
                "model.init_from=<this run dir> with a new hydra.run.dir)")
    return msg


def _mixture_error(old: list, new: list, path: str, mode: str) -> ConfigError:
    """The error for a mixture whose sources, weights or shaping differ from the checkpoint's,
    naming the first entry and key that differ (weights as normalised shares)."""
    tail = (f"; resuming needs the same data stream: restore it to resume (only the weights' "
            f"ratios matter), or {_new_run_advice(mode)}")
    names = ([e["name"] for e in old], [e["name"] for e in new])
    if names[0] != names[1]:
        return ConfigError("data.sources", f"the sources are {', '.join(names[1])} here, but "
                           f"{path} was trained on {', '.join(names[0])}" + tail)
    for i, (a, b) in enumerate(zip(old, new)):
        for field in a:
            if a[field] != b.get(field):
                what = "share of the tokens" if field == "weight" else "value"
                now_v, then_v = (f"{b[field]:.4g}", f"{a[field]:.4g}") if field == "weight" \
                    else (repr(b.get(field)), repr(a[field]))
                return ConfigError(f"data.sources[{i}].{field}", f"gives source {a['name']!r} "
                                   f"the {what} {now_v} here, but {path} was trained with "
                                   f"{then_v}" + tail)
    return ConfigError("data.sources", f"differs from what {path} was trained on" + tail)


def _content_message(key: str, saved: dict, now: dict, changed: list, path: str,
                     mode: str) -> str:
    why = ", ".join(f"{k} {_short(saved[k])} -> {_short(now[k])}" for k in changed)
    if not changed:
        why = "the inputs changed on disk since then"
    return (f"{_WHAT[key]} differs from the one {path} was trained on ({_short(saved[key])} -> "
            f"{_short(now[key])}; {why}), so token ids or positions would mean other data; "
            f"restore the data it was trained on to resume, or {_new_run_advice(mode)}")


def _default_blame(key: str, now: dict) -> str:
    """The config key to name when `key` (a content key) changed but no source key did: the
    given tokenizer file for a changed tokenizer, else where the text comes from (the corpus
    changed on disk; a fixed tokenizer then still encodes the same, so it is not to blame)."""
    if key == "data.tokenizer" and now.get("data.tokenizer_path"):
        return "data.tokenizer_path"
    if key == "data.tokenizer" and now.get("model.init_from"):
        return "model.init_from"  # the default tokenizer came from there
    return {"files": "data.paths", "hf": "data.hf_name"}.get(now.get("data.name"), "data.name")


def check_before_start(cfg, run_dir: str) -> None:
    """The config part of the resume checks, from meta.json and the checkpoint's small pickles:
    no tensor read, no data built, nothing written (the entry points run it before Hydra makes
    the run dir's .hydra/). The model first (store.check_shape: another shape, flag or RoPE/norm
    setting), then its pickles (safe_read.check_pickles: RefusedPickle, exit 1), then the data
    stream. Silent for what the full check reports later (an unreadable or old checkpoint)."""
    path = resume_source(run_dir, cfg.checkpoint.resume)
    if path is None:
        return
    try:
        meta = read_meta(path)
    except ConfigError:
        return  # the checkpoint manager reports (or falls back past) it
    check_shape(path, cfg.model, cfg.checkpoint.resume)
    check_pickles(path)  # a planted pickle: refused before Hydra rewrites .hydra/ (exit 1)
    check_resume(meta, {"data": config_identity(cfg)}, path, cfg.checkpoint.resume,
                 log=lambda _: None)
