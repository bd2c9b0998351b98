"""Polite stop: SIGTERM, SIGINT and SIGUSR1 end a run after the current step (on several ranks
the next one), with a checkpoint.

Why a flag and not an exception: a signal lands at an arbitrary point — inside a backward, a
collective or a save — and every rank must stop after the *same* step. So the handler only
records the request, and the loop asks `agree()` once per step. Ranks see a signal at different
moments (torchrun forwards it to its workers one after the other; a scheduler may signal only
some nodes), so `agree` takes the max of the request over the world group: if any rank was
asked, every rank stops. That is one all-reduce of one integer per step, posted without waiting
and read at the next step's `agree` (`step_stats.LaggedRead`): no rank waits for it, nor the
host for the device, so on several ranks a stop takes effect one step after the step in which
it was requested (one process needs no agreement: the step itself). The request carries the
signal number, so every rank can name the signal, even one that did not receive it.

A second SIGINT aborts at once (KeyboardInterrupt: Ctrl-C, Ctrl-C); a repeated SIGTERM/SIGUSR1 is
ignored, so a launcher that insists cannot cut the save short. Handlers can only be installed
from the main thread (elsewhere this is a no-op), and the previous ones come back on exit.
The handler itself does nothing but set an integer: printing there could re-enter a write the
main thread was in the middle of.
"""
from __future__ import annotations

import signal
import threading

import torch

from .step_stats import LaggedRead

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """Context manager owning the stop signals' handlers while the training loop runs."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.requested = 0  # signal number of the first stop request on this rank; 0 = none
        self._previous: dict[int, object] = {}
        self._agreement = LaggedRead()  # the all-reduce posted by the last `agree`

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:  # complete the last posted all-reduce (every rank posted it)
            self._agreement.take()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if not self.requested:
            self.requested = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now, without a save

    def agree(self, distributed: bool, device: torch.device) -> str | None:
        """The name of the signal that stops the run after this step, or None.

        When `distributed`: a collective over the world group (every rank must call it once per
        step) that posts this step's request and returns the one agreed at the previous call,
        so a stop comes one step after its request. Alone: this step's request."""
        signum = self.requested
        if distributed:
            agreed = self._agreement.take()
            flag = torch.tensor([signum], dtype=torch.int32).to(device, non_blocking=True)
            work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                                async_op=True)
            self._agreement.post(flag, work)
            signum = 0 if agreed is None else int(agreed[0])
        return signal.Signals(signum).name if signum else None
