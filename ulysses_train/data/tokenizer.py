"""One tokenizer interface, two implementations: a sentencepiece `.model` and a Hugging Face
`tokenizer.json` (loaded with the `tokenizers` library: Llama 3's, Qwen3's or Gemma 3's, ...).

A tokenizer is its model file plus, beside it, the files that name its special tokens:
`tokenizer_config.json` (`bos_token`, `eos_token`, `add_bos_token`) and `special_tokens_map.json`.
What packing needs (data/build.py, data/packing.py) comes from them, first source that says:
- EOS, written after every document: `eos_token` of tokenizer_config.json, else of
  special_tokens_map.json, else the sentencepiece model's own EOS id. None at all is an error.
- BOS, written before every document when `add_bos`: `bos_token` found the same way.
  `add_bos` is tokenizer_config.json's `add_bos_token` when present; else, for a
  tokenizer.json, whether its post-processor puts BOS first (Llama 3 does it that way); else
  false (our own trained model has no BOS).
Document text is encoded as text: no special tokens are added (`add_special_tokens=False`), and a
special token's string inside the text (scraped pages are full of `<|endoftext|>`, `</s>`,
`<|begin_of_text|>`) becomes ordinary pieces, never its control id, as tiktoken's
`disallowed_special=()` and transformers' `split_special_tokens=True` do. So the only BOS/EOS
ids of the packed stream are the ones the packer adds. Special here: for a tokenizer.json its
added tokens marked special, for sentencepiece its control pieces (never parsed from text
anyway); for both, every token the configs name (`*_token`, `additional_special_tokens`,
`added_tokens_decoder` entries marked special), which are made special (tokenizers) or control
pieces (sentencepiece: its user-defined symbols are matched in text; spm_model.py).
`sentencepiece` and `tokenizers` are imported inside the functions: `import ulysses_train.data`
stays light.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

from ..config.errors import ConfigError
from ..utils.hashing import hash_file
from ..utils.jsonfile import read_json_object

SPM_MODEL = "tokenizer.model"  # the names the files get in caches and in <run_dir>/tokenizer/
HF_MODEL = "tokenizer.json"
MODEL_FILES = (HF_MODEL, SPM_MODEL)  # preference order inside a directory (transformers': fast)
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
KEY = "data.tokenizer_path"
# How text becomes ids (see the module docstring), part of the token cache's key of a given
# tokenizer: caches from when special-token strings in text became control ids rebuild once.
TEXT_ENCODING = "special-token strings as text"

_loaded: dict[str, "Tokenizer"] = {}  # per process: a build's shards reuse one tokenizer


class Tokenizer:
    """A loaded tokenizer: `encode_batch`, `vocab_size` (ids are in [0, vocab_size)),
    `stream_ids` (ids of a packed stream are in [0, stream_ids): what the model's embedding
    must cover), `bos_id` (None: it has none), `eos_id`, `add_bos`, and `files` (canonical name
    -> path of every file that defines it). Raises ConfigError(data.tokenizer_path) for a file
    it cannot use."""

    kind = ""
    model_name = ""  # the model file's canonical name

    def __init__(self, path: str):
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        self.files = {self.model_name: path}
        for name in CONFIG_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                self.files[name] = os.path.join(folder, name)
        self.configs = {name: _json(self.files[name])
                        for name in CONFIG_FILES if name in self.files}
        self.vocab_size = self._vocab_size()
        self.bos_id, self.eos_id, self.add_bos = special_ids(self)
        self._specials_as_text(special_names(self.configs))
        self.stream_ids = self._stream_ids()

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text, without special tokens, special-token strings in it
        encoded as text (see the module docstring)."""
        raise NotImplementedError

    def _specials_as_text(self, names: set[str]) -> None:
        """Make `encode_batch` encode every special token's string, and `names`, as text."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        raise NotImplementedError

    def default_id(self, role: str) -> int | None:
        """The model file's own id for `role` ("bos" or "eos") when no config names one."""
        return None

    def default_add_bos(self) -> bool:
        return False

    def _vocab_size(self) -> int:
        raise NotImplementedError

    def _stream_ids(self) -> int:
        """1 + the largest id a packed stream can hold (see `stream_ids`)."""
        return self.vocab_size

    def identity(self) -> str:
        """sha256 of what defines this tokenizer: of the model file when it is the only file
        (as checkpoints recorded before tokenizer configs were read), else of every file's
        sha256 by canonical name."""
        return tokenizer_identity(self.files)

    def describe(self) -> str:
        bos = f"BOS {self.bos_id} + " if self.add_bos else ""
        return (f"{self.model_name}, {self.vocab_size} ids, documents = {bos}text + "
                f"EOS {self.eos_id}")


class SentencePieceTokenizer(Tokenizer):
    kind, model_name = "sentencepiece", SPM_MODEL

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(KEY, f"{path} is not a sentencepiece model: {e}") from None
        super().__init__(path)

    def encode_batch(self, texts, num_threads=1):
        return self.sp.encode(list(texts), num_threads=num_threads)

    def _specials_as_text(self, names):
        # Control pieces are never parsed from text; user-defined ones are: those that are
        # special become control pieces (spm_model.py). Only candidates trigger the rewrite.
        ids = [self.token_to_id(n) for n in names]
        if not any(i is not None and not (self.sp.is_control(i) or self.sp.is_unknown(i) or
                                          self.sp.is_byte(i)) for i in ids):
            return
        import sentencepiece as spm

        from .spm_model import user_defined_as_control

        model, changed = user_defined_as_control(self.sp.serialized_model_proto(), names)
        if changed:
            self.sp = spm.SentencePieceProcessor(model_proto=model)

    def token_to_id(self, token):
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk for an unknown piece: only unk itself may map there.
        return i if i != self.sp.unk_id() or token == self.sp.id_to_piece(i) else None

    def id_to_token(self, token_id):
        return self.sp.id_to_piece(token_id)

    def default_id(self, role):
        i = self.sp.bos_id() if role == "bos" else self.sp.eos_id()
        return i if i >= 0 else None

    def _vocab_size(self):
        return self.sp.get_piece_size()


class HFTokenizer(Tokenizer):
    kind, model_name = "tokenizers", HF_MODEL

    def __init__(self, path: str):
        from tokenizers import Tokenizer as Backend

        try:
            self.tok = Backend.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise ConfigError(KEY, f"{path} is not a Hugging Face tokenizer.json: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        super().__init__(path)

    def encode_batch(self, texts, num_threads=1):
        # tokenizers parallelises batches itself (RAYON_NUM_THREADS); num_threads is for spm.
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: same ids.
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def _specials_as_text(self, names):
        from tokenizers import AddedToken

        # Added tokens the configs name as special but tokenizer.json does not mark special
        # (transformers makes them special when it loads the configs): marked here, same ids.
        promote = [AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip,
                              rstrip=t.rstrip, normalized=t.normalized, special=True)
                   for t in self.tok.get_added_tokens_decoder().values()
                   if not t.special and t.content in names]
        if promote:
            self.tok.add_special_tokens(promote)
        # Special added tokens inside text are then split like any text (tokenizers >= 0.15).
        self.tok.encode_special_tokens = True

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id):
        return self.tok.id_to_token(token_id)

    def default_add_bos(self):
        # What the post-processor does to an empty text: Llama 3's adds <|begin_of_text|>.
        ids = self.tok.encode("", add_special_tokens=True).ids
        return bool(ids) and self.bos_id is not None and ids[0] == self.bos_id

    def _stream_ids(self):
        # Text gives model-vocabulary ids and unspecial added tokens (special ones are split as
        # text), the packer BOS/EOS. Gemma 3 1B's <image_soft_token> is id 262144, past the
        # 262144 rows of its embedding: a model needs no row for an id it never reads.
        plain = [i for i, t in self.tok.get_added_tokens_decoder().items() if not t.special]
        packer = [self.eos_id] + ([self.bos_id] if self.add_bos else [])
        return 1 + max([*self.tok.get_vocab(with_added_tokens=False).values(), *plain, *packer])

    def _vocab_size(self):
        # Added tokens included (Llama 3: 128000 BPE ids + 256 special); max id + 1 in case a
        # tokenizer leaves holes.
        return max(self.tok.get_vocab_size(with_added_tokens=True),
                   max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1)


def _token_name(value) -> str | None:
    """A special token as the configs spell it: "<s>", {"content": "<s>", ...} or null."""
    return value.get("content") if isinstance(value, dict) else value


def special_names(configs: dict[str, dict]) -> set[str]:
    """Every token the configs (file name -> content) name as special: `bos_token`,
    `eos_token`, `unk_token`, `pad_token`, ... (`*_token`), `additional_special_tokens`,
    `extra_special_tokens` (a list or a dict), and `added_tokens_decoder` entries marked
    special."""
    names = []
    for config in configs.values():
        for key, value in config.items():
            if key.endswith("_token") and not key.startswith("add_"):  # add_bos_token: a flag
                names.append(_token_name(value))
            elif key in ("additional_special_tokens", "extra_special_tokens"):
                values = list(value.values()) if isinstance(value, dict) else value
                if isinstance(values, list):
                    names.extend(_token_name(v) for v in values)
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            names.extend(e.get("content") for e in decoder.values()
                         if isinstance(e, dict) and e.get("special"))
    return {n for n in names if isinstance(n, str) and n}


def special_ids(tok: Tokenizer) -> tuple[int | None, int, bool]:
    """(bos_id, eos_id, add_bos) of `tok`, from its configs (see the module docstring).
    Raises ConfigError for a named token the vocabulary lacks, or for no EOS at all."""
    configs = tok.configs
    ids = {}
    for role in ("bos", "eos"):
        key = f"{role}_token"
        source = next((n for n in CONFIG_FILES if key in configs.get(n, {})), None)
        if source is None:
            ids[role] = tok.default_id(role)
            continue
        name = _token_name(configs[source][key])
        ids[role] = None if name is None else tok.token_to_id(name)
        if name is not None and ids[role] is None:
            raise ConfigError(KEY, f"{source} names {key} {name!r}, which is not in the "
                              f"vocabulary of {tok.path}; fix {source}")
    tok.bos_id = ids["bos"]  # default_add_bos reads it
    config = configs.get("tokenizer_config.json", {})
    add_bos = bool(config["add_bos_token"]) if "add_bos_token" in config else tok.default_add_bos()
    if ids["eos"] is None:
        raise ConfigError(KEY, f"{tok.path} has no EOS token, and documents are packed with EOS "
                          "between them; name one as eos_token in tokenizer_config.json")
    if add_bos and ids["bos"] is None:
        raise ConfigError(KEY, f"{tok.path}: add_bos_token is true but no bos_token is named; "
                          "name one in tokenizer_config.json")
    return ids["bos"], ids["eos"], add_bos


def tokenizer_identity(files: dict[str, str]) -> str:
    """sha256 naming the tokenizer defined by `files` (canonical name -> path); see
    `Tokenizer.identity`."""
    if len(files) == 1:
        return hash_file(next(iter(files.values())), "sha256")
    digests = {name: hash_file(path, "sha256") for name, path in sorted(files.items())}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def open_tokenizer(path: str) -> Tokenizer:
    """The Tokenizer of model file `path` (`.json`: tokenizers, else sentencepiece), loaded once
    per process while the file is unchanged. Raises ConfigError(data.tokenizer_path)."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise ConfigError(KEY, f"cannot read {path} ({e.strerror}); give an existing "
                          "tokenizer.json or sentencepiece .model, or a directory with one"
                          ) from None
    key = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"  # rebuilt file: reload
    tok = _loaded.get(key)
    if tok is None:
        kind = HFTokenizer if path.endswith(".json") else SentencePieceTokenizer
        tok = _loaded[key] = kind(path)
    return tok


def load_tokenizer(path: str):
    """The raw SentencePieceProcessor of a sentencepiece model file (tests decode with it)."""
    return open_tokenizer(path).sp


def _json(path: str) -> dict:
    """read_json_object, its failure attributed to KEY (one `error: KEY: ...` line)."""
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise ConfigError(KEY, str(exc)) from None
