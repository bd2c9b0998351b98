"""Reading a DCP checkpoint without running code from it: every pickle on the read path is
restricted to the classes our checkpoints are made of.

DCP keeps a checkpoint's index, `.metadata`, as a pickle, and torch's `FileSystemReader` reads it
with plain `pickle.load`; the non-tensor entries (optimizer hyper-parameters, scheduler and
trainer state: "BYTE_IO" items inside the `.distcp` files) are read by DCP's `DefaultLoadPlanner`
with `torch.load(weights_only=False)`. A pickle can name any importable callable and call it, so
a downloaded checkpoint whose `.metadata` holds `os.system(...)` would run it at `export`,
`model.init_from`, `eval.checkpoint` or resume — the manifest's hashes do not help, whoever
planted the file can rewrite the manifest too. Hence (torch 2.13's read path; the tensor items
are already read with `torch.load(weights_only=True)`):
- `.metadata` is read by `RestrictedUnpickler`, whose `find_class` admits only `ALLOWED` (found
  by recording every global in the checkpoints of every layout we write: ZeRO 0/2/3, TP, SP,
  ring, HSDP, async) and torch dtypes — the pattern of the Python docs' "Restricting Globals";
- BYTE_IO items are read by `SafeLoadPlanner` with `torch.load(weights_only=True)`, torch's own
  allow-list (primitives, containers, tensors), which covers all we store as bytes.
Anything else is `RefusedPickle` (exit 1), raised before the refused callable is looked up, so
nothing from the file runs. Every DCP read of the package goes through `read_metadata` and
`load`; the entry points' pre-checks run `check_pickles` first, so a refusal comes before
anything (the run dir's `.hydra/`, logs, a copied tokenizer) is written.
"""
from __future__ import annotations

import io
import os
import pickle
import re

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from ..config.errors import InputUnreadable, exception_chain

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# (module, name) of every global a `.metadata` of ours holds, plus harmless constructors of
# plain values that other pickle protocols spell as globals. Exact pairs: a dotted name such
# as ("torch.distributed.checkpoint.metadata", "os.system") would reach through a module.
ALLOWED = frozenset({
    *((_DCP_METADATA, n) for n in ("Metadata", "StorageMeta", "MetadataIndex",
                                   "TensorStorageMetadata", "BytesStorageMetadata",
                                   "ChunkStorageMetadata", "TensorProperties",
                                   "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where each item lies
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how torch.strided pickles: a name -> layout lookup
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"), ("pathlib._local", "PurePosixPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
})
_DTYPES = frozenset(n for n, v in vars(torch).items() if isinstance(v, torch.dtype))


class RefusedPickle(InputUnreadable):
    """A pickle in a checkpoint names a global outside the allow-list: `error: <file>: refuses to
    unpickle <global> ...`, exit 1. Nothing from the file was run."""

    def __init__(self, where: str, refused: str):
        super().__init__(where, f"refuses to unpickle {refused} (a checkpoint may hold only "
                         "DCP's metadata classes, torch sizes and dtypes, tensors and plain "
                         "values; a pickle naming anything else can run code): nothing from it "
                         "was run — use a checkpoint from a source you trust", refused)
        self.where, self.refused = where, refused

    def __reduce__(self):  # DCP gathers a rank's exception to every rank with pickle
        return type(self), (self.where, self.refused)


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only `ALLOWED` globals and torch dtypes; any other
    global raises `RefusedPickle` naming `where` (the file) before it is imported or called."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise RefusedPickle(self.where, f"{module}.{name}")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` read by `RestrictedUnpickler`. The metadata is read
    once and kept (DCP asks again inside `dcp.load`), so what was checked is what is loaded."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._metadata: dict = {}

    def reset(self, checkpoint_id=None) -> None:
        super().reset(checkpoint_id)
        self._metadata = {}

    def read_metadata(self, *args, **kwargs) -> Metadata:
        """DCP's `FileSystemReader.read_metadata` (torch 2.13), restricted; `rank=` names a
        rank-local `__<rank>.metadata` as there. RefusedPickle for a disallowed global."""
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            path = (self._get_metadata_path(rank) if hasattr(self, "_get_metadata_path")
                    else self.fs.concat_path(self.path, ".metadata"))  # older torch
            with self.fs.create_stream(path, "rb") as f:
                metadata = RestrictedUnpickler(f, str(path)).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata[rank] = metadata
        return self._metadata[rank]


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with non-tensor items read by `torch.load(weights_only=True)`
    (DefaultLoadPlanner uses weights_only=False); `step` names the checkpoint in refusals."""

    def __init__(self, step: str, flatten: bool = True):
        super().__init__(flatten_state_dict=flatten)
        self.step = step

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+)", str(exc))  # torch's message names the global
            info = self.metadata.storage_data[read_item.storage_index]
            raise RefusedPickle(os.path.join(self.step, info.relative_path),
                                f"{found.group(1) if found else 'a global'} (item "
                                f"{read_item.dest_index.fqn})") from None
        # where DefaultLoadPlanner.load_bytes puts it (torch 2.13), minus its unsafe load
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_metadata(step: str) -> Metadata:
    """DCP's metadata of checkpoint `step`, read by `RestrictedUnpickler`. RefusedPickle for a
    disallowed global; OSError / UnpicklingError as a plain read would raise."""
    return SafeReader(step).read_metadata()


def refusal(exc: BaseException) -> RefusedPickle | None:
    """The RefusedPickle inside `exc` (itself, a cause, or one rank's failure inside DCP's
    CheckpointException), or None."""
    for link in exception_chain(exc):
        if isinstance(link, RefusedPickle):
            return link
        for failure in (getattr(link, "failures", None) or {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure  # (exc, traceback)
            if isinstance(inner, RefusedPickle):
                return inner
    return None


def load(state: dict, step: str, distributed: bool) -> None:
    """`dcp.load(state)` from checkpoint `step` with every pickle restricted (module docstring);
    in place, as dcp.load. A collective when `distributed`. RefusedPickle (the same on every
    rank) for a disallowed global, raised before DCP reads anything else; other failures as
    dcp.load raises them."""
    reader = SafeReader(step)
    reader.read_metadata()  # refused here, before DCP's own fallback to rank-local metadata
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(step),
                 no_dist=not distributed)
    except BaseException as exc:
        refused = refusal(exc)
        if refused is None:
            raise
        raise refused from None


def check_pickles(step: str) -> None:
    """Read every pickle of checkpoint `step` restricted — its `.metadata` and each non-tensor
    (BYTE_IO) item — and keep nothing: what the entry points' pre-checks run, so a planted pickle
    is refused before Hydra writes the run dir's `.hydra/` or anything else is written. Small
    reads (no tensor is read); one process, no collective. RefusedPickle for a disallowed global;
    any other failure (a torn or damaged file) is silent here: the load's own checks (manifest
    hashes, resume's fallback) report it as they always have."""
    try:
        metadata = read_metadata(step)
        # flat keys as DCP records them ("trainer.step"), loaded with flattening off
        state = {fqn: None for fqn, item in metadata.state_dict_metadata.items()
                 if isinstance(item, BytesStorageMetadata)}
        if state:
            dcp.load(state, storage_reader=SafeReader(step),
                     planner=SafeLoadPlanner(step, flatten=False), no_dist=True)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        refused = refusal(exc)
        if refused is not None:
            raise refused from None
