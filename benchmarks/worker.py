"""Jobs that need a fresh process: training (so that its peak RSS belongs to it alone) and decode under another
OpenMP setting (libgomp reads its environment once, when torch loads).

`python -m benchmarks.worker '<json spec>'` prints one line `RESULT <json>`. The suite starts memory jobs with glibc's
mmap threshold pinned low, so freed activation buffers go back to the OS and RSS tracks live tensors (by default
glibc keeps freed blocks in its heap and RSS would only ever grow).
"""

from __future__ import annotations

import json
import math
import os
import sys

from .flops import Shapes, train_step_flops
from .timing import RssPeak, current_rss_bytes, measure, peak_rss_bytes
from .workloads import (
    MODES,
    TrainStep,
    build_model,
    decode_rates,
    inference_model,
    prompt_batch,
    train_batch,
)

MIB = 2**20

# Environment for memory jobs (see the module docstring).
MEMORY_JOB_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _setup(spec: dict) -> tuple[TrainStep, dict, int]:
    rss_runtime = current_rss_bytes()
    model = build_model(spec["model"], seed=spec.get("seed", 0))
    train = spec["train"]
    batch = train_batch(model.config, train["batch_size"], train["seq_len"], train["images_per_sample"])
    step = TrainStep(model, MODES[spec["mode"]], batch, checkpointing=spec.get("checkpointing", False),
                     chunked_loss=spec.get("chunked_loss", False))
    return step, batch, rss_runtime


def train_job(spec: dict) -> dict:
    """Throughput of the training step: median seconds per step, samples/s, tokens/s, model FLOP/s, peak RSS."""
    step, batch, rss_runtime = _setup(spec)
    train = spec["train"]
    losses = []
    # A compiled step compiles on its first call and may recompile once on the second (grads now exist).
    warmup = max(train["warmup"], 2) if step.mode.compiled_training else train["warmup"]
    timing = measure(lambda: losses.append(step()), repeats=train["repeats"], warmup=warmup)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite training loss in {spec['mode']} mode: {losses}")
    b, length = batch["input_ids"].shape
    flops = train_step_flops(Shapes.from_config(step.model.config), b, length, batch["pixel_values"].shape[0])
    return {
        "timing": timing.to_dict(),
        "samples_per_s": b / timing.median_s,
        "tokens_per_s": b * length / timing.median_s,
        "model_flops_per_step": flops,
        "achieved_flops_per_s": flops / timing.median_s,
        "achieved_flops_per_cpu_s": flops / timing.cpu_s,
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "runtime_rss_mib": rss_runtime / MIB,
        "loss_first_last": [losses[0], losses[-1]],
    }


def memory_job(spec: dict) -> dict:
    """Peak RSS of one training step once weights, gradients' owners and optimizer state exist (after one step)."""
    step, _, rss_runtime = _setup(spec)
    step()  # creates the AdamW state; set_to_none frees the gradients again
    with RssPeak() as probe:
        step()
    return {
        "checkpointing": spec.get("checkpointing", False),
        "chunked_loss": spec.get("chunked_loss", False),
        "rss_before_step_mib": probe.start_bytes / MIB,
        "peak_rss_mib": probe.peak_bytes / MIB,
        "step_increase_mib": probe.increase_bytes / MIB,
        "runtime_rss_mib": rss_runtime / MIB,
    }


def decode_job(spec: dict) -> dict:
    """`decode_rates` of `spec["mode"]` at batch `spec["batch"]` (`spec["compiled"]`: static cache, compiled decode
    steps), under this process's OpenMP environment."""
    gen = spec["generate"]
    model = inference_model(build_model(spec["model"], seed=spec.get("seed", 0)), MODES[spec["mode"]])
    prompt = prompt_batch(model.config, spec["batch"], gen["prompt_text_tokens"])
    compiled = spec.get("compiled", False)
    result = decode_rates(model, prompt, gen["new_tokens"], use_cache=True, repeats=gen["repeats"], compiled=compiled)
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    result["compiled"] = compiled
    return result


JOBS = {"train": train_job, "memory": memory_job, "decode": decode_job}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.worker '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    result = JOBS[spec["job"]](spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
