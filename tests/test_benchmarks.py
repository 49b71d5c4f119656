"""The benchmark suite: its FLOP formulas, its measuring tools, its verdicts, and one end-to-end run.

The speed figures themselves are not asserted (they depend on the machine and its load); what is asserted is that
the suite measures what it claims, writes every figure the issue asks for, and computes its ratios consistently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_config_kwargs
from qwenvl.modeling_qwenvl import _cpu_can_pack_bf16_linear, pack_linear_weights_for_cpu

REPO = Path(__file__).resolve().parents[1]
# `benchmarks/` is run from the repository root (`python -m benchmarks`), not installed; plain `pytest` needs the root.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import flops  # noqa: E402
from benchmarks.report import format_table  # noqa: E402
from benchmarks.suite import best_ceilings, evaluate_targets, load_config  # noqa: E402
from benchmarks.timing import RssPeak, measure  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    REFERENCE,
    GenerateCall,
    TrainStep,
    build_model,
    decode_rates,
    optimized_modes,
    prompt_batch,
    time_generate,
    train_batch,
)


def tiny_eager_model():
    model = build_model(tiny_config_kwargs())
    model.set_attn_implementation("eager")  # every matmul, attention included, visible to the FLOP counter
    return model


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def causal_pairs_skipped(s: flops.Shapes, seq_len: int) -> int:
    """Eager attention multiplies the full L×L score matrix; the formulas count only the L(L+1)/2 pairs a causal mask
    keeps, as a causal kernel computes them."""
    return s.layers * 4 * s.d * (seq_len * seq_len - seq_len * (seq_len + 1) // 2)


# --------------------------------------------------------------------------------------------------------------
# FLOP formulas agree with PyTorch's own FLOP counter
# --------------------------------------------------------------------------------------------------------------


def test_vision_flops_match_the_flop_counter():
    model = tiny_eager_model()
    shapes = flops.Shapes.from_config(model.config)
    pixels = prompt_batch(model.config, 3, 5)["pixel_values"]

    with torch.no_grad():
        counted = counted_flops(lambda: model.get_image_features(pixels))

    assert counted == flops.vision_flops(shapes, images=3)


def test_prefill_flops_match_the_flop_counter_up_to_causal_masking():
    model = tiny_eager_model()
    shapes = flops.Shapes.from_config(model.config)
    prompt = prompt_batch(model.config, 2, 10)
    length = prompt["input_ids"].shape[1]

    with torch.no_grad():
        counted = counted_flops(lambda: model(**prompt, use_cache=False, logits_to_keep=1))

    expected = flops.prefill_flops(shapes, 2, length, images=2) + 2 * causal_pairs_skipped(shapes, length)
    assert counted == expected


def test_sft_step_flops_count_exactly_the_gradients_computed():
    """Frozen ViT: forward only; kv_proj: no input gradient; frozen proj: no weight gradient; the rest 3x forward."""
    model = tiny_eager_model()
    shapes = flops.Shapes.from_config(model.config)
    batch = train_batch(model.config, 2, 24, images_per_sample=1)
    step = TrainStep(model, REFERENCE, batch)

    counted = counted_flops(lambda: step.loss().backward())

    expected = flops.train_step_flops(shapes, 2, 24, images=2) + 3 * 2 * causal_pairs_skipped(shapes, 24)
    assert counted == expected


def test_decode_weight_bytes_cover_blocks_final_norm_and_lm_head_but_not_embeddings_or_vision():
    model = build_model(tiny_config_kwargs()).to(torch.bfloat16)
    base = model.transformer
    total = sum(p.numel() for p in model.parameters())
    skipped = base.wte.weight.numel() + sum(p.numel() for p in base.visual.parameters())

    assert flops.decode_weight_bytes(model) == 2 * (total - skipped)


# --------------------------------------------------------------------------------------------------------------
# The CPU decode optimisation the numbers called for: pre-packed linear weights
# --------------------------------------------------------------------------------------------------------------


def test_packed_linear_weights_give_identical_generations():
    plain = build_model(tiny_config_kwargs()).to(torch.bfloat16).eval()
    packed = build_model(tiny_config_kwargs()).to(torch.bfloat16).eval()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in packed.modules())
    prompt = prompt_batch(plain.config, 2, 6)
    prompt["pixel_values"] = prompt["pixel_values"].to(torch.bfloat16)
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)

    # Where this CPU has no oneDNN bf16 kernels (AVX2 only) nothing is packed and the model is left as it was.
    assert pack_linear_weights_for_cpu(packed) == (n_linear if _cpu_can_pack_bf16_linear() else 0)
    with torch.inference_mode():
        a, b = plain.generate(**prompt, **kwargs), packed.generate(**prompt, **kwargs)

    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    assert "_cpu_packed_weight" not in str(packed.state_dict().keys())  # checkpoints are unaffected


def test_packed_linear_falls_back_to_the_live_weight_for_training_and_after_changes():
    linear = torch.nn.Linear(32, 16).to(torch.bfloat16)
    pack_linear_weights_for_cpu(linear)
    x = torch.randn(3, 32, dtype=torch.bfloat16)

    assert linear(x).grad_fn is not None  # gradients enabled: the plain, differentiable path
    with torch.no_grad():
        linear.weight.mul_(2)
        assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
    assert pack_linear_weights_for_cpu(torch.nn.Linear(4, 4)) == 0  # fp32 weights are left alone


def test_packing_leaves_the_model_alone_where_the_cpu_has_no_bf16_kernels(monkeypatch):
    import qwenvl.modeling_qwenvl as modeling

    monkeypatch.setattr(modeling, "_cpu_can_pack_bf16_linear", lambda: False)
    linear = torch.nn.Linear(8, 8).to(torch.bfloat16)
    forward = linear.forward

    assert pack_linear_weights_for_cpu(linear) == 0
    assert linear.forward == forward and not hasattr(linear, "_cpu_packed_weight")


# --------------------------------------------------------------------------------------------------------------
# Measuring tools
# --------------------------------------------------------------------------------------------------------------


def test_measure_reports_median_spread_and_cpu_share():
    calls = []
    timing = measure(lambda: (calls.append(1), time.sleep(0.01)), repeats=3, warmup=2)

    assert len(calls) == 5  # warm-up calls run but are not timed
    assert timing.repeats == 3
    assert timing.min_s <= timing.median_s <= timing.max_s
    assert timing.median_s >= 0.01
    assert timing.noise_pct == pytest.approx(100 * (timing.max_s - timing.min_s) / (2 * timing.median_s))
    assert 0 <= timing.cpu_share < 0.5  # sleeping uses no CPU


def test_measure_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=0)


def test_decode_timing_generates_as_a_user_calls_generate_without_a_length_forcing_processor():
    model = build_model(tiny_config_kwargs()).eval()
    prompt = prompt_batch(model.config, 1, 6)

    call = GenerateCall(model, prompt, 12, use_cache=True)
    call()
    first, whole, forced = time_generate(model, prompt, 12, use_cache=True, repeats=1)

    assert "min_new_tokens" not in call.kwargs and call.generated == 12
    assert forced is False
    assert first.repeats == whole.repeats == 1


def test_decode_timing_forces_the_length_when_the_model_would_stop_at_eos():
    model = build_model(tiny_config_kwargs()).eval()
    prompt = prompt_batch(model.config, 1, 6)
    free = GenerateCall(model, prompt, 12, use_cache=True)
    model.config.eos_token_id = int(free()[0, -12])  # the first token it writes now ends the reply

    stopped = GenerateCall(model, prompt, 12, use_cache=True)
    stopped()
    forced = GenerateCall(model, prompt, 12, use_cache=True, force_length=True)
    forced()
    rates = decode_rates(model, prompt, 12, use_cache=True, repeats=1)

    assert stopped.generated == 1 and forced.generated == 12
    assert rates["forced_length"] is True and rates["new_tokens"] == 12 and rates["decode_tokens_per_s"] > 0


def test_rss_peak_sees_a_transient_allocation():
    with RssPeak() as probe:
        buffer = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del buffer

    assert probe.increase_bytes >= 60 * 2**20


# --------------------------------------------------------------------------------------------------------------
# Configs and verdicts
# --------------------------------------------------------------------------------------------------------------


def test_small_config_is_qwen_vl_shaped_and_in_the_documented_size_range():
    config = load_config("small")
    model_kwargs = config["model"]
    model = build_model(model_kwargs, device="meta")
    params = sum(p.numel() for p in model.parameters())
    visual = model_kwargs["visual"]

    assert 50e6 <= params <= 150e6
    assert model_kwargs["intermediate_size"] / 2 / model_kwargs["hidden_size"] == 11008 / 4096  # release's SwiGLU
    assert visual["mlp_ratio"] == 4.9231  # release's ViT MLP
    assert visual["n_queries"] * 4 == (visual["image_size"] // visual["patch_size"]) ** 2  # 256 of 1024 in release


def test_gpu_config_is_a_one_billion_parameter_qwen_vl_at_release_vocabulary_and_resolution():
    from benchmarks.gpu import GPU_FIELDS

    config = load_config("gpu_1b", required=GPU_FIELDS)
    model = build_model(config["model"], device="meta")  # shapes only: 1.1 B fp32 parameters would take 4.5 GiB

    assert 1.0e9 <= sum(p.numel() for p in model.parameters()) <= 1.3e9
    assert (model.config.vocab_size, model.config.visual["image_size"], model.config.num_image_tokens) == (
        151936, 448, 256)
    assert model.config.image_token_id == 151859


def test_unknown_config_names_the_known_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="small"):
        load_config("no-such-config")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"name": "broken", "model": {}}))
    with pytest.raises(ValueError, match=r"broken\.json.*'train'"):
        load_config(str(broken))


def test_targets_are_judged_against_the_issue_thresholds():
    results = {
        "train": {"optimized": {"fraction_of_ceiling": 0.35, "fraction_of_ceiling_cpu_time": 0.5,
                                "ceiling_dtype": "bfloat16"},
                  "optimized-compiled": {"fraction_of_ceiling": 0.45, "fraction_of_ceiling_cpu_time": 0.5,
                                         "ceiling_dtype": "bfloat16"}},
        "generation": {"b1_step_over_floor": 2.5, "b1_default_wait_step_over_floor": 1.9, "kv_cache_speedup_b1": 7.0,
                       "kv_cache_speedup_b1_cpu_time": 6.0, "optimized": {"b1": {"new_tokens": 128}}},
        "memory": {"step_increase_ratio": 0.4, "peak_rss_ratio": 0.8, "chunked_loss": {"peak_rss_ratio": 0.5}},
    }

    verdicts = {t["target"]: t["met"] for t in evaluate_targets(results)}

    assert verdicts == {
        "training step model FLOP/s vs bf16 matmul ceiling": False,
        "training step model FLOP/s vs bf16 matmul ceiling, blocks compiled": True,
        "decode b1 step time vs weight-bandwidth floor": False,
        "decode b1 step time vs weight-bandwidth floor, libgomp default waiting": True,
        "KV-cache decode vs no-cache reference (b1, 128 new tokens)": True,
        "checkpointing: step memory (peak over resident state) ratio": True,
        "checkpointing: whole-process peak RSS ratio": False,
        "checkpointing: whole-process peak RSS ratio, chunked loss in both runs": True,
    }
    # Where the optimized mode runs fp32 (no fast bf16 on the machine) the step is judged against the fp32 ceiling.
    results = {"train": {"optimized": {**results["train"]["optimized"], "ceiling_dtype": "float32"}}}
    assert [t["target"] for t in evaluate_targets(results)] == ["training step model FLOP/s vs fp32 matmul ceiling"]


def test_each_ceiling_is_the_better_of_the_start_and_end_measurements():
    start = {"matmul_fp32": {"flops_per_s": 82e9}, "matmul_bf16": {"flops_per_s": 2e9},
             "bandwidth": {"bytes_per_s": 30e9}}
    end = {"matmul_fp32": {"flops_per_s": 140e9}, "matmul_bf16": {"flops_per_s": 1e9},
           "bandwidth": {"bytes_per_s": 30e9}}
    best = best_ceilings(start, end)
    assert best["matmul_fp32"] == {"flops_per_s": 140e9, "measured": "end"}  # the host was slow at the start
    assert best["matmul_bf16"] == {"flops_per_s": 2e9, "measured": "start"}
    assert best["bandwidth"]["measured"] == "start"  # a tie keeps the first


@pytest.mark.parametrize(("precision", "speedup", "expected"), [
    ("auto", 6.5, "optimized"),  # an AMX Xeon
    ("auto", 2.3, "optimized"),  # an AMD Zen 4 exposing AVX512-BF16
    ("auto", 0.012, "optimized-fp32"),  # an AVX2-only CPU: no bf16 kernels
    ("bf16", 0.012, "optimized"),
    ("fp32", 6.5, "optimized-fp32"),
])
def test_the_optimized_mode_uses_bf16_only_where_it_is_faster(precision, speedup, expected):
    optimized, compiled = optimized_modes(precision, speedup)
    assert optimized.name == expected and compiled.name == f"{expected}-compiled"
    assert compiled.compiled_training and not optimized.compiled_training
    assert optimized.train_dtype == optimized.inference_dtype == compiled.inference_dtype
    assert optimized.packed_weights == (optimized.inference_dtype == torch.bfloat16)
    with pytest.raises(ValueError, match="precision must be one of"):
        optimized_modes("fp16", speedup)


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------


def run_module(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
def test_tiny_run_writes_every_figure_of_the_issue(tmp_path):
    out = tmp_path / "tiny.json"
    # bf16 forced: every host runs the bf16 code paths (on an AVX2-only CPU slowly, but the tiny model is small).
    proc = run_module("benchmarks", "--tiny", "--precision", "bf16", "--sections", "train", "memory", "generation",
                      "vision", "reuse", "accuracy", "ablation", "--json", str(out))
    r = json.loads(out.read_text())
    assert r["optimized_mode"]["name"] == "optimized" and r["optimized_mode"]["train_dtype"] == "bfloat16"
    assert positive(r["optimized_mode"]["bf16_matmul_speedup"])

    # The machine's ceilings, each with its noise.
    for key in ("matmul_fp32", "matmul_bf16"):
        assert positive(r["ceilings"][key]["flops_per_s"]) and "noise_pct" in r["ceilings"][key]["timing"]
    assert positive(r["ceilings"]["bandwidth"]["bytes_per_s"])

    # Training step in both modes: samples/s, tokens/s, peak RSS, FLOP/s as a fraction of the same-dtype ceiling.
    for mode, dtype in (("optimized", "bfloat16"), ("reference", "float32")):
        t = r["train"][mode]
        assert all(positive(t[k]) for k in ("samples_per_s", "tokens_per_s", "peak_rss_mib", "achieved_flops_per_s"))
        assert t["ceiling_dtype"] == dtype
        ceiling = r["ceilings"]["matmul_bf16" if dtype == "bfloat16" else "matmul_fp32"]["flops_per_s"]
        assert t["fraction_of_ceiling"] == pytest.approx(t["achieved_flops_per_s"] / ceiling)
    assert r["train"]["speedup_tokens_per_s"] == pytest.approx(
        r["train"]["optimized"]["tokens_per_s"] / r["train"]["reference"]["tokens_per_s"])
    # ... and the optimized step again with its blocks compiled (`qwenvl.train.compile_regions`).
    compiled = r["train"]["optimized-compiled"]
    assert positive(compiled["tokens_per_s"]) and compiled["ceiling_dtype"] == "bfloat16"
    assert compiled["model_flops_per_step"] == r["train"]["optimized"]["model_flops_per_step"]
    assert r["train"]["compiled_speedup_tokens_per_s"] == pytest.approx(
        compiled["tokens_per_s"] / r["train"]["optimized"]["tokens_per_s"])
    assert "train, blocks compiled: tokens/s" in proc.stdout

    # Generation: decode at batch 1 and 8 with the cache, the bandwidth floor, prefill, the no-cache reference.
    g = r["generation"]
    for key in ("b1", "b8"):
        assert positive(g["optimized"][key]["decode_tokens_per_s"])
        assert positive(g["optimized"][key]["prefill_tokens_per_s"])
    assert g["floor_step_s"] == pytest.approx(g["weight_bytes_per_step"] / r["ceilings"]["bandwidth"]["bytes_per_s"])
    assert g["b1_step_over_floor"] == pytest.approx(g["optimized"]["b1"]["decode_step_s"] / g["floor_step_s"])
    assert g["kv_cache_speedup_b1"] == pytest.approx(
        g["optimized"]["b1"]["decode_tokens_per_s"] / g["reference"]["b1_no_cache"]["decode_tokens_per_s"])
    # ... and batch 1 again in a fresh process without OMP_WAIT_POLICY (the run itself sets PASSIVE).
    assert g["b1_default_wait"]["omp_wait_policy"] == "unset"
    # ... and with compiled decode steps over a static cache.
    assert g["b1_compiled"]["compiled"] is True and g["b1_default_wait"]["compiled"] is False
    assert g["b1_compiled_step_over_floor"] == pytest.approx(g["b1_compiled"]["decode_step_s"] / g["floor_step_s"])
    assert "decode tokens/s, batch 1, compiled steps, static cache" in proc.stdout
    assert r["machine"]["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert g["b1_default_wait_step_over_floor"] == pytest.approx(
        g["b1_default_wait"]["decode_step_s"] / g["floor_step_s"])

    # Vision encoding, reuse of image features, memory with and without checkpointing, bf16 tolerances.
    assert positive(r["vision"]["optimized"]["images_per_s"]) and positive(r["vision"]["reference"]["images_per_s"])
    assert positive(r["reuse"]["speedup"])
    m = r["memory"]
    assert m["checkpointing"]["checkpointing"] is True and m["no_checkpointing"]["checkpointing"] is False
    on, off = m["checkpointing"], m["no_checkpointing"]
    assert m["peak_rss_ratio"] == pytest.approx(on["peak_rss_mib"] / off["peak_rss_mib"])
    # ... and again with the chunked loss in both runs.
    c = m["chunked_loss"]
    assert c["checkpointing"]["chunked_loss"] is True and c["no_checkpointing"]["chunked_loss"] is True
    assert c["checkpointing"]["checkpointing"] is True and c["no_checkpointing"]["checkpointing"] is False
    both = c["checkpointing"]["peak_rss_mib"] / off["peak_rss_mib"]
    assert m["both_over_neither_peak_rss_ratio"] == pytest.approx(both)
    assert "chunked loss: train peak RSS MiB, checkpointing on | off" in proc.stdout
    assert 0 < r["accuracy"]["train_loss_rel_diff"] < 1e-2 and r["accuracy"]["train_grad_cosine"] > 0.99
    assert r["accuracy"]["prefill_logits_rel_err"] < 0.05

    # The ablation chain and the verdicts, all in the printed table too.
    assert set(r["ablation"]["train"]) == {"sdpa-fp32", "sdpa-fp32-fused-adamw"}
    assert len(r["targets"]) == 9 and all(isinstance(t["met"], bool) for t in r["targets"])
    assert proc.stdout.startswith(format_table(r).splitlines()[0])
    assert "+ bf16 autocast (= optimized)" in proc.stdout


@pytest.mark.slow
def test_tiny_run_in_fp32_where_bf16_does_not_pay(tmp_path):
    out = tmp_path / "tiny.json"
    proc = run_module("benchmarks", "--tiny", "--precision", "fp32", "--sections", "train", "generation", "accuracy",
                      "ablation", "--json", str(out))
    r = json.loads(out.read_text())

    assert r["optimized_mode"]["name"] == "optimized-fp32" and r["optimized_mode"]["inference_dtype"] == "float32"
    assert r["train"]["optimized"]["ceiling_dtype"] == r["train"]["optimized-compiled"]["ceiling_dtype"] == "float32"
    ceiling = r["ceilings"]["matmul_fp32"]["flops_per_s"]
    assert r["train"]["optimized"]["fraction_of_ceiling"] == pytest.approx(
        r["train"]["optimized"]["achieved_flops_per_s"] / ceiling)
    assert r["generation"]["b1_default_wait"]["decode_tokens_per_s"] > 0
    # fp32 weights: the bandwidth floor counts 4 bytes per weight
    assert r["generation"]["weight_bytes_per_step"] == flops.decode_weight_bytes(build_model(load_config("tiny")["model"]))
    assert "skipped" in r["accuracy"] and "bf16 vs fp32 on the same weights: not measured" in proc.stdout
    assert "sdpa-bf16" not in r["ablation"]["decode_b1"]
    assert "+ fused AdamW (= optimized)" in proc.stdout and "+ SDPA (= optimized)" in proc.stdout
    assert "training step model FLOP/s vs fp32 matmul ceiling" in proc.stdout
    assert "optimized mode: optimized-fp32 (train float32, inference float32; --precision fp32" in proc.stdout


@pytest.mark.slow
def test_gpu_script_runs_its_code_path_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r["attn_implementation"] == "sdpa" and r["device"] == "cpu (dry run)"
    assert positive(r["train"]["achieved_flops_per_s"]) and r["train"]["mfu_vs_datasheet"] is None
    assert positive(r["decode"]["b1"]["decode_tokens_per_s"]) and positive(r["decode"]["b2"]["step_over_floor"])
    assert positive(r["train_compiled"]["compile_and_first_step_s"])
    assert positive(r["train_compiled"]["b2"]["achieved_flops_per_s"]) and r["train_compiled"]["b2"]["batch_size"] == 2
    assert "MFU" in proc.stdout and "compiled train (batch 2 x 64)" in proc.stdout
