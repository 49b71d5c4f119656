"""A locality-biased start for a freshly initialised adapter (`transformer.visual.attn_pool`).

With random projections the adapter's 256 (here n) queries attend almost uniformly over all patches, so every image
token starts as the same average of the image: features of different pictures differ little, and a model trained
from scratch learns to ignore them before it learns to read them. The fixed 2-D sin-cos positions added to queries
and keys already say where each query sits; `localize_adapter` lets them decide the first attention pattern. The
query and key projections read only the highest sin-cos frequencies of both axes (where nearby grid cells differ)
and the content terms start small, so query i begins by pooling the patches around its own grid cell. Everything
stays trainable; this only changes the starting point. Use it for new adapters (stage 1 from scratch), never on a
released checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["localize_adapter"]


@torch.no_grad()
def localize_adapter(model: nn.Module, scale: float = 4.0, n_frequencies: int = 4, content_gain: float = 0.1) -> None:
    """Re-initialise the adapter's query/key projections so that each query first attends to its own grid cell.

    `scale` sharpens the initial attention (logits grow with its square), `n_frequencies` is how many of the
    highest sin-cos frequencies per axis the projections read (each head gets all of them), `content_gain` scales
    `ln_q`/`ln_kv` so learned content starts as a perturbation of the positional match. Values stay unchanged up to
    `content_gain`, which `ln_post` after the adapter normalises away.
    """
    resampler = _find_resampler(model)
    attention = resampler.attn
    dim = resampler.query.shape[1]
    heads = attention.num_heads
    head_dim = dim // heads
    quarter = dim // 4  # the table is [sin x | cos x | sin y | cos y], each `dim / 4` frequencies, highest first
    columns = [axis * 2 * quarter + part * quarter + f for axis in (0, 1) for f in range(n_frequencies)
               for part in (0, 1)]
    if not 0 < len(columns) <= head_dim:
        raise ValueError(f"n_frequencies={n_frequencies} needs 4 × n_frequencies ≤ head_dim={head_dim} columns")
    projection = torch.zeros(dim, dim, dtype=attention.in_proj_weight.dtype)
    for head in range(heads):
        for row, column in enumerate(columns):
            projection[head * head_dim + row, column] = scale
    attention.in_proj_weight[:dim] = projection
    attention.in_proj_weight[dim : 2 * dim] = projection
    attention.in_proj_bias[: 2 * dim] = 0.0
    resampler.ln_q.weight.fill_(content_gain)
    resampler.ln_kv.weight.fill_(content_gain)


def _find_resampler(model: nn.Module) -> nn.Module:
    # By class name: a model loaded with trust_remote_code has its own copy of the class, not qwenvl's.
    for module in model.modules():
        if type(module).__name__ == "Resampler" and hasattr(module, "attn") and hasattr(module, "query"):
            return module
    raise ValueError(f"{type(model).__name__} has no Qwen-VL adapter (`visual.attn_pool`)")
