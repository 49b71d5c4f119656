"""This machine's own ceilings, measured at the start of every run: matmul FLOP/s per dtype and memory bandwidth.

Every model figure is read against these, not against a datasheet: the same run, the same load, the same library
build. A ceiling measured while other jobs held the cores is itself low, which keeps the ratios meaningful.
"""

from __future__ import annotations

import os
import platform

import torch

from qwenvl.demo import cpu_model

from .timing import measure


def machine_info() -> dict:
    """CPU model, core/thread counts, memory and library versions, plus the load when the run started."""
    import transformers

    memory_gib = None
    try:
        with open("/proc/meminfo") as f:
            memory_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default: spin, then sleep)"),
        "memory_gib": memory_gib,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def matmul_ceiling(dtype: torch.dtype, n: int, repeats: int) -> dict:
    """FLOP/s of one large square `torch.matmul` (2·n³ FLOPs) in `dtype`: the best this build does on this CPU."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    timing = measure(lambda: torch.matmul(a, b, out=out), repeats=repeats, warmup=2)
    flops = 2 * n**3
    return {"flops_per_s": flops / timing.median_s, "flops_per_cpu_s": flops / timing.cpu_s, "n": n,
            "timing": timing.to_dict()}


def bandwidth_ceiling(mib: int, repeats: int) -> dict:
    """Bytes/s of a large tensor copy, counting the read and the write (2 × size per copy).

    The buffer is far larger than the last-level cache, so this is DRAM bandwidth as a streaming kernel sees it.
    """
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), repeats=repeats, warmup=2)
    return {"bytes_per_s": 2 * src.numel() * 4 / timing.median_s, "mib": mib, "timing": timing.to_dict()}


def measure_ceilings(matmul_n: int, copy_mib: int, repeats: int) -> dict:
    fp32 = matmul_ceiling(torch.float32, matmul_n, repeats)
    # A CPU without bf16 kernels (AVX2 only) runs them 100x slower than fp32, single-threaded: a short probe tells,
    # and then a 512 product measures that path (no slower than a large one there) in seconds instead of a minute.
    probe = matmul_ceiling(torch.bfloat16, min(matmul_n, 256), 1)
    slow = probe["flops_per_s"] < fp32["flops_per_s"] / 4
    bf16 = matmul_ceiling(torch.bfloat16, min(matmul_n, 512), min(repeats, 3)) if slow else \
        matmul_ceiling(torch.bfloat16, matmul_n, repeats)
    return {"matmul_fp32": fp32, "matmul_bf16": bf16, "bandwidth": bandwidth_ceiling(copy_mib, repeats)}
