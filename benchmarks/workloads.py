"""The measured workloads: synthetic batches, the SFT training step, generation and vision encoding.

Inputs are synthetic (random token ids, random pixels) laid out exactly as the processor lays them out: each image
is `<img>` + n_queries × `<imgpad>` + `</img>`, images in row-major order. No processor, files or weights needed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwenvl import QwenVLConfig, QwenVLForConditionalGeneration
from qwenvl.inference import compiled_decode_config
from qwenvl.modeling_qwenvl import pack_linear_weights_for_cpu
from qwenvl.train.precision import MIN_BF16_SPEEDUP

from .timing import Timing, measure


@dataclass(frozen=True)
class Mode:
    """How a workload runs. `optimized` is this implementation's recommended CPU setup; `reference` is the original
    release's: eager matmul attention, fp32, plain (per-parameter loop) AdamW, and (set by the generation section)
    no KV cache."""

    name: str
    attn_implementation: str
    train_autocast: bool  # bf16 autocast over fp32 master weights during training
    inference_dtype: torch.dtype  # weights and activations for generation and vision encoding
    fused_optimizer: bool
    packed_weights: bool = False  # `pack_linear_weights_for_cpu` for generation and vision encoding
    compiled_training: bool = False  # `qwenvl.train.compile_regions` on the trained model (compiles on its first step)

    @property
    def train_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.train_autocast else torch.float32


OPTIMIZED = Mode("optimized", "sdpa", True, torch.bfloat16, True, packed_weights=True)
REFERENCE = Mode("reference", "eager", False, torch.float32, False)
# Steps between the two, one change at a time, for the ablation section.
SDPA_FP32 = Mode("sdpa-fp32", "sdpa", False, torch.float32, False)
SDPA_FP32_FUSED = Mode("sdpa-fp32-fused-adamw", "sdpa", False, torch.float32, True)
SDPA_BF16 = Mode("sdpa-bf16", "sdpa", True, torch.bfloat16, True)
# The optimized step with each block and the loss compiled: timed in the train section next to `optimized`.
OPTIMIZED_COMPILED = Mode("optimized-compiled", "sdpa", True, torch.bfloat16, True, packed_weights=True,
                          compiled_training=True)
# The same without bf16, for machines whose bf16 matmuls are slower than fp32 ones (an AVX2-only CPU has no bf16
# kernels at all: ~70x slower). Packing is bf16-only.
OPTIMIZED_FP32 = Mode("optimized-fp32", "sdpa", False, torch.float32, True)
OPTIMIZED_FP32_COMPILED = Mode("optimized-fp32-compiled", "sdpa", False, torch.float32, True, compiled_training=True)
MODES = {m.name: m for m in (OPTIMIZED, OPTIMIZED_COMPILED, OPTIMIZED_FP32, OPTIMIZED_FP32_COMPILED, REFERENCE,
                             SDPA_FP32, SDPA_FP32_FUSED, SDPA_BF16)}
PRECISIONS = ("auto", "bf16", "fp32")


def optimized_modes(precision: str, bf16_speedup: float) -> tuple[Mode, Mode]:
    """The optimized mode and its compiled variant for this machine: bf16 where `precision` is "bf16", or "auto" and
    bf16 matmuls measured at least `MIN_BF16_SPEEDUP` times as fast as fp32 ones; fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and bf16_speedup >= MIN_BF16_SPEEDUP)
    return (OPTIMIZED, OPTIMIZED_COMPILED) if bf16 else (OPTIMIZED_FP32, OPTIMIZED_FP32_COMPILED)


def build_model(
    model_kwargs: dict, seed: int = 0, device: str | torch.device = "cpu"
) -> QwenVLForConditionalGeneration:
    """Randomly initialised fp32 model, created directly on `device`; a seed gives the same weights on a device."""
    torch.manual_seed(seed)
    with torch.device(device):
        return QwenVLForConditionalGeneration(QwenVLConfig(**copy.deepcopy(model_kwargs)))


def image_span(config: QwenVLConfig) -> list[int]:
    return [config.image_start_id] + [config.image_token_id] * config.num_image_tokens + [config.image_end_id]


def _text_ids(config: QwenVLConfig, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Ordinary text ids: below the image ids, never pad or eos (so nothing reads as padding or stops early)."""
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    specials = torch.tensor([i for i in (config.pad_token_id, *eos) if i is not None], dtype=torch.long)
    allowed = torch.arange(config.image_start_id)
    allowed = allowed[~torch.isin(allowed, specials)]
    return allowed[torch.randint(0, len(allowed), shape, generator=generator)]


def _pixels(config: QwenVLConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    size = config.visual["image_size"]
    return torch.randn(n, 3, size, size, generator=generator)


def train_batch(
    config: QwenVLConfig, batch: int, seq_len: int, images_per_sample: int, seed: int = 0, device: str = "cpu"
) -> dict:
    """A stage-2 SFT batch: each row is its images, then text; labels ignore the image spans.

    Every row has the same length (the batch's longest), so the batch carries no padding.
    """
    generator = torch.Generator().manual_seed(seed)
    span = image_span(config)
    n_image_tokens = images_per_sample * len(span)
    if n_image_tokens >= seq_len:
        raise ValueError(f"seq_len {seq_len} leaves no room for text after {n_image_tokens} image tokens")
    input_ids = _text_ids(config, (batch, seq_len), generator)
    input_ids[:, :n_image_tokens] = torch.tensor(span * images_per_sample)
    labels = input_ids.clone()
    labels[:, :n_image_tokens] = -100
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": _pixels(config, batch * images_per_sample, generator),
    }
    return {k: v.to(device) for k, v in out.items()}


def prompt_batch(config: QwenVLConfig, batch: int, text_tokens: int, seed: int = 0, device: str = "cpu") -> dict:
    """A generation prompt per row: one image followed by `text_tokens` text tokens."""
    generator = torch.Generator().manual_seed(seed)
    span = torch.tensor(image_span(config)).expand(batch, -1)
    input_ids = torch.cat([span, _text_ids(config, (batch, text_tokens), generator)], dim=1)
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": _pixels(config, batch, generator),
    }
    return {k: v.to(device) for k, v in out.items()}


def freeze_for_sft(model: QwenVLForConditionalGeneration) -> None:
    """The release's `finetune.py` default (`fix_vit`): the ViT, `ln_post` and `proj` frozen; adapter and LLM train."""
    visual = model.transformer.visual
    visual.requires_grad_(False)
    visual.attn_pool.requires_grad_(True)
    visual.attn_pool.pos_embed.requires_grad_(False)  # a fixed table, as in the release


class TrainStep:
    """One optimizer step: forward with loss, backward, AdamW step, zero grads.

    `optimized` trains under bf16 autocast with fp32 master weights (as `TrainingArguments(bf16=True)` does) and uses
    the fused AdamW kernel that `Trainer` picks by default; `reference` is fp32 with the per-parameter AdamW loop.
    """

    def __init__(self, model: QwenVLForConditionalGeneration, mode: Mode, batch: dict, checkpointing: bool = False,
                 chunked_loss: bool = False):
        model.set_attn_implementation(mode.attn_implementation)
        freeze_for_sft(model)
        if checkpointing:
            model.activation_checkpointing_enable()
        if chunked_loss:
            model.enable_chunked_loss()
        if mode.compiled_training:
            from qwenvl.train import compile_regions

            compile_regions(model)
        model.train()
        self.model, self.mode, self.batch = model, mode, batch
        self.device_type = next(model.parameters()).device.type
        params = [p for p in model.parameters() if p.requires_grad]
        if mode.fused_optimizer:
            self.optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)

    def loss(self) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.mode.train_autocast):
            return self.model(**self.batch, use_cache=False).loss

    def __call__(self) -> float:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def inference_model(model: QwenVLForConditionalGeneration, mode: Mode) -> QwenVLForConditionalGeneration:
    """The model as `mode` serves it: attention backend and weight dtype set, weights packed if asked, eval mode."""
    model.set_attn_implementation(mode.attn_implementation)
    model = model.to(mode.inference_dtype).eval()
    if mode.packed_weights:
        pack_linear_weights_for_cpu(model)
    return model


class GenerateCall:
    """Greedy `generate` of `new_tokens` tokens per call, called as a user calls it: stopping at EOS, with no logits
    processor. `min_new_tokens` would add two processors a step (0.5 ms at batch 1, 1.4 ms at batch 8 on the AVX2
    host, 3-4 % of the small model's eager step; RESULTS, optimisation 25), so it is passed only with `force_length`,
    for a random-weight model that emits EOS first; `generated` (new tokens of the last call) shows which.
    `compiled`: with a static cache and compiled decode steps (`qwenvl.inference.compiled_decode_config`)."""

    def __init__(self, model: QwenVLForConditionalGeneration, prompt: dict, new_tokens: int, use_cache: bool,
                 compiled: bool = False, force_length: bool = False):
        dtype = next(model.parameters()).dtype
        self.model = model
        self.inputs = {**prompt, "pixel_values": prompt["pixel_values"].to(dtype)}
        self.kwargs = dict(max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                           pad_token_id=model.config.pad_token_id, eos_token_id=model.config.eos_token_id)
        if force_length:
            self.kwargs["min_new_tokens"] = new_tokens
        if compiled:
            self.kwargs.update(cache_implementation="static", compile_config=compiled_decode_config())
        self.generated: int | None = None

    @torch.inference_mode()
    def __call__(self) -> torch.Tensor:
        out = self.model.generate(**self.inputs, **self.kwargs)
        self.generated = out.shape[1] - self.inputs["input_ids"].shape[1]
        return out


def time_generate(model, prompt: dict, new_tokens: int, use_cache: bool, repeats: int, compiled: bool = False,
                  wrap: Callable[[Callable], Callable] = lambda fn: fn) -> tuple[Timing, Timing, bool]:
    """Timings of a 1-token and a `new_tokens` generate (`wrap`: e.g. a device synchronisation), and whether the
    length had to be forced (`min_new_tokens`) because the model stopped at EOS first. `compiled` warms up at full
    length: it compiles once per cache length."""

    def timings(force_length: bool) -> tuple[Timing, Timing, GenerateCall]:
        wrap(GenerateCall(model, prompt, new_tokens if compiled else 2, use_cache, compiled, force_length))()
        first = measure(wrap(GenerateCall(model, prompt, 1, use_cache, compiled, force_length)), repeats, warmup=0)
        full = GenerateCall(model, prompt, new_tokens, use_cache, compiled, force_length)
        return first, measure(wrap(full), repeats, warmup=0), full

    first, whole, full = timings(force_length=False)
    forced = full.generated < new_tokens
    if forced:
        first, whole, _ = timings(force_length=True)
    return first, whole, forced


def decode_rates(model, prompt: dict, new_tokens: int, use_cache: bool, repeats: int, compiled: bool = False) -> dict:
    """Prefill time (a 1-token generate) and decode rate from a `new_tokens` generate: (N-1)·B / (t_N - t_1)."""
    t1, tn, forced = time_generate(model, prompt, new_tokens, use_cache, repeats, compiled)
    batch, prompt_len = prompt["input_ids"].shape
    step_s = max(tn.median_s - t1.median_s, 1e-9) / (new_tokens - 1)
    step_cpu_s = max(tn.cpu_s - t1.cpu_s, 1e-9) / (new_tokens - 1)
    return {
        "batch_size": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "forced_length": forced,
        "prefill": t1.to_dict(),
        "generate": tn.to_dict(),
        "prefill_tokens_per_s": batch * prompt_len / t1.median_s,
        "decode_step_s": step_s,
        "decode_tokens_per_s": batch / step_s,
        "decode_step_cpu_s": step_cpu_s,
        "decode_tokens_per_cpu_s": batch / step_cpu_s,
    }


def vision_fn(model: QwenVLForConditionalGeneration, pixel_values: torch.Tensor) -> Callable:
    pixel_values = pixel_values.to(next(model.parameters()).dtype)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        return model.get_image_features(pixel_values)

    return run


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """‖value − reference‖₂ / ‖reference‖₂, in fp64 (fp32 sums over ~10⁸ gradient entries drift by percents)."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def accuracy_check(model_kwargs: dict, train: dict, prompt: dict) -> dict:
    """How far the optimized mode drifts from the fp32 eager reference on identical weights and inputs.

    Training: loss and the gradient of the trained parameters under bf16 autocast vs fp32. Inference: prefill logits
    and adapter features with bf16 weights vs fp32. These are the tolerances RESULTS.md quotes.
    """
    results = {}
    grads = {}
    losses = {}
    for mode in (REFERENCE, OPTIMIZED):
        model = build_model(model_kwargs)
        step = TrainStep(model, mode, train)
        loss = step.loss()
        loss.backward()
        losses[mode.name] = loss.item()
        grads[mode.name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    results["train_loss_rel_diff"] = abs(losses["optimized"] - losses["reference"]) / abs(losses["reference"])
    results["train_grad_rel_err"] = relative_error(grads["optimized"], grads["reference"])
    results["train_grad_cosine"] = cosine(grads["optimized"], grads["reference"])

    outputs = {}
    for mode in (REFERENCE, OPTIMIZED):
        model = inference_model(build_model(model_kwargs), mode)
        dtype = next(model.parameters()).dtype
        with torch.inference_mode():
            features = model.get_image_features(prompt["pixel_values"].to(dtype))
            logits = model(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                           image_features=features, use_cache=False).logits
        outputs[mode.name] = (features, logits)
    results["vision_features_rel_err"] = relative_error(outputs["optimized"][0], outputs["reference"][0])
    results["prefill_logits_rel_err"] = relative_error(outputs["optimized"][1], outputs["reference"][1])
    return {k: (round(v, 6) if math.isfinite(v) else v) for k, v in results.items()}
