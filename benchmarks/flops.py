"""Analytic model FLOPs and decode weight traffic (formulas in benchmarks/RESULTS.md, "How figures are computed").

A matmul of (m×k)·(k×n) counts 2·m·k·n FLOPs; element-wise work (norms, activations, RoPE, softmax, the optimizer) is
not counted, and neither is the recomputation that gradient checkpointing adds: these are *model* FLOPs, so the
fraction of the ceiling is comparable to MFU as usually reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Shapes:
    """The sizes the formulas need, read from a `QwenVLConfig`."""

    d: int  # LLM width
    layers: int
    ff: int  # width of each SwiGLU branch (intermediate_size // 2)
    vocab: int
    vit_width: int
    vit_layers: int
    vit_mlp: int
    patch: int
    patches: int  # P, per image
    queries: int  # Q, per image

    @classmethod
    def from_config(cls, config) -> Shapes:
        v = config.visual
        return cls(
            d=config.hidden_size,
            layers=config.num_hidden_layers,
            ff=config.intermediate_size // 2,
            vocab=config.vocab_size,
            vit_width=v["width"],
            vit_layers=v["layers"],
            vit_mlp=int(v["width"] * v["mlp_ratio"]),
            patch=v["patch_size"],
            patches=(v["image_size"] // v["patch_size"]) ** 2,
            queries=v["n_queries"],
        )

    @property
    def llm_layer_matmul_params(self) -> int:
        """c_attn (d→3d) + attn.c_proj (d→d) + w1, w2 (d→ff) + mlp.c_proj (ff→d)."""
        return 4 * self.d**2 + 3 * self.d * self.ff

    @property
    def lm_head_params(self) -> int:
        return self.d * self.vocab

    @property
    def vit_matmul_params(self) -> int:
        """conv1 as a matmul over patches, and per block in_proj (w→3w), out_proj, c_fc (w→m), c_proj (m→w)."""
        w = self.vit_width
        return 3 * self.patch**2 * w + self.vit_layers * (4 * w**2 + 2 * w * self.vit_mlp)


def llm_forward_flops(s: Shapes, seq_len: int, logits_positions: int) -> int:
    """One sequence through the decoder: 2·N·L for the blocks, 2·d·V per position that gets logits, and causal
    attention 2·(QKᵀ + AV) = 4·d per (query, key) pair over the L·(L+1)/2 pairs a causal mask keeps."""
    blocks = 2 * s.layers * s.llm_layer_matmul_params * seq_len
    head = 2 * s.lm_head_params * logits_positions
    attention = s.layers * 4 * s.d * seq_len * (seq_len + 1) // 2
    return blocks + head + attention


def vit_forward_flops(s: Shapes) -> int:
    """One image through conv1 and the ViT blocks (full bidirectional attention over the P patches)."""
    return 2 * s.vit_matmul_params * s.patches + s.vit_layers * 4 * s.vit_width * s.patches**2


def adapter_forward_flops(s: Shapes) -> int:
    """One image through the adapter: kv_proj, Q/K/V and out projections, Q×P cross-attention, and `@ proj`."""
    return _kv_proj_flops(s) + _adapter_attention_flops(s) + _proj_flops(s)


def _kv_proj_flops(s: Shapes) -> int:
    return 2 * s.patches * s.vit_width * s.d


def _adapter_attention_flops(s: Shapes) -> int:
    """Q projection of the learned queries, K/V projections of the patches, QKᵀ and AV, out_proj."""
    d, p, q = s.d, s.patches, s.queries
    return 2 * q * d * d + 4 * p * d * d + 4 * q * p * d + 2 * q * d * d


def _proj_flops(s: Shapes) -> int:
    return 2 * s.queries * s.d * s.d


def position_resize_flops(s: Shapes) -> int:
    """Resizing the ViT's 16×16 positional table and the adapter's √Q×√Q one to the √P×√P patch grid: two small
    matmuls each (`get_abs_pos`), once per vision forward whatever the number of images; none where the grids match."""
    target = math.isqrt(s.patches)
    total = 0
    for source, channels in ((16, s.vit_width), (math.isqrt(s.queries), s.d)):
        if source != target:
            total += 2 * (target * source * source + target * target * source) * channels
    return total


def train_step_flops(s: Shapes, batch: int, seq_len: int, images: int) -> int:
    """Forward + backward of one stage-2 SFT step, counting the gradients that are actually computed.

    As in the release's `finetune.py` (`fix_vit`), the ViT trunk, `ln_post` and `proj` are frozen and the adapter and
    the whole LLM train. A trained matmul costs 3× its forward (forward, input gradient, weight gradient); the ViT runs
    forward only; `kv_proj` needs no input gradient (its input, the frozen ViT's output, has none) and the frozen
    `proj` no weight gradient, so each costs 2× forward. Every position gets logits (the loss needs them all).
    """
    llm = batch * llm_forward_flops(s, seq_len, logits_positions=seq_len)
    per_image = 3 * _adapter_attention_flops(s) + 2 * _kv_proj_flops(s) + 2 * _proj_flops(s) + vit_forward_flops(s)
    return 3 * llm + images * per_image + position_resize_flops(s)  # the tables are frozen: forward only


def prefill_flops(s: Shapes, batch: int, prompt_len: int, images: int) -> int:
    """The prompt forward of `generate`: vision for every image, blocks over the prompt, logits for the last token."""
    return (
        batch * llm_forward_flops(s, prompt_len, logits_positions=1)
        + images * (vit_forward_flops(s) + adapter_forward_flops(s))
        + position_resize_flops(s)
    )


def vision_flops(s: Shapes, images: int) -> int:
    return images * (vit_forward_flops(s) + adapter_forward_flops(s)) + position_resize_flops(s)


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step must read: every decoder block, `ln_f` and `lm_head`, at their stored dtype.

    The embedding table is excluded (a decode step gathers one row per sequence) and so are the ViT and adapter
    (they run at prefill only). KV-cache reads come on top of this and are reported separately.
    """
    base = model.transformer
    modules = [*base.h, base.ln_f, model.lm_head]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def kv_cache_bytes(s: Shapes, batch: int, length: int, bytes_per_value: int) -> int:
    """Keys and values of every layer for `length` cached positions."""
    return 2 * s.layers * batch * length * s.d * bytes_per_value
