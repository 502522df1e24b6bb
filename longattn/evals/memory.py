"""Peak memory of a block of work: CUDA allocator peak on GPU, sampled resident set size on CPU."""
from __future__ import annotations

import ctypes
import threading

import psutil
import torch


class PeakMemory:
    """`with PeakMemory(device) as pm: ...; pm.peak_bytes` = peak above the level at entry.

    On CPU the process RSS is sampled every `interval` seconds in a background thread (torch's CPU allocator
    keeps no peak statistic) after freed heap pages are returned to the OS, so very short spikes can be
    missed; on CUDA the allocator's exact peak is used.
    """

    def __init__(self, device="cpu", interval: float = 0.005):
        self.device, self.interval = torch.device(device), interval
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()  # so that memory freed by earlier work does not hide this block's peak
            self._proc = psutil.Process()
            self._base = self._peak = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.peak_bytes = self._peak - self._base
        return False


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so RSS measures what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then keeps freed pages and the peak reads low
        pass
