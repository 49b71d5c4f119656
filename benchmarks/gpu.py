"""`python -m benchmarks.gpu`: training-step MFU and decode tokens/s of a ~1 B Qwen-VL-shaped model on one GPU.

Run by `benchmarks/gpu.sh` on a lent H100/H200 (bf16 autocast, FlashAttention-2 when `flash_attn` is installed, else
PyTorch SDPA, which uses its own flash kernel on Hopper). `--dry-run` runs the same code on the CPU with the `quick`
model and tiny shapes, so the script is exercised where no GPU is available.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from qwenvl.train import compile_regions

from . import flops
from .suite import load_config
from .timing import RssPeak, measure
from .workloads import Mode, TrainStep, build_model, prompt_batch, time_generate, train_batch

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (no sparsity), TFLOP/s, matched against the device name.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4))

GPU_FIELDS = ("name", "model", "train", "generate", "ceilings")
DRY_RUN_SHAPES = {
    "train": {"batch_size": 2, "seq_len": 64, "images_per_sample": 1, "repeats": 2, "warmup": 1,
              "compiled_batch_sizes": [2]},
    "generate": {"prompt_text_tokens": 8, "new_tokens": 8, "batch_sizes": [1, 2], "repeats": 1},
    "ceilings": {"matmul_n": 256, "copy_mib": 16, "repeats": 2},
}


def datasheet_peak(device_name: str) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def synchronized(fn, device: torch.device):
    """`fn` followed by a device synchronisation, so wall-clock timing covers the queued kernels."""

    def call():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


def attention_backend(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def ceilings(device: torch.device, matmul_n: int, copy_mib: int, repeats: int) -> dict:
    """bf16 matmul FLOP/s (2·n³ per call) and copy bandwidth (read + write bytes) on `device`."""
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    mm = measure(synchronized(lambda: a @ b, device), repeats=repeats, warmup=3)
    src = torch.ones(copy_mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    copy = measure(synchronized(lambda: dst.copy_(src), device), repeats=repeats, warmup=3)
    return {
        "matmul_bf16_flops_per_s": 2 * matmul_n**3 / mm.median_s,
        "bandwidth_bytes_per_s": 2 * src.numel() * 4 / copy.median_s,
        "matmul_timing": mm.to_dict(),
        "copy_timing": copy.to_dict(),
    }


def step_memory(step, device: torch.device) -> dict:
    """Bytes before one training step and at its peak: the allocator's figures on a GPU, RSS on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return {"before": before, "peak": torch.cuda.max_memory_allocated(device)}
    with RssPeak() as probe:
        step()
    return {"before": probe.start_bytes, "peak": probe.peak_bytes}


def train_figures(model, step, batch: dict, train: dict, peak: float | None, ceil: dict, device: torch.device) -> dict:
    """Time `step` (repeat-and-median after warm-up) and express it as samples/s, tokens/s and model FLOP/s."""
    batch_size = batch["input_ids"].shape[0]
    timing = measure(synchronized(step, device), repeats=train["repeats"], warmup=train["warmup"])
    shapes = flops.Shapes.from_config(model.config)
    work = flops.train_step_flops(shapes, batch_size, train["seq_len"], batch["pixel_values"].shape[0])
    achieved = work / timing.median_s
    return {
        "batch_size": batch_size,
        "seq_len": train["seq_len"],
        "timing": timing.to_dict(),
        "samples_per_s": batch_size / timing.median_s,
        "tokens_per_s": batch_size * train["seq_len"] / timing.median_s,
        "model_flops_per_step": work,
        "achieved_flops_per_s": achieved,
        "mfu_vs_datasheet": achieved / peak if peak else None,
        "fraction_of_measured_matmul_ceiling": achieved / ceil["matmul_bf16_flops_per_s"],
    }


def compiled_training(config: dict, mode: Mode, device: torch.device, peak: float | None, ceil: dict, log) -> dict:
    """The training step again on a fresh model with `compile_regions`, at each of `compiled_batch_sizes`.

    An out-of-memory batch size is recorded as such and the larger ones skipped.
    """
    train = config["train"]
    model = build_model(config["model"], device=device)
    started = time.perf_counter()
    compile_regions(model)
    figures = {}
    for batch_size in train.get("compiled_batch_sizes", [train["batch_size"]]):
        log(f"[gpu] compiled training step, batch {batch_size} ...")
        batch = train_batch(model.config, batch_size, train["seq_len"], train["images_per_sample"], device=device)
        try:
            step = TrainStep(model, mode, batch)
            synchronized(step, device)()  # compiles (the first batch size) or checks for a recompile
            if not figures:
                figures["compile_and_first_step_s"] = time.perf_counter() - started
            figures[f"b{batch_size}"] = train_figures(model, step, batch, train, peak, ceil, device)
        except torch.OutOfMemoryError:
            figures[f"b{batch_size}"] = "out of memory"
            break
        finally:
            step = batch = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return figures


def run(config: dict, device: torch.device, log) -> dict:
    backend = attention_backend(device)
    mode = Mode(f"{device.type}-bf16", backend, True, torch.bfloat16, True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    results = {"config": config["name"], "device": name, "attn_implementation": backend, "torch": torch.__version__}
    log(f"[gpu] {name}, attention {backend}")
    results["ceilings"] = ceil = ceilings(device, **config["ceilings"])
    peak = datasheet_peak(name)

    train = config["train"]
    model = build_model(config["model"], device=device)
    results["params"] = sum(p.numel() for p in model.parameters())
    batch_size = train["batch_size"]
    while True:  # one untimed step first: flash or memory failures surface here, not mid-measurement
        batch = train_batch(model.config, batch_size, train["seq_len"], train["images_per_sample"], device=device)
        try:
            step = TrainStep(model, mode, batch)
            synchronized(step, device)()
            break
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            step = batch = None
            torch.cuda.empty_cache()
            batch_size //= 2
            log(f"[gpu] out of memory; retrying with batch {batch_size}")
        except Exception as err:  # e.g. a flash_attn wheel built for another torch/CUDA: measure with SDPA instead
            if mode.attn_implementation == "sdpa":
                raise
            log(f"[gpu] {backend} failed ({type(err).__name__}: {err}); falling back to sdpa")
            results["attn_implementation"] = f"sdpa ({backend} failed: {type(err).__name__})"
            mode = Mode(mode.name, "sdpa", True, torch.bfloat16, True)
    log(f"[gpu] training step, batch {batch_size} ...")
    results["train"] = train_figures(model, step, batch, train, peak, ceil, device)
    log("[gpu] peak memory with and without checkpointing ...")
    memory = {"no_checkpointing": step_memory(step, device)}
    model.activation_checkpointing_enable()
    memory["checkpointing"] = step_memory(step, device)
    on, off = memory["checkpointing"], memory["no_checkpointing"]
    memory["peak_ratio"] = on["peak"] / off["peak"]
    off_increase = off["peak"] - off["before"]  # 0 on a CPU dry run, where glibc reuses the first step's heap
    memory["step_increase_ratio"] = (on["peak"] - on["before"]) / off_increase if off_increase > 0 else None
    results["memory_bytes"] = memory
    del step, batch
    model.activation_checkpointing_disable()

    gen = config["generate"]
    model = model.to(torch.bfloat16).eval()
    weight_bytes = flops.decode_weight_bytes(model)
    floor_step_s = weight_bytes / ceil["bandwidth_bytes_per_s"]
    results["decode"] = {"weight_bytes_per_step": weight_bytes, "floor_step_s": floor_step_s}
    for batch_size in gen["batch_sizes"]:
        log(f"[gpu] decode batch {batch_size} ...")
        prompt = prompt_batch(model.config, batch_size, gen["prompt_text_tokens"], device=device)
        t1, tn, forced = time_generate(model, prompt, gen["new_tokens"], True, gen["repeats"],
                                       wrap=lambda fn: synchronized(fn, device))
        step_s = max(tn.median_s - t1.median_s, 1e-9) / (gen["new_tokens"] - 1)
        results["decode"][f"b{batch_size}"] = {
            "prompt_len": prompt["input_ids"].shape[1],
            "new_tokens": gen["new_tokens"],
            "forced_length": forced,
            "prefill_tokens_per_s": batch_size * prompt["input_ids"].shape[1] / t1.median_s,
            "decode_tokens_per_s": batch_size / step_s,
            "step_over_floor": step_s / floor_step_s,
            "prefill": t1.to_dict(),
            "generate": tn.to_dict(),
        }
    del model
    results["train_compiled"] = compiled_training(config, mode, device, peak, ceil, log)
    return results


def format_table(results: dict) -> str:
    t, m, d, c = results["train"], results["memory_bytes"], results["decode"], results["ceilings"]
    mfu = f"{t['mfu_vs_datasheet']:.1%}" if t["mfu_vs_datasheet"] is not None else "n/a (unknown device)"
    lines = [
        f"{results['device']} | {results['params'] / 1e9:.2f} B params | attention {results['attn_implementation']}"
        f" | torch {results['torch']}",
        f"measured bf16 matmul ceiling   {c['matmul_bf16_flops_per_s'] / 1e12:8.1f} TFLOP/s",
        f"measured copy bandwidth        {c['bandwidth_bytes_per_s'] / 1e12:8.2f} TB/s",
        f"train step (batch {t['batch_size']} x {t['seq_len']})  {t['timing']['median_s'] * 1e3:8.1f} ms "
        f"±{t['timing']['noise_pct']:.0f}%  {t['tokens_per_s']:,.0f} tok/s  {t['samples_per_s']:.2f} samples/s",
        f"train model FLOP/s             {t['achieved_flops_per_s'] / 1e12:8.1f} TFLOP/s  MFU {mfu} of datasheet, "
        f"{t['fraction_of_measured_matmul_ceiling']:.1%} of measured matmul",
        f"peak memory GC off / on        {m['no_checkpointing']['peak'] / 2**30:8.2f} / "
        f"{m['checkpointing']['peak'] / 2**30:.2f} GiB (ratio {m['peak_ratio']:.2f}; step increase ratio "
        + (f"{m['step_increase_ratio']:.2f})" if m["step_increase_ratio"] is not None else "n/a)"),
    ]
    for key, r in results.get("train_compiled", {}).items():
        if not key.startswith("b"):
            continue
        if isinstance(r, str):
            lines.append(f"compiled train step, {key}: {r}")
            continue
        mfu = f"{r['mfu_vs_datasheet']:.1%}" if r["mfu_vs_datasheet"] is not None else "n/a"
        lines.append(f"compiled train (batch {r['batch_size']} x {r['seq_len']}) {r['timing']['median_s'] * 1e3:6.1f} ms "
                     f"±{r['timing']['noise_pct']:.0f}%  {r['tokens_per_s']:,.0f} tok/s  MFU {mfu} of datasheet, "
                     f"{r['fraction_of_measured_matmul_ceiling']:.1%} of measured matmul")
    for key in (k for k in d if k.startswith("b")):
        r = d[key]
        lines.append(f"decode {key:<4} {r['decode_tokens_per_s']:10.1f} tok/s  step {r['step_over_floor']:.1f}x the "
                     f"weight-bandwidth floor  prefill {r['prefill_tokens_per_s']:,.0f} tok/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, `quick` model, tiny shapes: exercise the code")
    parser.add_argument("--config", default="gpu_1b", help="config name or JSON path (default gpu_1b)")
    parser.add_argument("--json", type=Path, default=None, help="output file (default $OUT/gpu_bench.json if $OUT)")
    args = parser.parse_args(argv)

    if args.dry_run:
        config = {**load_config("quick"), **DRY_RUN_SHAPES, "name": "quick (dry run)"}
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("python -m benchmarks.gpu: error: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        config = load_config(args.config, required=GPU_FIELDS)
        device = torch.device("cuda")
    started = time.perf_counter()
    results = run(config, device, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    results["wall_s"] = time.perf_counter() - started
    print(format_table(results))
    path = args.json or (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
