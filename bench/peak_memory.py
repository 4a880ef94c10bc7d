"""Peak memory of a phase above its starting level: CUDA allocator statistics, or the process's
RSS sampled every 1 ms on CPU. Shared by bench_moe.py and scripts/quality_table.py.

    with PeakMemory("cpu") as pm:
        work()
    pm.peak  # bytes
"""

from __future__ import annotations

import gc
import os
import threading
import time

import torch


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or RSS sampled every 1 ms."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        _trim_heap()  # memory freed by the previous phase must not hide this phase's peak
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self.top, self.stop = self.rss(), self.rss(), False
            self.t = threading.Thread(target=self._sample, daemon=True)
            self.t.start()
        return self

    def _sample(self):
        while not self.stop:
            self.top = max(self.top, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.t.join()
            self.peak = max(self.top, self.rss()) - self.base
        return False


def _trim_heap():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
