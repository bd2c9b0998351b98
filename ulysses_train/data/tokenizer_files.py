"""Where a run's tokenizer comes from, and the copy every run leaves in `<run_dir>/tokenizer/`.

In (`locate`): `data.tokenizer_path` is a model file (a Hugging Face `tokenizer.json` or a
sentencepiece `.model`) or a directory holding one (`tokenizer.json` first, as transformers
prefers the fast tokenizer). Left empty, the tokenizer files of `model.init_from` are used when
it has some: a Hugging Face model directory, one of our run directories (its `tokenizer/`), or
a `step_N` directory of one (that run's `tokenizer/`), so stage 2 of a context extension keeps
stage 1's tokenizer. Otherwise "" = train our own sentencepiece model on the corpus.

Out (`save_run_tokenizer`): rank 0 copies the files of the tokenizer the run used into
`<run_dir>/tokenizer/`, a folder `transformers.AutoTokenizer.from_pretrained` loads (the export
copies it next to the weights): the model file, plus `tokenizer_config.json` /
`special_tokens_map.json` when the tokenizer has them. A tokenizer without a
tokenizer_config.json gets one naming its BOS/EOS; for a sentencepiece model it also names the
class transformers rebuilds it with (LlamaTokenizer: BPE, byte fallback, no normalizer, a
leading "▁" only if the model adds a dummy prefix; ours does not). The folder appears whole or
not at all: files are written into a temporary directory that is then renamed into place.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Callable, Iterator

from ..config.errors import ConfigError
from .tokenizer import KEY, MODEL_FILES, Tokenizer

RUN_TOKENIZER_DIR = "tokenizer"  # <run_dir>/tokenizer/
_TMP, _OLD = ".tokenizer.tmp-", ".tokenizer.old-"


def model_in(folder: str) -> str | None:
    """The tokenizer model file inside `folder` (tokenizer.json before tokenizer.model)."""
    for name in MODEL_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def init_from_dirs(path: str) -> Iterator[str]:
    """Where `model.init_from=path` may keep tokenizer files: itself (a Hugging Face dir), its
    tokenizer/ (our run dir), or its run's tokenizer/ (our <run>/checkpoints/step_N)."""
    path = os.path.abspath(path)
    yield path
    yield os.path.join(path, RUN_TOKENIZER_DIR)
    parent = os.path.dirname(path)
    if re.fullmatch(r"step_\d+", os.path.basename(path)) and \
            os.path.basename(parent) == "checkpoints":
        yield os.path.join(os.path.dirname(parent), RUN_TOKENIZER_DIR)


def init_from_or_run(init_from: str, run_dir: str, resuming: bool) -> str:
    """`model.init_from` as the tokenizer search (`locate`) should see it. A run that resumes
    (`resuming`: checkpoint.store.resume_source found a checkpoint; resume wins over init_from)
    and kept its tokenizer in `<run_dir>/tokenizer/` reads that copy, saved when the run started
    and held equal to the source by the data identity check, so the source may have moved or
    gone; else init_from."""
    if init_from and resuming and model_in(
            os.path.join(run_dir, RUN_TOKENIZER_DIR)):
        return os.path.abspath(run_dir)
    return init_from


def locate(tokenizer_path: str, init_from: str, log: Callable[[str], None]) -> str:
    """The model file of the tokenizer to use, or "" to train one (see the module docstring).
    Raises ConfigError(data.tokenizer_path) for a path that holds no tokenizer."""
    if tokenizer_path:
        path = os.path.expanduser(tokenizer_path)
        if os.path.isdir(path):
            found = model_in(path)
            if found is None:
                raise ConfigError(KEY, f"{path} holds neither {' nor '.join(MODEL_FILES)}; "
                                  "point at the tokenizer's file or directory")
            return found
        if not os.path.isfile(path):
            raise ConfigError(KEY, f"file not found: {path}; give an existing tokenizer.json or "
                              "sentencepiece .model (or a directory with one), or leave it "
                              "empty to train one")
        return path
    if not init_from:
        return ""
    for folder in init_from_dirs(os.path.expanduser(init_from)):
        found = model_in(folder)
        if found:
            log(f"data: tokenizer from model.init_from: {found}")
            return found
    # Training a new tokenizer here would feed pretrained embeddings ids they never saw: the
    # run would train, and mean nothing. Refuse instead of guessing.
    raise ConfigError(KEY, f"model.init_from={init_from} has no tokenizer files ("
                      f"{' or '.join(MODEL_FILES)}, itself or in its run's tokenizer/), and a "
                      "tokenizer trained now would give its weights ids they were not trained "
                      "on; copy the model's tokenizer files there or set data.tokenizer_path")


def _dummy_prefix(tok: Tokenizer) -> bool:
    """Whether a sentencepiece model prefixes text with "▁" (Llama 2's does; ours does not)."""
    ids = tok.encode_batch(["a"])[0]
    return bool(ids) and tok.id_to_token(ids[0]).startswith("\u2581")


def tokenizer_config(tok: Tokenizer) -> dict:
    """A tokenizer_config.json for a tokenizer that came without one, naming what we pack with.
    The class for sentencepiece is LlamaTokenizer (transformers 5 rebuilds a sentencepiece BPE
    model as a `tokenizers` BPE with byte fallback and no normalizer, which equals ours)."""
    def name(token_id):
        return None if token_id is None else tok.id_to_token(token_id)

    config = {"bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id),
              "add_bos_token": tok.add_bos, "add_eos_token": False}
    if tok.kind == "sentencepiece":
        config.update(tokenizer_class="LlamaTokenizer", legacy=False,
                      add_prefix_space=_dummy_prefix(tok), unk_token=name(tok.sp.unk_id()))
    else:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return config


def _contents(folder: str) -> dict[str, bytes] | None:
    if not os.path.isdir(folder):
        return None
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def save_run_tokenizer(tok: Tokenizer, out: str) -> bool:
    """Write `tok`'s files into the folder `out` (see the module docstring); False when it
    already holds exactly them (a resumed run). Call on one rank only."""
    files = {}
    for name, path in tok.files.items():
        with open(path, "rb") as f:
            files[name] = f.read()
    if "tokenizer_config.json" not in files:
        files["tokenizer_config.json"] = (json.dumps(tokenizer_config(tok), indent=2) + "\n"
                                          ).encode()
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)  # a run dir Hydra did not make (Trainer used directly)
    for stale in glob.glob(os.path.join(parent, _TMP + "*")) + \
            glob.glob(os.path.join(parent, _OLD + "*")):  # from a crash in an earlier call
        shutil.rmtree(stale, ignore_errors=True)
    if _contents(out) == dict(sorted(files.items())):
        return False
    tmp = tempfile.mkdtemp(prefix=_TMP, dir=parent)
    old = None
    try:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        if os.path.exists(out):  # another tokenizer (a new run in an old dir): moved aside
            old = os.path.join(parent, _OLD + uuid.uuid4().hex)  # whole, as os.replace cannot
            os.rename(out, old)  # replace a non-empty directory
        os.replace(tmp, out)  # atomic: the folder is complete or absent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return True
