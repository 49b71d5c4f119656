"""One benchmark run: ceilings first, then every workload in the optimized and the reference mode, then ratios and
targets. The result is a JSON-able dict; `report.py` turns it into the table."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import flops
from .hardware import machine_info, measure_ceilings
from .timing import measure
from .worker import MEMORY_JOB_ENV
from .workloads import (
    PRECISIONS,
    REFERENCE,
    SDPA_BF16,
    SDPA_FP32,
    SDPA_FP32_FUSED,
    Mode,
    accuracy_check,
    build_model,
    decode_rates,
    inference_model,
    optimized_modes,
    prompt_batch,
    train_batch,
    vision_fn,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).resolve().parent / "configs"
SECTIONS = ("train", "memory", "generation", "vision", "reuse", "accuracy", "ablation")
DEFAULT_SECTIONS = SECTIONS[:-1]  # the ablation repeats the train and decode runs in intermediate modes: opt-in
REUSE_TURNS = 3  # the reuse section's context: the image, then 3 earlier user + assistant turns of prompt length


SUITE_FIELDS = ("name", "model", "train", "generate", "vision", "ceilings")


def load_config(name_or_path: str, required: tuple[str, ...] = SUITE_FIELDS) -> dict:
    """A config by name (`small`, `quick`, ... in benchmarks/configs) or by path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.json"))
        raise FileNotFoundError(f"benchmark config {name_or_path!r} not found (known: {known})")
    config = json.loads(path.read_text())
    for key in required:
        if key not in config:
            raise ValueError(f"{path}: missing top-level field {key!r}")
    return config


def run_worker(spec: dict, env: dict | None = None, unset: tuple[str, ...] = ()) -> dict:
    """Run one job of `benchmarks.worker` in a fresh interpreter (`env` added to ours, `unset` removed from it) and
    return its result."""
    child_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    for name in unset:
        child_env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
        cwd=REPO,
        env=child_env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark job {spec['job']}/{spec.get('mode')} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _dtype_name(dtype: torch.dtype) -> str:
    """How results name a dtype ("bfloat16", "float32"): JSON-able, and the key `_ceiling` reads."""
    return str(dtype).removeprefix("torch.")


def _ceiling(ceilings: dict, dtype: str, per: str = "s") -> float:
    """The matmul ceiling in `dtype` (a `_dtype_name`), in FLOP per wall second (`per="s"`) or per CPU second
    (`per="cpu_s"`)."""
    return ceilings["matmul_bf16" if dtype == "bfloat16" else "matmul_fp32"][f"flops_per_{per}"]


def _fractions(work: float, timing: dict, ceilings: dict, dtype: str) -> dict:
    """`work` FLOPs per call as a fraction of the ceiling: by wall clock, and per CPU second (contention-adjusted)."""
    return {
        "fraction_of_ceiling": work / timing["median_s"] / _ceiling(ceilings, dtype),
        "fraction_of_ceiling_cpu_time": work / timing["cpu_s"] / _ceiling(ceilings, dtype, "cpu_s"),
    }


def _train_job(config: dict, mode) -> dict:
    result = run_worker({"job": "train", "mode": mode.name, "model": config["model"], "train": config["train"]})
    result["ceiling_dtype"] = _dtype_name(mode.train_dtype)
    return result


def run_train(config: dict, optimized: Mode, compiled: Mode) -> dict:
    # Keyed by role, not mode name: "optimized" is the fp32 variant on a machine without fast bf16.
    out = {role: _train_job(config, mode)
           for role, mode in (("optimized", optimized), ("optimized-compiled", compiled), ("reference", REFERENCE))}
    out["speedup_tokens_per_s"] = out["optimized"]["tokens_per_s"] / out["reference"]["tokens_per_s"]
    out["compiled_speedup_tokens_per_s"] = out["optimized-compiled"]["tokens_per_s"] / out["optimized"]["tokens_per_s"]
    return out


def run_memory(config: dict, optimized: Mode) -> dict:
    """Peak memory of one training step with gradient checkpointing off and on, with the full logits (the ratios the
    targets judge) and again with the chunked loss (`enable_chunked_loss`, under `chunked_loss`).

    Each job is its own process and reads its own kernel high-water mark, so two run at a time: what one process
    holds does not show in the other's figures (only the wall time of the section changes)."""
    train = {**config["train"], "batch_size": config["train"].get("memory_batch_size", config["train"]["batch_size"])}
    out = {"batch_size": train["batch_size"], "seq_len": train["seq_len"], "mode": optimized.name}
    variants = [(chunked_loss, checkpointing) for chunked_loss in (False, True) for checkpointing in (False, True)]
    specs = [{"job": "memory", "mode": optimized.name, "model": config["model"], "train": train,
              "checkpointing": checkpointing, "chunked_loss": chunked_loss} for chunked_loss, checkpointing in variants]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(variants, pool.map(lambda spec: run_worker(spec, env=MEMORY_JOB_ENV), specs)))

    def pair(chunked_loss: bool) -> dict:
        on, off = results[(chunked_loss, True)], results[(chunked_loss, False)]
        return {"checkpointing": on, "no_checkpointing": off,
                "peak_rss_ratio": on["peak_rss_mib"] / off["peak_rss_mib"],
                "step_increase_ratio": on["step_increase_mib"] / off["step_increase_mib"]}

    out.update(pair(chunked_loss=False))
    out["chunked_loss"] = pair(chunked_loss=True)
    # Both savings against neither: what a user gets from turning them on together.
    out["both_over_neither_peak_rss_ratio"] = (
        out["chunked_loss"]["checkpointing"]["peak_rss_mib"] / out["no_checkpointing"]["peak_rss_mib"]
    )
    return out


def run_generation(config: dict, optimized: Mode) -> dict:
    gen = config["generate"]
    out = {"optimized": {}, "reference": {}}

    model = inference_model(build_model(config["model"]), optimized)
    shapes = flops.Shapes.from_config(model.config)
    weight_bytes = flops.decode_weight_bytes(model)
    for batch in gen["batch_sizes"]:
        prompt = prompt_batch(model.config, batch, gen["prompt_text_tokens"])
        result = decode_rates(model, prompt, gen["new_tokens"], use_cache=True, repeats=gen["repeats"])
        result["prefill_model_flops"] = flops.prefill_flops(shapes, batch, result["prompt_len"], images=batch)
        result["ceiling_dtype"] = _dtype_name(optimized.inference_dtype)
        out["optimized"][f"b{batch}"] = result
    b1 = out["optimized"]["b1"]
    out["weight_bytes_per_step"] = weight_bytes
    out["kv_cache_bytes_at_end_b1"] = flops.kv_cache_bytes(
        shapes, 1, b1["prompt_len"] + gen["new_tokens"], torch.finfo(optimized.inference_dtype).bits // 8)
    del model
    gc.collect()
    # The same decode in a fresh process with libgomp's default waiting (spin, then sleep), as a user gets it without
    # OMP_WAIT_POLICY: on an idle host it is the faster setting for decode's many small kernels (optimisation 13).
    out["b1_default_wait"] = run_worker({"job": "decode", "mode": optimized.name, "model": config["model"],
                                         "generate": gen, "batch": 1},
                                        unset=("OMP_WAIT_POLICY",))
    # ... and with a static cache and compiled decode steps (`qwenvl.inference.compiled_decode_config`), which fuse
    # the step's small kernels: what the floor target calls for (optimisation 17).
    out["b1_compiled"] = run_worker({"job": "decode", "mode": optimized.name, "model": config["model"],
                                     "generate": gen, "batch": 1, "compiled": True}, unset=("OMP_WAIT_POLICY",))

    model = inference_model(build_model(config["model"]), REFERENCE)
    prompt = prompt_batch(model.config, 1, gen["prompt_text_tokens"])
    repeats = gen.get("reference_repeats", gen["repeats"])
    out["reference"]["b1_no_cache"] = decode_rates(model, prompt, gen["new_tokens"], use_cache=False, repeats=repeats)
    # Same precision and backend with the cache on: separates the cache's share of the speed-up from bf16 + SDPA.
    out["reference"]["b1_cache"] = decode_rates(model, prompt, gen["new_tokens"], use_cache=True,
                                                repeats=gen["repeats"])
    del model
    gc.collect()

    no_cache, cached = out["reference"]["b1_no_cache"], out["reference"]["b1_cache"]
    out["kv_cache_speedup_b1"] = b1["decode_tokens_per_s"] / no_cache["decode_tokens_per_s"]
    out["kv_cache_speedup_b1_cpu_time"] = b1["decode_tokens_per_cpu_s"] / no_cache["decode_tokens_per_cpu_s"]
    out["kv_cache_speedup_b1_same_precision"] = cached["decode_tokens_per_s"] / no_cache["decode_tokens_per_s"]
    out["prefill_speedup_b1"] = b1["prefill_tokens_per_s"] / out["reference"]["b1_no_cache"]["prefill_tokens_per_s"]
    return out


def run_vision(config: dict, optimized: Mode) -> dict:
    vis = config["vision"]
    out = {}
    for role, mode in (("optimized", optimized), ("reference", REFERENCE)):
        model = inference_model(build_model(config["model"]), mode)
        pixels = prompt_batch(model.config, vis["batch_size"], 1)["pixel_values"]
        timing = measure(vision_fn(model, pixels), repeats=vis["repeats"], warmup=vis["warmup"])
        work = flops.vision_flops(flops.Shapes.from_config(model.config), vis["batch_size"])
        out[role] = {
            "batch_size": vis["batch_size"],
            "timing": timing.to_dict(),
            "images_per_s": vis["batch_size"] / timing.median_s,
            "model_flops": work,
            "ceiling_dtype": _dtype_name(mode.inference_dtype),
        }
        del model
        gc.collect()
    out["speedup"] = out["optimized"]["images_per_s"] / out["reference"]["images_per_s"]
    return out


def run_reuse(config: dict, optimized: Mode) -> dict:
    """A later chat turn's prefill with the image re-encoded (as the release does every turn) vs features reused."""
    gen = config["generate"]
    model = inference_model(build_model(config["model"]), optimized)
    prompt = prompt_batch(model.config, 1, REUSE_TURNS * 2 * gen["prompt_text_tokens"])
    features = vision_fn(model, prompt["pixel_values"])()
    text = {"input_ids": prompt["input_ids"], "attention_mask": prompt["attention_mask"], "use_cache": False,
            "logits_to_keep": 1}
    pixels = prompt["pixel_values"].to(optimized.inference_dtype)

    @torch.inference_mode()
    def reencode():
        return model(**text, pixel_values=pixels)

    @torch.inference_mode()
    def reuse():
        return model(**text, image_features=features)

    t_reencode = measure(reencode, repeats=gen["repeats"], warmup=1)
    t_reuse = measure(reuse, repeats=gen["repeats"], warmup=1)
    return {
        "context_len": prompt["input_ids"].shape[1],
        "reencode": t_reencode.to_dict(),
        "reuse": t_reuse.to_dict(),
        "speedup": t_reencode.median_s / t_reuse.median_s,
    }


def run_ablation(config: dict, optimized: Mode) -> dict:
    """The modes between reference and optimized, one change at a time (RESULTS.md's optimisation history).

    Training: eager fp32 → SDPA fp32 → + fused AdamW → + bf16 autocast (= optimized). Decode at batch 1 with the
    cache: eager fp32 → SDPA fp32 → bf16 weights → packed weights (= optimized); the no-cache step is in the
    generation section. Where the optimized mode is fp32, the chains end at fused AdamW and at SDPA.
    """
    bf16 = optimized.train_autocast
    out = {"train": {mode.name: _train_job(config, mode) for mode in (SDPA_FP32, SDPA_FP32_FUSED)}}
    gen = config["generate"]
    out["decode_b1"] = {}
    for mode in (SDPA_FP32, SDPA_BF16) if bf16 else (SDPA_FP32,):
        model = inference_model(build_model(config["model"]), mode)
        prompt = prompt_batch(model.config, 1, gen["prompt_text_tokens"])
        out["decode_b1"][mode.name] = decode_rates(model, prompt, gen["new_tokens"], use_cache=True,
                                                   repeats=gen["repeats"])
        del model
        gc.collect()
    return out


def run_accuracy(config: dict) -> dict:
    model_kwargs = config["model"]
    probe = build_model(model_kwargs).config
    train = config["train"]
    batch = train_batch(probe, 1, min(train["seq_len"], 256), train["images_per_sample"], seed=1)
    prompt = prompt_batch(probe, 2, config["generate"]["prompt_text_tokens"], seed=1)
    return accuracy_check(model_kwargs, batch, prompt)


def model_summary(config: dict) -> dict:
    with torch.device("meta"):
        model = build_model(config["model"])
    visual = model.transformer.visual
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    adapter = count(visual.attn_pool) + count(visual.ln_post) + visual.proj.numel()
    return {
        "total_params": count(model),
        "llm_params": count(model) - count(visual),
        "vit_params": count(visual) - adapter,
        "adapter_params": adapter,
        "shapes": vars(flops.Shapes.from_config(model.config)),
    }


def run_suite(config: dict, sections: tuple[str, ...] = DEFAULT_SECTIONS, log=print, precision: str = "auto") -> dict:
    """`precision`: the optimized mode's, "bf16", "fp32", or "auto" (bf16 where the measured ceilings say its matmuls
    are faster than fp32 ones; not on an AVX2-only CPU, which has no bf16 kernels)."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; known: {list(SECTIONS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    started = time.perf_counter()
    results: dict = {"config": config["name"], "machine": machine_info(), "model": model_summary(config)}
    log(f"[bench] config {config['name']}: {results['model']['total_params'] / 1e6:.1f} M parameters")
    log("[bench] ceilings ...")
    ceilings = results["ceilings_start"] = measure_ceilings(**config["ceilings"])
    speedup = ceilings["matmul_bf16"]["flops_per_s"] / ceilings["matmul_fp32"]["flops_per_s"]
    optimized, compiled = optimized_modes(precision, speedup)
    results["optimized_mode"] = {"name": optimized.name, "precision": precision, "bf16_matmul_speedup": speedup,
                                 "train_dtype": _dtype_name(optimized.train_dtype),
                                 "inference_dtype": _dtype_name(optimized.inference_dtype)}
    log(f"[bench] optimized mode: {optimized.name} (bf16 matmuls {speedup:.3g}x fp32, precision {precision})")
    runners = {
        "train": lambda: run_train(config, optimized, compiled),
        "memory": lambda: run_memory(config, optimized),
        "generation": lambda: run_generation(config, optimized),
        "vision": lambda: run_vision(config, optimized),
        "reuse": lambda: run_reuse(config, optimized),
        # bf16's error against fp32: nothing to measure where the optimized mode does not use bf16.
        "accuracy": lambda: run_accuracy(config) if optimized.train_autocast else {
            "skipped": f"the optimized mode is {optimized.name} on this machine (bf16 matmuls {speedup:.3g}x fp32)"},
        "ablation": lambda: run_ablation(config, optimized),
    }
    for name in SECTIONS:
        if name in sections:
            log(f"[bench] {name} ...")
            t0 = time.perf_counter()
            results[name] = runners[name]()
            log(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s")
    log("[bench] ceilings again ...")
    results["ceilings_end"] = measure_ceilings(**config["ceilings"])
    results["ceilings"] = best_ceilings(results["ceilings_start"], results["ceilings_end"])
    derive_figures(results)
    results["targets"] = evaluate_targets(results)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = time.perf_counter() - started
    return results


def best_ceilings(start: dict, end: dict) -> dict:
    """Each ceiling's better measurement, from the start or the end of the run (tagged `measured`).

    A shared host's speed drifts: on the AVX2 host one start-of-run fp32 matmul gave 82 GFLOP/s, the training step
    then ran at 85 and the same matmul at 121-151 minutes later. A ceiling is what the machine can do, so the best
    of the two stands, and the fractions below it are not flattered by a slow moment."""
    best = {}
    for key in start:
        rate = "bytes_per_s" if key == "bandwidth" else "flops_per_s"
        later = end[key][rate] > start[key][rate]
        best[key] = {**(end if later else start)[key], "measured": "end" if later else "start"}
    return best


def derive_figures(results: dict) -> None:
    """Everything relative to a ceiling, computed once the run's best ceilings are known: fractions of the matmul
    ceiling (training, prefill, vision) and the decode weight-bandwidth floor."""
    ceilings = results["ceilings"]
    for section in (results.get("train", {}), results.get("ablation", {}).get("train", {})):
        for result in section.values():
            if isinstance(result, dict) and "model_flops_per_step" in result:
                result.update(_fractions(result["model_flops_per_step"], result["timing"], ceilings,
                                         result["ceiling_dtype"]))
    for result in results.get("vision", {}).values():
        if isinstance(result, dict) and "model_flops" in result:
            result.update(_fractions(result["model_flops"], result["timing"], ceilings, result["ceiling_dtype"]))
    gen = results.get("generation")
    if gen:
        for result in gen["optimized"].values():
            fractions = _fractions(result["prefill_model_flops"], result["prefill"], ceilings, result["ceiling_dtype"])
            result.update({f"prefill_{k}": v for k, v in fractions.items()})
        floor_step_s = gen["weight_bytes_per_step"] / ceilings["bandwidth"]["bytes_per_s"]
        gen["floor_step_s"] = floor_step_s
        gen["floor_b1_tokens_per_s"] = 1 / floor_step_s
        gen["b1_step_over_floor"] = gen["optimized"]["b1"]["decode_step_s"] / floor_step_s
        for key in ("b1_default_wait", "b1_compiled"):
            if key in gen:
                gen[f"{key}_step_over_floor"] = gen[key]["decode_step_s"] / floor_step_s


def evaluate_targets(results: dict) -> list[dict]:
    """The issue's CPU targets, each with the measured value and whether it is met (judged by wall clock; the
    per-CPU-second value, where given, shows what contention from other jobs took away)."""
    targets = []

    def add(name: str, goal: str, value: float, met: bool, value_cpu_time: float | None = None) -> None:
        target = {"target": name, "goal": goal, "value": round(value, 4), "met": bool(met)}
        if value_cpu_time is not None:
            target["value_cpu_time"] = round(value_cpu_time, 4)
        targets.append(target)

    if "train" in results:
        for mode, label in (("optimized", ""), ("optimized-compiled", ", blocks compiled")):
            if mode in results["train"]:
                o = results["train"][mode]
                dtype = {"bfloat16": "bf16", "float32": "fp32"}[o["ceiling_dtype"]]
                add(f"training step model FLOP/s vs {dtype} matmul ceiling{label}", ">= 0.40",
                    o["fraction_of_ceiling"],
                    o["fraction_of_ceiling"] >= 0.40, o["fraction_of_ceiling_cpu_time"])
    if "generation" in results:
        gen = results["generation"]
        add("decode b1 step time vs weight-bandwidth floor", "<= 2.0", gen["b1_step_over_floor"],
            gen["b1_step_over_floor"] <= 2.0)
        if "b1_default_wait_step_over_floor" in gen:
            ratio = gen["b1_default_wait_step_over_floor"]
            add("decode b1 step time vs weight-bandwidth floor, libgomp default waiting", "<= 2.0", ratio, ratio <= 2.0)
        if "b1_compiled_step_over_floor" in gen:
            ratio = gen["b1_compiled_step_over_floor"]
            add("decode b1 step time vs weight-bandwidth floor, compiled decode steps (default waiting)", "<= 2.0",
                ratio, ratio <= 2.0)
        new_tokens = gen["optimized"]["b1"]["new_tokens"]
        speedup = gen["kv_cache_speedup_b1"]
        add(f"KV-cache decode vs no-cache reference (b1, {new_tokens} new tokens)", ">= 5.0", speedup,
            speedup >= 5.0, gen["kv_cache_speedup_b1_cpu_time"])
    if "memory" in results:
        mem = results["memory"]
        add("checkpointing: step memory (peak over resident state) ratio", "<= 0.50", mem["step_increase_ratio"],
            mem["step_increase_ratio"] <= 0.5)
        add("checkpointing: whole-process peak RSS ratio", "<= 0.50", mem["peak_rss_ratio"],
            mem["peak_rss_ratio"] <= 0.5)
        if "chunked_loss" in mem:
            ratio = mem["chunked_loss"]["peak_rss_ratio"]
            add("checkpointing: whole-process peak RSS ratio, chunked loss in both runs", "<= 0.50", ratio,
                ratio <= 0.5)
    return targets
