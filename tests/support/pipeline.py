"""Instruments for tests/parallel/test_ulysses_pipeline.py: the head-group pipeline's posts,
waits and kernel calls as an event log, its exchange buffers in flight, and the all-to-alls
that really run (below checkpointing's replay)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Recorder:
    """Logs the pipeline's posts, waits and kernel calls as (event, kind) in call order.

    kind: "in" (q/k/v, or output gradients, travelling to heads), "out" (outputs, or q/k/v
    gradients, travelling home), told apart by width (the split-kv case: in 4, out 2 heads
    forward; dout 2, grads 4 backward). `serial=True` waits at once when posting: the
    unpipelined schedule the order test must reject."""

    active = None

    def __init__(self, monkeypatch_target, serial=False):
        self.events, self.serial, self.mod = [], serial, monkeypatch_target

    def __enter__(self):
        mod, self.saved = self.mod, (self.mod.post, self.mod.group_kernel)
        real_post, real_kernel = self.saved
        rec = self

        def post(send, group):
            label = len([e for e in rec.events if e[0] == "post"])
            rec.events.append(("post", label, send.shape[3]))
            handle = real_post(send, group)
            if rec.serial:  # wait now; the layer's own wait() later is then a no-op
                rec.events.append(("wait", label, send.shape[3]))
                done = handle.wait()
                return type("Done", (), {"wait": lambda self: done})()

            class Handle:
                def wait(self):
                    rec.events.append(("wait", label, send.shape[3]))
                    return handle.wait()
            return Handle()

        def kernel(*args, **kw):
            inner = real_kernel(*args, **kw)

            class Logged:  # logs into whichever recorder is active when it runs
                def forward(self, *a):
                    Recorder.active.events.append(("kernel", None, None))
                    return inner.forward(*a)

                def backward(self, *a):
                    Recorder.active.events.append(("kernel", None, None))
                    return inner.backward(*a)
            return Logged()
        mod.post, mod.group_kernel = post, kernel
        Recorder.active = self
        return self

    def __exit__(self, *exc):
        self.mod.post, self.mod.group_kernel = self.saved


def overlapped(events, width_in, width_out) -> bool:
    """Every in-exchange but the first is posted before the previous group's kernel and waited
    after it; every out-exchange is waited after the next group's kernel (none exposed but the
    first in and the last out)."""
    kernels = [i for i, e in enumerate(events) if e[0] == "kernel"]
    where = {(e[0], e[1]): i for i, e in enumerate(events) if e[0] != "kernel"}
    ins = [e[1] for e in events if e[0] == "post" and e[2] == width_in]
    outs = [e[1] for e in events if e[0] == "post" and e[2] == width_out]
    if len(ins) != len(kernels) or len(outs) != len(kernels):
        return False
    ok = all(where["post", ins[g + 1]] < kernels[g] < where["wait", ins[g + 1]] for g in range(len(ins) - 1))
    return ok and all(where["post", outs[g]] < kernels[g + 1] < where["wait", outs[g]]
                      for g in range(len(outs) - 1))


class InFlight:
    """Wraps the pipeline's `post`: bytes of send + receive buffers of exchanges posted and not
    yet waited, and their high-water mark. (No class or closure per call: a cycle would keep
    the buffers alive until the garbage collector runs, and the peak would count them.)"""

    def __init__(self, real_post):
        self.real_post, self.live, self.high = real_post, 0, 0

    def post(self, send, group):
        return _Counted(self, self.real_post(send, group), 2 * send.nbytes)


class _Counted:
    def __init__(self, counter: InFlight, handle, size: int):
        self.counter, self.handle, self.size = counter, handle, size
        counter.live += size
        counter.high = max(counter.high, counter.live)

    def wait(self):
        self.counter.live -= self.size
        handle, self.handle = self.handle, None
        return handle.wait()


class Executed(TorchDispatchMode):
    """Counts all-to-alls that really run. Pushed before backward, it sits under the mode
    checkpointing pushes for its recomputation, so an exchange that mode replays from its
    cache never reaches it (CollectiveCounter counts Python calls, replayed or not)."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops._c10d_functional.all_to_all_single.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
