"""Helpers shared by the benchmark scripts: timing, tables, JSON output."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import threading
import time
import contextlib
from contextlib import contextmanager

import torch

from scalekd import storage
from scalekd.train.memory_format import cpu_model, isa

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class PhaseClock:
    """A ``phase(name)`` context manager that accumulates wall time per name (synchronising CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class PeakMemory:
    """Peak memory over a ``with`` block, in MB above what was in use when it began.

    CUDA: the allocator's own peak. CPU: the process's resident set, sampled every millisecond from
    /proc after glibc's malloc_trim, so memory freed before the block does not hide what it allocates."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = self._peak
        self.peak_mb = (peak - self._base) / 2**20
        return False

    def _sample(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _rss_bytes())


def _release_freed_memory() -> None:
    """Hand memory freed by earlier rows back to the OS, so this row's RSS starts from what is live."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: the baseline then includes memory the allocator kept
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine() -> dict:
    """The machine a result was measured on; ``numerics()``'s fields among them."""
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "cpu": cpu_model(), **numerics()}


def numerics() -> dict:
    """What decides a run's floating-point results beside its config and seed: the torch build, its thread count,
    the vector ISA its kernels dispatch on (ATen's capability, oneDNN's ISA) and the device. A seeded run repeats to
    the last digit only where these agree: on a 2-core AVX2 EPYC an FCOS warm student came
    out at AP_S 58.16, where the AVX-512 EPYC that trained it had 61.19, from the same code and seed."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "isa": isa(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        f.write(storage.json_text({"machine": machine(), **payload}, indent=2))
    return path
