"""Whether bf16 pays off on this machine: measured, because CPUs differ by two orders of magnitude.

An Intel Xeon with AMX runs bf16 matmuls ~6x faster than fp32 and an AMD Zen 4 exposing AVX512-BF16 ~2x faster, but
a CPU with only AVX2 (or a guest whose hypervisor hides AVX-512) has no bf16 kernels: oneDNN falls back to a
reference path ~70x *slower* than fp32 (2 GFLOP/s against 140 on a 2-vCPU AMD EPYC guest). A recipe that trains in
bf16 autocast on the first kind of machine would take hours on the last, so the choice is made from a measurement.
"""

from __future__ import annotations

import functools
import time

import torch

# bf16 autocast also adds casts around every matmul and norm: it only pays where its matmuls are clearly faster.
MIN_BF16_SPEEDUP = 1.25
# 268 MFLOP per product: large enough that thread start-up does not hide a fast path, ~0.5 s in all on a slow one.
_PROBE_SIZE = 512


def _matmul_seconds(dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=generator).to(device=device, dtype=dtype) for _ in "ab")
    torch.matmul(a, b)  # first call: kernel selection, allocations
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


@functools.lru_cache(maxsize=8)
def bf16_matmul_speedup(device: str | torch.device = "cpu") -> float:
    """bf16 matmul throughput over fp32's on `device` (> 1: bf16 is faster), from a small timed product, cached per
    process. 0.0 where the device has no bf16 matmul at all."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return 0.0
    try:
        bf16 = _matmul_seconds(torch.bfloat16, device)
    except RuntimeError:
        return 0.0
    return _matmul_seconds(torch.float32, device) / bf16


def bf16_pays_off(device: str | torch.device = "cpu", min_speedup: float = MIN_BF16_SPEEDUP) -> bool:
    """True where bf16 matmuls run at least `min_speedup` times as fast as fp32 ones on `device`."""
    return bf16_matmul_speedup(device) >= min_speedup


def slow_bf16_warning(device: str | torch.device = "cpu") -> str | None:
    """What to tell someone who asked for bf16 on `device` where it does not pay off; None where it does."""
    if bf16_pays_off(device):
        return None
    return (f"bf16 matmuls run at {bf16_matmul_speedup(device):.2g}x the speed of fp32 ones on this {device} (no "
            "bf16 kernels: e.g. AVX2 without AVX-512): training in bf16 will be slower than in fp32")


def resolve_bf16(setting: bool | str, device: str | torch.device = "cpu") -> bool:
    """A recipe's `bf16` value: `True`/`False` as given, `"auto"` where `bf16_pays_off(device)`."""
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return bf16_pays_off(device)
    raise ValueError(f"bf16 must be true, false or \"auto\", got {setting!r}")
