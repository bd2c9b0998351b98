"""Anonymous resident memory of this process (Linux `/proc/self/status`), and its peak over a span.

Why RssAnon and not RSS: safetensors files are memory-mapped, and the pages of a mapped file a
process has read count in its RSS (as RssFile) although they are page cache the kernel can drop
at any time; RssAnon counts what the process itself allocated (tensors, buffers). Why sampled:
Linux keeps a peak of RSS (VmHWM) but not of RssAnon, and torch has no CPU allocator statistics
(docs/architecture.md §4), so `AnonPeak` polls RssAnon from a thread while a span of code runs.
A buffer that lives for less than one poll interval can be missed; a copy of a whole model,
built up over many tensors, cannot.
"""
from __future__ import annotations

import threading

STATUS = "/proc/self/status"


def rss_anon_bytes() -> int | None:
    """This process's RssAnon in bytes, or None where /proc does not report it (not Linux)."""
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024  # "RssAnon:   1234 kB"
    except OSError:
        return None
    return None


class AnonPeak:
    """`with AnonPeak() as m: work()` -> m.before, m.peak, m.after (bytes) and m.added (peak -
    before): RssAnon sampled every `interval_s` seconds from a daemon thread during the span."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.before = self.peak = self.after = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_anon_bytes() or 0)

    def __enter__(self) -> "AnonPeak":
        self.before = self.peak = rss_anon_bytes() or 0
        self._thread = threading.Thread(target=self._poll, name="rss-anon-poll", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.after = rss_anon_bytes() or 0
        self.peak = max(self.peak, self.after)

    @property
    def added(self) -> int:
        return self.peak - self.before
