"""The printed table: one row per figure, optimized next to reference, their ratio, and the noise of each."""

from __future__ import annotations


def _noise(timing: dict | None) -> str:
    if not timing:
        return ""
    return f"±{timing['noise_pct']:.0f}% n={timing['repeats']} cpu {timing['cpu_share']:.2f}"


def _noises(a: dict | None, b: dict | None = None) -> str:
    return _noise(a) + (f" | {_noise(b)}" if b else "")


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text}{unit}"


def _pct(result: dict, key: str = "fraction_of_ceiling") -> str:
    return f"{result[key]:.1%} ({result[key + '_cpu_time']:.1%} per CPU-s)"


def _optimized_dtype(results: dict) -> str:
    """The optimized mode's inference dtype (runs before the fp32 fallback existed were all bf16)."""
    return results.get("optimized_mode", {}).get("inference_dtype", "bfloat16")


def rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(figure, optimized, reference, optimized/reference, noise of optimized | reference)."""
    out = []
    c = results["ceilings"]
    bf16, fp32, bw = c["matmul_bf16"], c["matmul_fp32"], c["bandwidth"]
    out.append(("matmul ceiling GFLOP/s (bf16 | fp32)", _fmt(bf16["flops_per_s"] / 1e9),
                _fmt(fp32["flops_per_s"] / 1e9), _fmt(bf16["flops_per_s"] / fp32["flops_per_s"], "x"),
                _noises(bf16["timing"], fp32["timing"])))
    out.append(("copy bandwidth GB/s (read + write)", _fmt(bw["bytes_per_s"] / 1e9), "", "", _noise(bw["timing"])))

    if "train" in results:
        o, r = results["train"]["optimized"], results["train"]["reference"]
        out += [
            ("train: samples/s", _fmt(o["samples_per_s"]), _fmt(r["samples_per_s"]),
             _fmt(o["samples_per_s"] / r["samples_per_s"], "x"), _noises(o["timing"], r["timing"])),
            ("train: tokens/s", _fmt(o["tokens_per_s"]), _fmt(r["tokens_per_s"]),
             _fmt(results["train"]["speedup_tokens_per_s"], "x"), ""),
            ("train: model GFLOP/s", _fmt(o["achieved_flops_per_s"] / 1e9), _fmt(r["achieved_flops_per_s"] / 1e9),
             "", ""),
            (f"train: of matmul ceiling ({o['ceiling_dtype']} | {r['ceiling_dtype']})", _pct(o), _pct(r), "", ""),
            ("train: peak RSS MiB", _fmt(o["peak_rss_mib"]), _fmt(r["peak_rss_mib"]),
             _fmt(o["peak_rss_mib"] / r["peak_rss_mib"], "x"), ""),
        ]
        c = results["train"].get("optimized-compiled")
        if c is not None:  # against optimized, not reference: what the compile adds
            out += [
                ("train, blocks compiled: tokens/s (ratio: vs optimized)", _fmt(c["tokens_per_s"]), "",
                 _fmt(results["train"]["compiled_speedup_tokens_per_s"], "x"), _noise(c["timing"])),
                (f"train, blocks compiled: of matmul ceiling ({c['ceiling_dtype']})", _pct(c), "", "", ""),
            ]

    if "generation" in results:
        g = results["generation"]
        ref, cached = g["reference"]["b1_no_cache"], g["reference"]["b1_cache"]
        for key, result in g["optimized"].items():
            b1 = key == "b1"
            out.append((f"decode tokens/s, batch {result['batch_size']}, {result['new_tokens']} new",
                        _fmt(result["decode_tokens_per_s"]),
                        _fmt(ref["decode_tokens_per_s"]) + " no cache" if b1 else "",
                        _fmt(g["kv_cache_speedup_b1"], "x") if b1 else "",
                        _noises(result["generate"], ref["generate"] if b1 else None)))
        out.append(("decode b1: weight-bandwidth floor tokens/s", _fmt(g["floor_b1_tokens_per_s"]), "",
                    f"step {g['b1_step_over_floor']:.2f}x floor", ""))
        if "b1_default_wait" in g:
            default = g["b1_default_wait"]
            out.append(("decode tokens/s, batch 1, libgomp default waiting", _fmt(default["decode_tokens_per_s"]), "",
                        f"step {g['b1_default_wait_step_over_floor']:.2f}x floor", _noise(default["generate"])))
        if "b1_compiled" in g:
            compiled = g["b1_compiled"]
            out.append(("decode tokens/s, batch 1, compiled steps, static cache (default waiting)",
                        _fmt(compiled["decode_tokens_per_s"]), "",
                        f"step {g['b1_compiled_step_over_floor']:.2f}x floor", _noise(compiled["generate"])))
        out.append(("decode b1 with cache, fp32 eager", "", _fmt(cached["decode_tokens_per_s"]),
                    f"cache alone {g['kv_cache_speedup_b1_same_precision']:.1f}x", _noise(cached["generate"])))
        for key, result in g["optimized"].items():
            b1 = key == "b1"
            out.append((f"prefill tokens/s, batch {result['batch_size']} (incl. vision)",
                        _fmt(result["prefill_tokens_per_s"]), _fmt(ref["prefill_tokens_per_s"]) if b1 else "",
                        _fmt(g["prefill_speedup_b1"], "x") if b1 else "",
                        _noises(result["prefill"], ref["prefill"] if b1 else None)))
        last = list(g["optimized"])[-1]
        out.append((f"prefill {last}: of {_optimized_dtype(results)} matmul ceiling",
                    _pct(g["optimized"][last], "prefill_fraction_of_ceiling"), "", "", ""))

    if "vision" in results:
        o, r = results["vision"]["optimized"], results["vision"]["reference"]
        out.append((f"vision images/s (ViT + adapter, batch {o['batch_size']})", _fmt(o["images_per_s"]),
                    _fmt(r["images_per_s"]), _fmt(results["vision"]["speedup"], "x"),
                    _noises(o["timing"], r["timing"])))
        out.append((f"vision: of matmul ceiling ({_optimized_dtype(results)} | float32)", _pct(o), _pct(r), "", ""))

    if "reuse" in results:
        u = results["reuse"]
        out.append((f"later-turn prefill ms ({u['context_len']} tok): features reused | re-encoded",
                    _fmt(u["reuse"]["median_s"] * 1e3), _fmt(u["reencode"]["median_s"] * 1e3),
                    _fmt(u["speedup"], "x"), _noises(u["reuse"], u["reencode"])))

    if "memory" in results:
        m = results["memory"]
        pairs = [("", f" (batch {m['batch_size']})", m)]
        if "chunked_loss" in m:
            pairs.append(("  chunked loss: ", "", m["chunked_loss"]))
        for prefix, suffix, pair in pairs:
            on, off = pair["checkpointing"], pair["no_checkpointing"]
            out.append((f"{prefix}train peak RSS MiB, checkpointing on | off{suffix}", _fmt(on["peak_rss_mib"]),
                        _fmt(off["peak_rss_mib"]), _fmt(pair["peak_rss_ratio"], "x"), ""))
            out.append((f"{prefix}train step memory over resident state MiB, on | off", _fmt(on["step_increase_mib"]),
                        _fmt(off["step_increase_mib"]), _fmt(pair["step_increase_ratio"], "x"), ""))
        if "chunked_loss" in m:
            out.append(("train peak RSS MiB, checkpointing + chunked loss | neither",
                        _fmt(m["chunked_loss"]["checkpointing"]["peak_rss_mib"]),
                        _fmt(m["no_checkpointing"]["peak_rss_mib"]),
                        _fmt(m["both_over_neither_peak_rss_ratio"], "x"), ""))
    return out


def ablation_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(step, rate, × previous, × previous per CPU-s, noise): one change at a time, in the order the optimized mode
    stacks them."""
    ablation = results["ablation"]
    bf16 = _optimized_dtype(results) == "bfloat16"  # in fp32 the chains end at fused AdamW and at SDPA
    chains = []
    if "train" in results:
        train = {**results["train"], **ablation["train"]}
        steps = [("reference: eager, fp32, looped AdamW", train["reference"]), ("+ SDPA", train["sdpa-fp32"])]
        steps += ([("+ fused AdamW", train["sdpa-fp32-fused-adamw"]),
                   ("+ bf16 autocast (= optimized)", train["optimized"])] if bf16 else
                  [("+ fused AdamW (= optimized)", train["optimized"])])
        chains.append(("train tok/s", steps,
                       lambda r: (r["tokens_per_s"], r["tokens_per_s"] * r["timing"]["median_s"] / r["timing"]["cpu_s"]),
                       lambda r: r["timing"]))
    if "generation" in results:
        gen = results["generation"]
        steps = [("reference: eager, fp32, no cache", gen["reference"]["b1_no_cache"]),
                 ("+ KV cache", gen["reference"]["b1_cache"])]
        steps += ([("+ SDPA", ablation["decode_b1"]["sdpa-fp32"]),
                   ("+ bf16 weights", ablation["decode_b1"]["sdpa-bf16"]),
                   ("+ packed weights (= optimized)", gen["optimized"]["b1"])] if bf16 else
                  [("+ SDPA (= optimized)", gen["optimized"]["b1"])])
        chains.append(("decode b1 tok/s", steps, lambda r: (r["decode_tokens_per_s"], r["decode_tokens_per_cpu_s"]),
                       lambda r: r["generate"]))
    out = []
    for title, steps, rates, timing in chains:
        previous = None
        for label, result in steps:
            wall, cpu = rates(result)
            out.append((f"{title}: {label}", _fmt(wall), _fmt(wall / previous[0], "x") if previous else "",
                        _fmt(cpu / previous[1], "x") if previous else "", _noise(timing(result))))
            previous = (wall, cpu)
    return out


def _table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]


def format_table(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"config {results['config']} ({results['model']['total_params'] / 1e6:.1f} M params) on {machine['cpu']}, "
        f"{machine['torch_threads']} threads, torch {machine['torch']}, OMP_WAIT_POLICY={machine['omp_wait_policy']}, "
        f"load average {machine['load_average_at_start']} -> {machine.get('load_average_at_end')}",
        *_table(("figure", "optimized", "reference", "ratio", "noise: optimized | reference"), rows(results)),
    ]
    if "ceilings_end" in results:
        start, end = results["ceilings_start"], results["ceilings_end"]
        lines.insert(1, "ceilings at the start | end of the run (the better one is used): " + ", ".join(
            f"{label} {start[key][rate] / 1e9:,.4g} | {end[key][rate] / 1e9:,.4g} {unit}"
            for label, key, rate, unit in (("fp32 matmul", "matmul_fp32", "flops_per_s", "GFLOP/s"),
                                           ("bf16 matmul", "matmul_bf16", "flops_per_s", "GFLOP/s"),
                                           ("copy", "bandwidth", "bytes_per_s", "GB/s"))))
    if "optimized_mode" in results:
        mode = results["optimized_mode"]
        lines.insert(1, f"optimized mode: {mode['name']} (train {mode['train_dtype']}, inference "
                        f"{mode['inference_dtype']}; --precision {mode['precision']}, bf16 matmuls "
                        f"{mode['bf16_matmul_speedup']:.3g}x fp32 here)")
    if "ablation" in results:
        lines += ["", *_table(("one change at a time", "rate", "x previous", "x previous per CPU-s", "noise"),
                              ablation_rows(results)), ""]
    if "accuracy" in results:
        accuracy = results["accuracy"]
        measured = ", ".join(f"{k} {v:.4g}" for k, v in accuracy.items() if k != "skipped")
        lines.append("bf16 vs fp32 on the same weights: "
                     + (f"not measured: {accuracy['skipped']}" if "skipped" in accuracy else measured))
    for t in results.get("targets", []):
        extra = f"; {t['value_cpu_time']} per CPU-s" if "value_cpu_time" in t else ""
        lines.append(f"target {'MET    ' if t['met'] else 'NOT MET'} {t['target']}: {t['value']}{extra} "
                     f"(goal {t['goal']})")
    return "\n".join(lines)
