"""Which parameters train in each stage of the Qwen-VL recipe.

Components (paths under the base model, `transformer.`):

| component    | parameters                                                                                  |
|--------------|---------------------------------------------------------------------------------------------|
| `vit`        | `visual.conv1`, `visual.positional_embedding`, `visual.ln_pre`, `visual.transformer.*`      |
| `resampler`  | `visual.attn_pool.*` (learned queries, `kv_proj`, `ln_q`, `ln_kv`, cross-attention)        |
| `projection` | `visual.ln_post`, `visual.proj`                                                             |
| `llm`        | `wte`, `h.*`, `ln_f`                                                                        |
| `lm_head`    | `lm_head` (outside the base model; `score` for a sequence-classification model)            |

`visual.attn_pool.pos_embed`, the fixed 2-D sin-cos table, never trains (as in the original).

Stages:

* `"pretrain"` (the seed's stage 1): only the adapter learns, i.e. `resampler` + `projection`. `ln_post` and
  `proj` count as adapter because they are new, randomly initialised parameters between the resampler and the LLM
  (their shapes match nothing in OpenCLIP): freezing them in stage 1 would pin a random 4096×4096 map in front of
  a frozen LLM.
* `"pretrain-paper"` (the paper's stage 1): the LLM is frozen; ViT + adapter train. Run it at a lower image size
  (e.g. 224) by setting the image processor's size: the model interpolates both positional tables to the grid.
* `"multitask"` (stage 2): everything trains.
* `"multitask-frozen-vit"`: stage 2 with the ViT kept as it is (a pre-trained encoder); the adapter, `ln_post`,
  `proj`, the LLM and `lm_head` train. The embedded demo uses it after pre-training its own ViT.
* `"chat-sft"` (the original Chat fine-tuning, `finetune.py --fix_vit`): the ViT is frozen and exactly
  `attn_pool` is re-enabled; `ln_post`/`proj` stay frozen as in that script, the LLM and `lm_head` train.

A frozen ViT runs without building an autograd graph (the vision tower checks `requires_grad` of its trunk).
The LLM always runs with autograd when anything before it trains, since gradients must flow through it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

__all__ = ["COMPONENTS", "STAGES", "ParameterTable", "apply_stage", "component_of", "parameter_table"]

logger = logging.getLogger(__name__)

COMPONENTS = ("vit", "resampler", "projection", "llm", "lm_head")
STAGES: dict[str, frozenset[str]] = {
    "pretrain": frozenset({"resampler", "projection"}),
    "pretrain-paper": frozenset({"vit", "resampler", "projection"}),
    "multitask": frozenset(COMPONENTS),
    "multitask-frozen-vit": frozenset({"resampler", "projection", "llm", "lm_head"}),
    "chat-sft": frozenset({"resampler", "llm", "lm_head"}),
}
ALWAYS_FROZEN = ("visual.attn_pool.pos_embed",)
_VIT_PREFIXES = ("visual.conv1.", "visual.positional_embedding", "visual.ln_pre.", "visual.transformer.")
_PROJECTION_PREFIXES = ("visual.ln_post.", "visual.proj")


_WRAPPER_PREFIXES = (
    "module.", "_orig_mod.", "base_model.model.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."
)


def component_of(name: str) -> str:
    """The component of a parameter name such as `transformer.visual.attn_pool.query`.

    Accepts names from the LM-head model, the bare base model (`visual.…`, `h.0.…`) and wrapped models (PEFT's
    `base_model.model.`, DDP's `module.`). A sequence-classification `score` head counts as `lm_head`.
    """
    local = name
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if local.startswith(prefix):
                local, stripped = local[len(prefix) :], True
    if local.startswith(("lm_head.", "score.")):
        return "lm_head"
    local = local.removeprefix("transformer.")
    if local.startswith("visual.attn_pool."):
        return "resampler"
    if local.startswith(_PROJECTION_PREFIXES):
        return "projection"
    if local.startswith(_VIT_PREFIXES):
        return "vit"
    if local.startswith(("wte.", "h.", "ln_f.")):
        return "llm"
    raise ValueError(f"parameter {name!r} belongs to no Qwen-VL component ({', '.join(COMPONENTS)})")


def _always_frozen(name: str) -> bool:
    return any(name.endswith(suffix) for suffix in ALWAYS_FROZEN)


class ParameterTable(list):
    """Rows `{"component", "parameters", "trainable"}` plus a `"total"` row; `str()` is the printed table."""

    def __str__(self) -> str:
        lines = [f"{'component':<12} {'parameters':>14} {'trainable':>14} {'share':>7}"]
        for row in self:
            share = row["trainable"] / row["parameters"] if row["parameters"] else 0.0
            lines.append(f"{row['component']:<12} {row['parameters']:>14,} {row['trainable']:>14,} {share:>7.1%}")
        return "\n".join(lines)

    def trainable_components(self) -> set[str]:
        return {row["component"] for row in self if row["component"] != "total" and row["trainable"]}


def parameter_table(model: nn.Module, extra: Iterable[str] = ()) -> ParameterTable:
    """Parameter and trainable counts per component (LoRA and other added parameters count as `extra` rows)."""
    counts = {name: [0, 0] for name in (*COMPONENTS, *extra)}
    for name, parameter in model.named_parameters():
        try:
            component = component_of(name)
        except ValueError:
            component = "other"
            counts.setdefault(component, [0, 0])
        if "lora_" in name:
            component = "lora"
            counts.setdefault(component, [0, 0])
        counts[component][0] += parameter.numel()
        counts[component][1] += parameter.numel() if parameter.requires_grad else 0
    table = ParameterTable(
        {"component": name, "parameters": total, "trainable": trainable} for name, (total, trainable) in counts.items()
    )
    table.append(
        {
            "component": "total",
            "parameters": sum(row["parameters"] for row in table),
            "trainable": sum(row["trainable"] for row in table),
        }
    )
    return table


def apply_stage(model: nn.Module, stage: str, verbose: bool = True) -> ParameterTable:
    """Set `requires_grad` for `stage` (see the module docstring), print and return the per-component table."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}")
    trainable = STAGES[stage]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(component_of(name) in trainable and not _always_frozen(name))
    table = parameter_table(model)
    if verbose:
        print(f"stage {stage!r}: trainable parameters per component\n{table}")
    return table
