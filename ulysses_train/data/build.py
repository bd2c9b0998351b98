"""Turning a `Corpus` into a cache directory: documents -> tokenizer -> flat token streams.

Steps, each logged with counts and time: (1) generate the documents into an Arrow dataset
(`datasets.Dataset.from_generator`); (2) split them by their stable hash; (3) train a tokenizer
on a deterministic sample of the train split, or copy the given one's files (tokenizer.py);
(4) tokenize every document as text (`Dataset.map`, batched; sentencepiece and tokenizers encode
a batch on all cores; special-token strings in a document stay text: tokenizer.py); (5) write,
per split, the documents' tokens back to back, each followed by EOS (and preceded by BOS when
the tokenizer's config says add_bos_token; these are the stream's only BOS/EOS), as one flat
array (`<split>.bin`) plus document start offsets (`<split>_offsets.npy`, ending with the stream
length). The Arrow intermediates are deleted; the caller publishes the directory (see cache.py).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config.errors import ConfigError, exception_chain
from .cache import TOKENIZER, split_files, token_dtype
from .corpus import Corpus
from .readers import input_notes
from .tokenizer import Tokenizer, encode_batch, open_tokenizer
from .tokenizer_train import train_tokenizer

SPLITS = ("train", "val")
_MAP_BATCH = 256  # documents per sentencepiece batch: enough to keep every core busy


@contextlib.contextmanager
def _quiet_datasets():
    """Silence datasets' progress bars while we build (we log our own progress), and its log
    messages: a file it cannot read is also logged by it, and we report that ourselves as the
    one `error: data.paths: ...` line (docs/architecture.md §2). Both are restored afterwards."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def assign_val(hashes: np.ndarray, nonempty: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents are validation: those whose stable hash is below `fraction`.

    A document's split therefore never depends on which other documents exist. Small corpora
    would often get no validation document at all, so when fraction > 0 the lowest-hash
    document is taken if none was; train always keeps at least one document.
    """
    is_val = nonempty & (hashes < fraction)
    candidates = np.flatnonzero(nonempty)
    if fraction > 0 and not is_val.any() and len(candidates) >= 2:
        is_val[candidates[np.argmin(hashes[candidates])]] = True
    if len(candidates) and not (nonempty & ~is_val).any():
        is_val[candidates[np.argmax(hashes[candidates])]] = False
    return is_val


def _tokenizer_sample(docs, is_train: np.ndarray, hashes: np.ndarray, n_bytes: np.ndarray,
                      budget: int) -> list[str]:
    """Train documents in hash order (deterministic, unbiased by file order), up to `budget`
    bytes; the document that crosses the budget is cut."""
    order = np.flatnonzero(is_train)
    order = order[np.argsort(hashes[order], kind="stable")]
    before = np.cumsum(n_bytes[order]) - n_bytes[order]  # bytes taken before each document
    chosen = order[before < budget]
    texts = list(docs.select(chosen)["text"])
    if texts:
        texts[-1] = texts[-1][:max(1, budget - int(before[len(chosen) - 1]))]
    return texts


def _train(sample: list[str], vocab_size: int, model_path: str, log) -> str:
    """Train the tokenizer on `sample`, with progress lines; return how it was made."""
    t0 = time.perf_counter()
    mb = sum(len(t) for t in sample) / 1e6
    log(f"data: training a BPE tokenizer (<= {vocab_size} pieces) on {mb:.1f} MB ...")
    pieces = train_tokenizer(sample, vocab_size, model_path, log)
    log(f"data: trained {pieces} pieces in {time.perf_counter() - t0:.1f}s")
    return f"BPE, {pieces} pieces, trained on {mb:.1f} MB"


def _generate(corpus: Corpus, workdir: Path, key: str):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "hash": datasets.Value("float64"),
                                  "n_bytes": datasets.Value("int64"),
                                  "bad_bytes": datasets.Value("int64"),
                                  "source": datasets.Value("int32"),
                                  "issue": datasets.Value("string")})
    try:
        return datasets.Dataset.from_generator(
            corpus.generate, features=features, gen_kwargs=corpus.gen_kwargs,
            cache_dir=str(workdir), fingerprint=key)
    except Exception as e:
        # datasets wraps exceptions raised by our generator: find a ConfigError in the chain.
        config_error = next((x for x in exception_chain(e) if isinstance(x, ConfigError)), None)
        if config_error is not None:
            raise config_error from None
        raise


def _notes(corpus: Corpus, columns: dict, nonempty: np.ndarray) -> list[str]:
    """One line per input that was empty or lost rows, e.g. "a.jsonl: 3 of 40 rows without
    'text' (skipped)"; ConfigError naming them all if no document has any text."""
    empty = "empty file" if corpus.kind == "files" else "no rows"
    notes = input_notes(corpus.inputs, corpus.text_field, columns["source"], columns["issue"],
                        nonempty, empty)
    if not nonempty.any():
        n = len(corpus.inputs)
        what = (f"{n} input{'s' if n > 1 else ''} ({'; '.join(map(': '.join, notes))})"
                if notes else f"{len(nonempty)} {corpus.unit}")
        raise ConfigError(corpus.blame, f"{corpus.label}: no text in {what}; check the inputs "
                          "(and data.text_field)")
    return [f"{name}: {what} (skipped)" for name, what in notes]


def _write_streams(ids, keep: dict[str, np.ndarray], tok: Tokenizer, dtype: np.dtype,
                   out: Path) -> dict[str, int]:
    """Write each split's flat stream ([BOS] + document + EOS, one after the other) and
    offsets (a document's BOS and EOS are its own); return tokens per split."""
    import pyarrow.compute as pc

    bos = tok.bos_id if tok.add_bos else None

    files = {s: open(out / split_files(s)[0], "wb") for s in keep}
    doc_lengths: dict[str, list[np.ndarray]] = {s: [] for s in keep}
    first = 0  # index of the batch's first document in the whole corpus
    try:
        for table in ids.with_format("arrow").iter(batch_size=4096):
            column = table.column("ids").combine_chunks()
            values = column.flatten().to_numpy()  # every token of the batch, back to back
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            for split, mask in keep.items():
                chosen = mask[first:first + len(lengths)]
                tokens = values[np.repeat(chosen, lengths)]
                kept = lengths[chosen].astype(np.int64)
                # EOS after each kept document: insert before each document's end index.
                ends = np.cumsum(kept)
                where, what = ends, np.full(len(ends), tok.eos_id)
                if bos is not None:  # and BOS at each start; np.insert keeps this order at
                    # equal indices: (start_i, BOS), (end_i, EOS), (start_i+1 = end_i, BOS), ...
                    where = np.stack([ends - kept, ends], axis=1).ravel()
                    what = np.tile([bos, tok.eos_id], len(ends))
                stream = np.insert(tokens, where, what).astype(dtype)
                stream.tofile(files[split])
                doc_lengths[split].append(kept + 1 + (bos is not None))
            first += len(lengths)
    finally:
        for f in files.values():
            f.close()
    n_tokens = {}
    for split, chunks in doc_lengths.items():
        lengths = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(out / split_files(split)[1], offsets)
        n_tokens[split] = int(offsets[-1])
    return n_tokens


def build_corpus(out: Path, corpus: Corpus, *, key: str, vocab_size: int, tokenizer_path: str,
                 sample_bytes: int, val_fraction: float, log: Callable[[str], None]) -> dict:
    """Fill the empty directory `out` with the tokenized corpus; return its meta (see cache.py)."""
    workdir = out / "arrow"
    with _quiet_datasets():
        t0 = time.perf_counter()
        log(f"data: building the {corpus.label} token cache in {out.parent} ...")
        docs = _generate(corpus, workdir, key)
        columns = docs.select_columns(["hash", "n_bytes", "bad_bytes", "source", "issue"]
                                      ).with_format("numpy")[:]
        hashes, n_bytes, bad = columns["hash"], columns["n_bytes"], columns["bad_bytes"]
        nonempty = n_bytes > 0
        notes = _notes(corpus, columns, nonempty)
        n_read = int((columns["issue"] == "").sum())  # rows skipped for a missing text excluded
        is_val = assign_val(hashes, nonempty, val_fraction)
        keep = {"train": nonempty & ~is_val, "val": is_val}
        log(f"data: read {n_read} {corpus.unit} ({n_bytes.sum() / 1e6:.1f} MB, "
            f"{int(keep['val'].sum())} for validation) in {time.perf_counter() - t0:.1f}s")

        if tokenizer_path:  # its files, under their canonical names (tokenizer.py)
            for name, path in open_tokenizer(tokenizer_path).files.items():
                shutil.copyfile(path, out / name)
            model_path = str(out / open_tokenizer(tokenizer_path).model_name)
            how = f"given {tokenizer_path}"
        else:
            model_path = str(out / TOKENIZER)
            sample = _tokenizer_sample(docs, keep["train"], hashes, n_bytes, sample_bytes)
            how = _train(sample, vocab_size, model_path, log)
        tok = open_tokenizer(model_path)

        t0 = time.perf_counter()
        log(f"data: tokenizing {int(nonempty.sum())} documents ...")
        ids = _tokenize(docs, model_path, key)
        dtype = token_dtype(tok.vocab_size)
        n_tokens = _write_streams(ids, keep, tok, dtype, out)
        log(f"data: {n_tokens['train'] / 1e6:.2f}M train / {n_tokens['val'] / 1e6:.2f}M val "
            f"tokens in {time.perf_counter() - t0:.1f}s")
    del docs, ids
    shutil.rmtree(workdir, ignore_errors=True)
    return {"kind": corpus.kind, "label": corpus.label, "unit": corpus.unit,
            "n_inputs": n_read, "warnings": notes,
            "n_docs": {s: int(m.sum()) for s, m in keep.items()},
            "n_tokens": n_tokens, "bad_files": int((bad > 0).sum()), "bad_bytes": int(bad.sum()),
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": dtype.name,
            "tokenizer": how, "tokenizer_files": sorted(tok.files), "bos_id": tok.bos_id,
            "add_bos": tok.add_bos}


def _tokenize(docs, model_path: str, key: str):
    import datasets

    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))})
    return docs.map(encode_batch, batched=True, batch_size=_MAP_BATCH,
                    fn_kwargs={"model_path": model_path, "num_threads": os.cpu_count() or 1},
                    remove_columns=docs.column_names, features=features,
                    new_fingerprint=f"{key}-ids")
