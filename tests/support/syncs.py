"""`count_syncs`: record every host synchronisation a block of code makes, with where it was made.

A host sync is any read of a tensor's value or data-dependent shape by the host: on CUDA it waits
for the device to finish all queued work. On the CPU nothing waits, so the same calls are
counted by what they are. Two ways in, since not every read reaches the dispatcher on CPU
(checked on torch 2.13):
- a TorchDispatchMode sees `aten._local_scalar_dense` (what `.item()`, `float()`, `int()`,
  `bool()` and `if tensor:` dispatch), `aten.is_nonzero`, `aten.equal` and the ops whose output
  shape depends on the values (`nonzero`, which one-argument `torch.where` calls,
  `masked_select`, boolean indexing, `unique`, `repeat_interleave` without output_size);
- Python wrappers of `Tensor.tolist` (which reads memory without dispatching) and of `item`,
  `__float__`, `__int__`, `__bool__`, `__index__` (seen also where a tensor subclass such as
  DTensor runs its ops inside its own dispatch, beyond the mode); a read the wrapper saw is not
  counted again by the mode.
Not counted: numpy reads of CPU tensors (`.numpy()` raises on a device tensor, so it cannot hide a
device sync: the host copies `step_stats.LaggedRead` and the ring's host ids use it), and the
tensors `host_resident()` returns (the optimizer's for-each step counts, which live on the host
even when the parameters are on a GPU; there the optimizer is fused and reads none).
"""
from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
_SHAPE_OPS = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
              aten.unique_dim.default, aten.unique_consecutive.default,
              aten.repeat_interleave.Tensor}
_WRAPPED = ("tolist", "item", "__float__", "__int__", "__bool__", "__index__")


def _where() -> str:
    """The innermost project frame of the current stack (file:line function)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "ulysses_train" in frame.filename:
            return f"{frame.filename.split('ulysses_train')[-1]}:{frame.lineno} {frame.name}"
    return "outside ulysses_train"


class SyncCounter(TorchDispatchMode):
    """The recording mode; `count_syncs` installs it with the wrappers."""

    def __init__(self, host_resident=lambda: ()):
        super().__init__()
        self.events: list[tuple[str, str]] = []  # (what, where)
        self.host_resident = host_resident
        self.inside_wrapper = 0

    def _ignored(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and any(tensor is t for t in self.host_resident())

    def record(self, what: str, tensor=None) -> None:
        if not self._ignored(tensor):
            self.events.append((what, _where()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside_wrapper:
            shape_dependent = func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
            if func in _READS or func in _SHAPE_OPS or shape_dependent:
                self.record(str(func.overloadpacket.__name__), args[0] if args else None)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs(host_resident=lambda: ()):
    """Context manager yielding a `SyncCounter` whose `events` list every host sync made inside
    (this thread's dispatches; the wrappers see every thread). `host_resident`: a callable
    returning tensors whose reads are not syncs (see the module docstring)."""
    counter = SyncCounter(host_resident)
    originals = {name: getattr(torch.Tensor, name) for name in _WRAPPED}

    def wrap(name, original):
        def wrapper(self, *args, **kwargs):
            if not counter.inside_wrapper:
                counter.record(name, self)
            counter.inside_wrapper += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.inside_wrapper -= 1
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
