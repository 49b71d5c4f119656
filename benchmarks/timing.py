"""Repeat-and-median timing with warm-up, and memory probes.

The machine this suite runs on is shared and small, so every figure carries its own noise estimate and the share of
the CPU the process actually got while it was measured; a figure taken while other jobs held the cores says so.
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    """Seconds per call: the median over `repeats` timed calls after `warmup` untimed ones.

    `noise_pct` is half the min-max range relative to the median (so "12.3 s ± 4 %"). `cpu_s` is the mean process CPU
    time per call (all threads) and `cpu_share` that over wall time × torch threads: near 1.0 the process had the
    cores to itself; well below, other jobs competed for them and wall-clock figures are pessimistic. Rates per CPU
    second (work / `cpu_s`) are then the fairer comparison, since idle OpenMP threads sleep (`OMP_WAIT_POLICY=PASSIVE`).
    """

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    noise_pct: float
    cpu_s: float
    cpu_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Time `fn` `repeats` times after `warmup` calls; see `Timing`."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    cpu_start, wall_start = _cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    cpu_total, wall_total = _cpu_seconds() - cpu_start, time.perf_counter() - wall_start
    median = statistics.median(times)
    return Timing(
        median_s=median,
        min_s=min(times),
        max_s=max(times),
        repeats=repeats,
        noise_pct=100.0 * (max(times) - min(times)) / (2 * median),
        cpu_s=cpu_total / repeats,
        cpu_share=min(cpu_total / (wall_total * torch.get_num_threads()), 1.0),
    )


def current_rss_bytes() -> int:
    """Resident set size now (Linux `/proc/self/statm`)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image (`VmHWM`).

    Not `ru_maxrss`: a process started by `subprocess` inherits its parent's high-water mark through exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def reset_peak_rss() -> bool:
    """Restart `VmHWM` from the current RSS (Linux `clear_refs` 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssPeak:
    """Peak RSS while a block runs, and how far it rose above the RSS at entry.

    Uses the kernel's own high-water mark when it can be reset; otherwise samples RSS from a thread (torch kernels
    release the GIL, so the sampler keeps up, but a peak shorter than the interval can be missed).
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self._exact = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssPeak:
        self.start_bytes = self.peak_bytes = current_rss_bytes()
        self._exact = reset_peak_rss()
        if not self._exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._exact:
            self.peak_bytes = peak_rss_bytes()
        else:
            self._stop.set()
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    @property
    def increase_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes
