"""Peak anonymous resident memory of this process, sampled in a thread (Linux only).

Used by ``benchmarks/speed.py`` and the store's memory test. Anonymous memory
(``RssAnon`` in ``/proc/self/status``) leaves out memory-mapped file pages, which the
operating system can drop: that is the memory an on-disk reference store must bound.
"""

from __future__ import annotations

import threading

__all__ = ["PeakAnon", "rss_anon_kb"]


def rss_anon_kb() -> int:
    """The process's anonymous resident memory (``RssAnon``) in KiB.

    Raises
    ------
    OSError
        If ``/proc/self/status`` has no ``RssAnon`` line (not Linux, or a kernel before
        4.5).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except FileNotFoundError as exc:
        raise OSError("peak memory needs /proc/self/status (Linux)") from exc
    raise OSError("no RssAnon line in /proc/self/status (Linux 4.5 or later needed)")


class PeakAnon:
    """Peak ``RssAnon`` above its level at entry, sampled every ``interval`` seconds.

    Use as ``with PeakAnon() as mem: ...``; afterwards ``mem.mb`` is the peak increase in
    MiB (``mem.base`` and ``mem.peak`` in KiB). The last sample is taken at exit, so a
    peak shorter than ``interval`` can be missed.

    Parameters
    ----------
    interval : float
        Seconds between samples (default 1 ms).
    """

    def __init__(self, interval: float = 0.001) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.interval = float(interval)
        self.base = self.peak = 0
        self.mb = 0.0

    def __enter__(self) -> PeakAnon:
        self.base = self.peak = rss_anon_kb()
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_anon_kb())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_kb())
        self.mb = (self.peak - self.base) / 1024
