"""LoRA / QLoRA settings for Qwen-VL with PEFT and bitsandbytes.

The default targets are the original recipe's (`finetune.py --use_lora`): the LLM's `attn.c_attn`, `attn.c_proj`,
`mlp.w1` and `mlp.w2`, written as a regex so they cannot hit the vision tower (a suffix list such as `"c_proj"` would
also match the ViT's `mlp.c_proj`, and `"all-linear"` matches `visual.*`). The resampler and the ViT can be added.
Because parameter names are the release's, adapters trained with the original script load unchanged
(`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`, ...).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "LLM_LORA_TARGETS",
    "RESAMPLER_LORA_TARGETS",
    "VIT_LORA_TARGETS",
    "lora_config",
    "lora_target_modules",
    "qlora_quantization_config",
]

# `transformer.` is optional so the same patterns work on the bare base model (AutoModel).
LLM_LORA_TARGETS = r"(?:transformer\.)?h\.\d+\.(?:attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2)"
# The resampler's linear layers (its in-projection is a raw parameter, as in nn.MultiheadAttention).
RESAMPLER_LORA_TARGETS = r"(?:transformer\.)?visual\.attn_pool\.(?:kv_proj|attn\.out_proj)"
VIT_LORA_TARGETS = (
    r"(?:transformer\.)?visual\.transformer\.resblocks\.\d+\.(?:attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)"
)
# Kept in higher precision under 4-bit loading (bitsandbytes matches these as substrings of module names).
QLORA_SKIP_MODULES = ["visual", "lm_head"]


def lora_target_modules(resampler: bool = False, vit: bool = False) -> str:
    """PEFT `target_modules` regex (full match): the LLM, plus the resampler and/or the ViT on request."""
    patterns = [LLM_LORA_TARGETS]
    if resampler:
        patterns.append(RESAMPLER_LORA_TARGETS)
    if vit:
        patterns.append(VIT_LORA_TARGETS)
    return "(?:" + "|".join(patterns) + ")"


def lora_config(
    r: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    resampler: bool = False,
    vit: bool = False,
    modules_to_save: list[str] | None = None,
) -> Any:
    """A `peft.LoraConfig` with the original recipe's defaults (r=64, alpha=16, dropout=0.05, no bias).

    `modules_to_save=["wte", "lm_head"]` trains full copies of the embeddings and head, as the original did for a
    base (non-chat) model that must learn the ChatML tokens.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=lora_target_modules(resampler=resampler, vit=vit),
        modules_to_save=modules_to_save,
    )


def qlora_quantization_config(compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """4-bit NF4 (double quantisation) for the LLM; the vision tower and `lm_head` stay unquantised.

    Needs a CUDA device and the `bitsandbytes` package; raises a clear error otherwise.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("QLoRA needs the bitsandbytes package: pip install bitsandbytes") from None
    if not torch.cuda.is_available():
        raise RuntimeError("QLoRA (bitsandbytes 4-bit) needs a CUDA device")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
    )
