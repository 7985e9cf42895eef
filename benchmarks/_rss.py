"""Peak anonymous memory of this process (the heap: numpy, torch, GDAL buffers), sampled
from /proc/self/status every 20 ms. ``ru_maxrss`` also counts the pages of shared
libraries that happen to be resident (torch's are several GB), which varies from run to
run; RssAnon does not."""
from __future__ import annotations

import threading
import time


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler:
    """``with PeakSampler() as p: ...`` then ``p.peak_mb`` (and ``p.start_mb``)."""

    def __init__(self, every_s: float = 0.02):
        self.every_s, self.peak_mb, self.start_mb = every_s, 0.0, 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_anon_mb())
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakSampler":
        self.start_mb = self.peak_mb = rss_anon_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_anon_mb())
