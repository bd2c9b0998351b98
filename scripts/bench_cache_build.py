"""Token cache build vs the raw tokenizer, and the build's memory, at several corpus sizes.

For each size (`--mb 30 100`): a deterministic JSONL corpus (Zipf-distributed pseudo-words in
lines, paragraphs and documents of log-normal length) is generated once into `--dir`; a vocab
8192 tokenizer (sentencepiece `--kind spm`, or a tokenizers BPE `--kind hf`) is trained once on
the first 8 MB. Then, each in a fresh child process on the same cores:
- raw: the tokenizer alone encodes the same documents, already in memory
  (`SentencePieceProcessor.encode(list, num_threads=N)`, `Tokenizer.encode_batch_fast`);
- build: `data=files` with that tokenizer given (open_or_build + build_corpus, as build_data
  runs them; the splits are not loaded for batches afterwards);
  its tokenization phase is the time of the build's "... tokens in Ts" log line (tokenize and
  write the splits), and the whole build the time to a published cache.
The parent samples the build child's RssAnon (/proc/<pid>/status) every 10 ms for its peak;
the slope between the sizes, per document, is what the cache index costs. `--code DIR` builds
with another checkout (e.g. main, for the before numbers). Prints a table, or JSON (`--json`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VOCAB = 8192
DOC_WORDS = 244.7  # median words per document (e^5.5): ~2.6 KB documents


def make_corpus(path: Path, mb: float, seed: int = 0, doc_words: float = DOC_WORDS) -> None:
    """Write ~`mb` MB of JSONL documents, the same for the same (mb, seed, doc_words); a
    document's word count is log-normal with median `doc_words`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = ["ka", "to", "ri", "an", "el", "mo", "su", "ne", "di", "la", "pe", "or",
                 "th", "is", "ve", "qu", "ng", "st", "re", "ow"]
    words = np.array(["".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(30000)])
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    p /= p.sum()
    target, written = mb * 1e6, 0
    with open(path, "w") as f:
        while written < target:
            n = int(min(40000, max(5, rng.lognormal(np.log(doc_words), 1.0))))  # its words
            ids = rng.choice(len(words), n, p=p)
            breaks = rng.random(n)
            parts = []
            for w, b in zip(words[ids].tolist(), breaks.tolist()):
                parts.append(w + (".\n" if b < 0.02 else ", " if b < 0.08 else ". " if b < 0.14
                                  else " "))
            line = json.dumps({"text": "".join(parts).strip()}) + "\n"
            f.write(line)
            written += len(line)


def train_tokenizer(corpus: Path, kind: str, out: Path) -> Path:
    texts = []
    with open(corpus) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if sum(map(len, texts)) > 8e6:
                break
    out.mkdir(parents=True, exist_ok=True)
    if kind == "spm":
        from ulysses_train.data.tokenizer_train import train_tokenizer as train

        train(texts, VOCAB, str(out / "tokenizer.model"), lambda _: None)
        return out / "tokenizer.model"
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB,
                                                       special_tokens=["<|endoftext|>"]))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return out / "tokenizer.json"


def child_raw(corpus: str, model: str) -> dict:
    """Encode every document with the tokenizer alone, in chunks of 20000 documents."""
    texts = [json.loads(line)["text"] for line in open(corpus)]
    threads = len(os.sched_getaffinity(0))
    if model.endswith(".json"):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(model)
        encode = lambda chunk: [e.ids for e in tok.encode_batch_fast(chunk)]  # noqa: E731
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=model)
        encode = lambda chunk: sp.encode(chunk, num_threads=threads)  # noqa: E731
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(texts), 20000):
        tokens += sum(map(len, encode(texts[i:i + 20000])))
    return {"seconds": time.perf_counter() - start, "tokens": tokens,
            "bytes": sum(len(t.encode()) for t in texts), "documents": len(texts)}


def child_build(corpus: str, model: str, cache: str) -> dict:
    """The build alone, as build_data runs it (open_or_build around build_corpus), without
    loading the splits for batches afterwards (that is the reader's memory, not the build's)."""
    from pathlib import Path as P

    from ulysses_train.config.schema import DataConfig
    from ulysses_train.data.build import build_corpus
    from ulysses_train.data.cache import open_or_build
    from ulysses_train.data.corpus import corpus_for

    log = []
    cfg = DataConfig(name="files", paths=[corpus], tokenizer_path=model, cache_dir=cache,
                     val_fraction=0.005)
    data = corpus_for(cfg)
    start = time.perf_counter()
    open_or_build(P(cache), "bench", lambda tmp: build_corpus(
        tmp, data, key="bench", vocab_size=VOCAB, tokenizer_path=model, sample_bytes=0,
        val_fraction=cfg.val_fraction, log=log.append), log=log.append, is_main=True)
    seconds = time.perf_counter() - start
    phase = next(float(m[1]) for x in log if (m := re.search(r"tokens in ([0-9.]+)s", x)))
    return {"seconds": seconds, "tokenize_seconds": phase, "log": log}


def run_child(args: list[str], code: str | None) -> tuple[dict, int]:
    """Run this script as a child; return its JSON and its peak RssAnon in bytes."""
    env = dict(os.environ, PYTHONPATH=code or str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, env=env)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                kb = int(re.search(r"RssAnon:\s+(\d+)", status)[1])
                peak[0] = max(peak[0], kb * 1024)
            except (OSError, TypeError):
                pass
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"child {args[:2]} failed with exit code {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1]), peak[0]


def measure(args) -> dict:
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for mb in args.mb:
        words = "" if args.doc_words == DOC_WORDS else f"-{args.doc_words:g}w"
        corpus = root / f"corpus-{mb:g}mb{words}.jsonl"
        if not corpus.exists():
            make_corpus(corpus, mb, doc_words=args.doc_words)
        tok_dir = root / f"tokenizer-{args.kind}"
        model = next(iter(tok_dir.glob("tokenizer.*")), None) if tok_dir.exists() else None
        model = model or train_tokenizer(corpus, args.kind, tok_dir)
        raw, raw_peak = run_child(["--child", "raw", str(corpus), str(model)], None)
        with tempfile.TemporaryDirectory(dir=root) as cache:
            built, peak = run_child(["--child", "build", str(corpus), str(model), cache],
                                    args.code)
        rows.append({"mb": mb, "documents": raw["documents"], "bytes": raw["bytes"],
                     "tokens": raw["tokens"],
                     "raw_mb_s": raw["bytes"] / 1e6 / raw["seconds"],
                     "tokenize_mb_s": raw["bytes"] / 1e6 / built["tokenize_seconds"],
                     "build_mb_s": raw["bytes"] / 1e6 / built["seconds"],
                     "build_seconds": built["seconds"], "peak_rss_anon_mb": peak / 1e6,
                     "raw_peak_rss_anon_mb": raw_peak / 1e6})
        rows[-1]["ratio"] = rows[-1]["tokenize_mb_s"] / rows[-1]["raw_mb_s"]
    result = {"kind": args.kind, "threads": len(os.sched_getaffinity(0)),
              "code": args.code or "this checkout", "sizes": rows}
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        result["rss_anon_bytes_per_document"] = (
            (b["peak_rss_anon_mb"] - a["peak_rss_anon_mb"]) * 1e6 / (b["documents"] - a["documents"]))
        result["rss_anon_bytes_per_corpus_byte"] = (
            (b["peak_rss_anon_mb"] - a["peak_rss_anon_mb"]) * 1e6 / (b["bytes"] - a["bytes"]))
    return result


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        what, rest = sys.argv[2], sys.argv[3:]
        print(json.dumps(child_raw(*rest) if what == "raw" else child_build(*rest)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, nargs="+", default=[30, 100], help="corpus sizes")
    ap.add_argument("--kind", choices=["spm", "hf"], default="spm")
    ap.add_argument("--doc-words", type=float, default=DOC_WORDS,
                    help="median words per document (small: many documents per MB, which "
                         "is what the per-document memory check needs)")
    ap.add_argument("--dir", default="/tmp/bench_cache_build", help="corpora and tokenizers")
    ap.add_argument("--code", default=None, help="checkout to build with (default: this one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.kind}, {result['threads']} threads, code: {result['code']}")
    print(f"{'MB':>6} {'docs':>8} {'raw MB/s':>9} {'tokenize MB/s':>14} {'ratio':>6} "
          f"{'build MB/s':>11} {'build s':>8} {'peak RssAnon MB':>16}")
    for r in result["sizes"]:
        print(f"{r['mb']:>6g} {r['documents']:>8} {r['raw_mb_s']:>9.2f} {r['tokenize_mb_s']:>14.2f}"
              f" {r['ratio']:>6.2f} {r['build_mb_s']:>11.2f} {r['build_seconds']:>8.1f}"
              f" {r['peak_rss_anon_mb']:>16.1f}")
    if "rss_anon_bytes_per_document" in result:
        print(f"RssAnon slope: {result['rss_anon_bytes_per_document']:.1f} bytes/document, "
              f"{result['rss_anon_bytes_per_corpus_byte']:.4f} bytes/corpus byte")


if __name__ == "__main__":
    main()
