"""`run_distributed`: run a function on N freshly spawned gloo ranks and return their results.

Process start is the expensive part (torch import ~1.3 s, a 4-rank gloo start ~3.5 s on the
2-core CI machines), so a test should spawn once and let `fn` run many sub-cases, returning a
dict of results that the parent asserts on (see tests/parallel/test_ulysses.py).

Failure behaviour, which is the point of the helper:
- an exception on any rank is re-raised in the parent (same type when it can be pickled) with
  that rank's traceback text attached as its cause;
- a rank that dies without reporting (segfault, `os._exit`) or a job past `timeout` fails the
  test; the other ranks are killed, never left behind;
- the process group gets `timeout` too, so ranks blocked on a dead peer error out instead of
  hanging in a collective.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import time
import traceback
from collections import Counter
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HOST = "127.0.0.1"
_ERROR_GRACE_S = 1.0  # after a rank's error, time to notice a peer that died silently


class RemoteTraceback(Exception):
    """Carries a rank's formatted traceback; shown by pytest as the cause of the re-raise."""

    def __str__(self) -> str:
        return self.args[0]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
                    threads: int | None = 1) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned ranks of a gloo process group.

    `fn` must be a module-level (picklable) function; its return value must be picklable (move
    tensors to CPU). Returns the per-rank return values, indexed by rank. `threads` sets
    OMP_NUM_THREADS and torch's intra-op threads in the children (None: leave them alone);
    one thread each keeps N ranks from oversubscribing a 2-core machine.
    """
    ctx = mp.get_context("spawn")
    # The parent owns the rendezvous store: binding port 0 here picks a free port atomically
    # (no race between "find a free port" and the children binding it).
    store = dist.TCPStore(_HOST, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    results = ctx.Queue()
    procs = []
    saved_env = os.environ.get("OMP_NUM_THREADS")
    try:
        if threads is not None:  # read by OpenMP when the child imports torch: set before spawn
            os.environ["OMP_NUM_THREADS"] = str(threads)
        for rank in range(world_size):
            proc = ctx.Process(target=_worker, args=(rank, world_size, store.port, timeout, threads,
                                                     results, fn, args), daemon=True)
            proc.start()
            procs.append(proc)
    finally:
        _restore_env("OMP_NUM_THREADS", saved_env)
    ok = False
    try:
        values = _collect(procs, results, world_size, timeout)
        ok = True
        return values
    finally:
        for proc in procs:  # only our own children, by handle
            if ok:  # they are past their report: let them tear down their process group
                proc.join(timeout=10)
            if proc.is_alive():  # a failure, or a rank stuck in teardown
                proc.kill()
                proc.join(timeout=5)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _worker(rank: int, world_size: int, port: int, timeout: float, threads: int | None,
            results, fn: Callable[..., Any], args: tuple) -> None:
    """Child entry: join the process group, run `fn`, report ("ok", value) or ("error", ...)."""
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        store = dist.TCPStore(_HOST, port, world_size, is_master=False,
                              timeout=timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        # Pickle here, not in the queue's feeder thread, where a failure would be lost silently.
        results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException as exc:  # report everything, including KeyboardInterrupt/SystemExit
        text = traceback.format_exc()
        try:
            payload = pickle.dumps(exc)
            pickle.loads(payload)  # some exceptions pickle but cannot be rebuilt
        except Exception:
            payload = None  # the parent raises a RuntimeError with the text instead
        results.put((rank, "error", (payload, text)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(procs, results, world_size: int, timeout: float) -> list[Any]:
    """Wait for one report per rank; raise on an error, a silent death or the deadline.

    Which failure is reported: a rank that died without a report is a root cause (a rank that
    merely lost its peer still reports its error), so it wins; otherwise the first error received,
    after a short grace period in which a silent death can still show up.
    """
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    first_error, error_seen_at = None, 0.0
    reported: set[int] = set()
    while len(reported) < world_size:
        try:
            rank, status, payload = results.get(timeout=0.1)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
            # A rank may exit right after putting its report: look again before blaming it.
            if dead and results.empty():
                raise RuntimeError(f"rank {dead[0]} died without reporting "
                                   f"(exit code {procs[dead[0]].exitcode})") from None
            if first_error is not None and time.monotonic() > error_seen_at + _ERROR_GRACE_S:
                break
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - reported)
                raise TimeoutError(f"run_distributed: ranks {missing} did not finish within "
                                   f"{timeout} s") from None
            continue
        reported.add(rank)
        if status == "ok":
            values[rank] = pickle.loads(payload)
        elif first_error is None:
            first_error, error_seen_at = (rank, payload), time.monotonic()
    if first_error is not None:
        rank, (exc_bytes, text) = first_error
        cause = RemoteTraceback(f"\n--- rank {rank} traceback ---\n{text}")
        if exc_bytes is None:
            raise RuntimeError(f"rank {rank} failed") from cause
        raise pickle.loads(exc_bytes) from cause
    return [values[r] for r in range(world_size)]


def block_group(size: int) -> dist.ProcessGroup:
    """This rank's group when the world is cut into consecutive blocks of `size` ranks.

    Collective: every rank must call it with the same `size` (`new_group` is collective even for
    ranks outside the new group). Lets one spawn test P = world, world/2, ..., 1 at once, and
    tests code paths where group rank != global rank.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if size == world:
        return dist.group.WORLD
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


class CollectiveCounter:
    """Counts functional collectives issued while active, by op name ({"all_to_all_single": 2}).

    A context manager that wraps the ops on `torch.ops._c10d_functional` — what our comm layer
    calls in forward and what their registered autograd formulas call in backward — so both
    directions are counted. Why not a TorchDispatchMode / torch's CommDebugMode: under a Python
    dispatch mode the first `reshape` imports torch._dynamo (2-6 s per spawned rank on 2 cores).
    Not counted: `dist.*` calls (they do not go through `torch.ops` in Python).
    """

    OPS = ("all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce",
           "all_reduce_coalesced", "broadcast")

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> "CollectiveCounter":
        namespace = torch.ops._c10d_functional
        for name in self.OPS:
            original = getattr(namespace, name, None)
            if original is None:
                continue
            self._saved[name] = original
            setattr(namespace, name, self._counting(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.ops._c10d_functional, name, original)
        self._saved.clear()

    def _counting(self, name: str, op: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return op(*args, **kwargs)
        return counted

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def sp_gpt_errors(group, cfg, ids, positions, labels, attn_mask=None) -> dict[str, float]:
    """Relative errors of a GPT with `UlyssesAttention` on this rank's sequence slice against the
    plain GPT on the whole sequence: the summed loss and every summed gradient.

    ids/positions/labels are the global (B, S) tensors (positions already global); the slice is
    this rank's S/P consecutive columns. Both models get torch's seeded default init, copied
    (init_weights would do too, but imports the DTensor stack: ~1 s per spawned rank).
    """
    from support.common import rel_err
    from ulysses_train.model import GPT, sdpa_attention
    from ulysses_train.parallel import UlyssesAttention

    p, r = dist.get_world_size(group), dist.get_rank(group)
    seq = ids.shape[1]
    torch.manual_seed(0)
    models = [GPT(cfg), GPT(cfg, attention_fn=UlyssesAttention(sdpa_attention, group))]
    models[1].load_state_dict(models[0].state_dict())
    mine = slice(r * seq // p, (r + 1) * seq // p)
    losses = []
    for model, part in zip(models, (slice(None), mine)):
        loss_sum, _ = model(ids[:, part], positions[:, part], labels[:, part], attn_mask=attn_mask)
        loss_sum.backward()
        losses.append(loss_sum.detach())
    dist.all_reduce(losses[1], group=group)  # token sums add up over the sequence slices
    errors = {"loss": rel_err(losses[1], losses[0])}
    for (name, ref), sp in zip(models[0].named_parameters(), models[1].parameters()):
        # each rank saw different tokens: sum (docs/architecture.md §1)
        dist.all_reduce(sp.grad, group=group)
        errors[name] = rel_err(sp.grad, ref.grad)
    return errors
