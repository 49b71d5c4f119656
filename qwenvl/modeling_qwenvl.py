"""Qwen-VL for transformers 5: ViT-bigG-shaped encoder → position-aware adapter → Qwen decoder.

Parameter names and shapes are those of the original release (`transformer.visual.*`, `transformer.h.N.attn.c_attn`,
`mlp.w1/w2/c_proj`, ...), so its checkpoints and LoRA adapters load unchanged. Unlike the original, images arrive as
`pixel_values` tensors: the model never opens files or URLs, and never decodes paths from token ids.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_qwenvl import QwenVLConfig
from .generation_qwenvl import QwenVLChatMixin

IMAGE_MISMATCH = "Image features and image tokens do not match"


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain matmul attention; q/k/v are (batch, heads, length, head_dim), the output (batch, length, heads, head_dim)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _attention_interface(config: QwenVLConfig) -> Callable:
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


@functools.lru_cache(maxsize=16)
def _bicubic_resize_matrix(src: int, tgt: int, device: torch.device) -> torch.Tensor:
    """(tgt, src) weights of PyTorch's 1-D bicubic resize (align_corners=False, borders clamped), read off the basis.

    Bicubic resizing is separable, so a (src, src) grid resizes as `A @ grid @ A.T` per channel. Built outside
    inference mode so that a matrix first made during `generate` can later take part in training.
    """
    with torch.inference_mode(False), torch.no_grad():
        basis = torch.eye(src, dtype=torch.float32).reshape(src, 1, 1, src)
        rows = F.interpolate(basis, size=(1, tgt), mode="bicubic", align_corners=False)
        return rows.reshape(src, tgt).t().contiguous().to(device)


def get_abs_pos(abs_pos: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Resize a square (side², C) positional table to `num_positions` entries with bicubic interpolation in fp32.

    Both the ViT's 16×16 table and the adapter's key positions are stored for a 224-px grid and stretched to the
    actual grid (32×32 at 448 px), as in the original. Same values as `F.interpolate(..., mode="bicubic")`, computed
    as two small matmuls: PyTorch's bicubic CUDA kernel loops over the channels inside each thread and took 6.6 ms
    per call on an H100 (13 ms, 6 % of the 1 B benchmark's training step).
    """
    src = int(math.sqrt(abs_pos.shape[0]))
    tgt = int(math.sqrt(num_positions))
    if src == tgt:
        return abs_pos
    resize = _bicubic_resize_matrix(src, tgt, abs_pos.device)
    grid = abs_pos.float().reshape(src, src, -1)
    grid = torch.matmul(resize, grid.transpose(0, 1))  # columns: (src_x, tgt_y, C)
    grid = torch.matmul(resize, grid.transpose(0, 1))  # rows:    (tgt_y, tgt_x, C)
    return grid.flatten(0, 1).to(abs_pos.dtype)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """The adapter's fixed 2-D sin-cos table (MAE recipe): first half of each row encodes the column, second the row."""

    def encode_1d(dim: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float32), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([encode_1d(embed_dim // 2, grid_w), encode_1d(embed_dim // 2, grid_h)], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Language-model loss without the full logits
# ----------------------------------------------------------------------------------------------------------------


def _summed_token_loss(lm_head: nn.Module, hidden_states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden_states).float(), targets, reduction="sum")


def chunked_causal_lm_loss(
    lm_head: nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor | None,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal LM loss of `lm_head(hidden_states)` (same value as transformers' `ForCausalLMLoss`) computed without
    the (batch, length, vocab) logits.

    Only positions with a label go through the head (prompts and image tokens carry none in SFT), `chunk_size` of them
    at a time, and each chunk's fp32 logits are recomputed in backward instead of kept. At the release's vocabulary of
    151,936 tokens the full logits of one 2,048-token sample take 1.2 GB in fp32, and their gradient as much again.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden_states.device)
    has_label = shift_labels != ignore_index
    hidden_states, targets = hidden_states[has_label], shift_labels[has_label]
    chunk_losses = [
        torch.utils.checkpoint.checkpoint(
            _summed_token_loss, lm_head, hidden_states[start : start + chunk_size],
            targets[start : start + chunk_size], use_reentrant=False,
        )
        for start in range(0, targets.numel(), chunk_size)
    ]
    # With no labelled position there is still a graph to call backward on (as with the full logits).
    total = torch.stack(chunk_losses).sum() if chunk_losses else hidden_states.sum() * 0.0
    if num_items_in_batch is None:
        return total / has_label.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# ----------------------------------------------------------------------------------------------------------------
# Vision tower: `transformer.visual`
# ----------------------------------------------------------------------------------------------------------------


class VisualAttention(nn.Module):
    """ViT self-attention with the original Megatron packing: `in_proj` rows are [head][q|k|v][head_dim]."""

    def __init__(self, config: QwenVLConfig, width: int, heads: int):
        super().__init__()
        self.config = config
        self.num_heads = heads
        self.head_dim = width // heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        qkv = self.in_proj(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        query, key, value = qkv.split(self.head_dim, dim=-1)
        attn_output, _ = _attention_interface(self.config)(
            self, query.contiguous(), key.contiguous(), value.contiguous(), None, scaling=self.scaling, dropout=0.0
        )
        return self.out_proj(attn_output.reshape(batch, length, -1))


class VisualMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.gelu = nn.GELU()  # exact erf GELU, as in the release
        self.c_proj = nn.Linear(mlp_width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(hidden_states)))


class VisualAttentionBlock(GradientCheckpointingLayer):
    def __init__(self, config: QwenVLConfig):
        super().__init__()
        v = config.visual
        self.ln_1 = nn.LayerNorm(v["width"], eps=1e-6)
        self.ln_2 = nn.LayerNorm(v["width"], eps=1e-6)
        self.attn = VisualAttention(config, v["width"], v["heads"])
        self.mlp = VisualMLP(v["width"], int(v["width"] * v["mlp_ratio"]))

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class TransformerBlocks(nn.Module):
    """Holds `resblocks` so the checkpoint keys read `visual.transformer.resblocks.N`."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.resblocks = nn.ModuleList([VisualAttentionBlock(config) for _ in range(config.visual["layers"])])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            hidden_states = block(hidden_states)
        return hidden_states


class ResamplerAttention(nn.Module):
    """Cross-attention with `nn.MultiheadAttention`'s parameter layout ([Q;K;V] `in_proj_weight`), any backend."""

    def __init__(self, config: QwenVLConfig, embed_dim: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.linear(x, w, b).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        batch, n_queries, _ = query.shape
        attn_output, _ = _attention_interface(self.config)(
            self, heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v), None,
            scaling=self.scaling, dropout=0.0,
        )
        return self.out_proj(attn_output.reshape(batch, n_queries, -1))


class Resampler(nn.Module):
    """The position-aware adapter: `n_queries` learned queries cross-attend once over the ViT patches.

    Fixed 2-D sin-cos positions are added to the queries and (resized to the patch grid) to the keys, never to the
    values. `pos_embed` is a frozen parameter because the release stores it in the checkpoint.
    """

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        v = config.visual
        embed_dim = v["output_dim"]
        self.grid_size = int(math.sqrt(v["n_queries"]))
        self.query = nn.Parameter(torch.empty(v["n_queries"], embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(v["n_queries"], embed_dim), requires_grad=False)
        self.kv_proj = nn.Linear(v["width"], embed_dim, bias=False)
        self.attn = ResamplerAttention(config, embed_dim, embed_dim // config.kv_channels)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(patches))
        query = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(patches.shape[0], -1, -1)
        key = kv + get_abs_pos(self.pos_embed, patches.shape[1]).to(kv.dtype)
        return self.attn(query.to(kv.dtype), key, kv)


class VisionTransformer(nn.Module):
    """`transformer.visual`: patchify → ViT → adapter → `ln_post` → `@ proj`, giving (n_images, n_queries, hidden)."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        v = config.visual
        self.image_size = v["image_size"]
        self.patch_size = v["patch_size"]
        self.conv1 = nn.Conv2d(3, v["width"], kernel_size=v["patch_size"], stride=v["patch_size"], bias=False)
        # 16×16 table as in the release (the 224-px grid), stretched to the actual grid on every forward.
        self.positional_embedding = nn.Parameter(torch.empty(256, v["width"]))
        self.ln_pre = nn.LayerNorm(v["width"], eps=1e-6)
        self.transformer = TransformerBlocks(config)
        self.attn_pool = Resampler(config)
        self.ln_post = nn.LayerNorm(v["output_dim"], eps=1e-6)
        self.proj = nn.Parameter(torch.empty(v["output_dim"], v["output_dim"]))

    def _trunk_parameters(self):
        yield from self.conv1.parameters()
        yield self.positional_embedding
        yield from self.ln_pre.parameters()
        yield from self.transformer.parameters()

    def encode_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the ViT trunk; a frozen trunk runs without building an autograd graph."""
        frozen = not any(p.requires_grad for p in self._trunk_parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            x = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
            x = x + get_abs_pos(self.positional_embedding, x.shape[1]).to(x.dtype)
            return self.transformer(self.ln_pre(x))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (n_images, 3, H, W), got {tuple(pixel_values.shape)}")
        if pixel_values.shape[-1] % self.patch_size or pixel_values.shape[-2] != pixel_values.shape[-1]:
            raise ValueError(
                f"pixel_values must be square images whose side is a multiple of {self.patch_size}, "
                f"got {tuple(pixel_values.shape[-2:])} (the processor resizes to {self.image_size})"
            )
        return self.pool_patches(self.encode_patches(pixel_values))

    def pool_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The adapter on top of the trunk: patch features → the image tokens the LLM reads."""
        return self.ln_post(self.attn_pool(patches)) @ self.proj


# ----------------------------------------------------------------------------------------------------------------
# Language model: `transformer.wte`, `transformer.h.N`, `transformer.ln_f`
# ----------------------------------------------------------------------------------------------------------------


# A CPU inference product of at most this many rows is split over the threads (`QwenVLLinear`): split, the 102 M
# benchmark model's 41 products ran 1.2-1.6x faster up to 128 rows, 1.07x at 256, 0.94x at 512 (RESULTS, optim. 23).
_SLICED_PRODUCT_MAX_ROWS = 128
# ... and only for weights of at least this many elements (a 192 x 192 one was slower split: 24 against 20 us).
_SLICED_PRODUCT_MIN_NUMEL = 65536


@torch.compiler.assume_constant_result
def _intra_op_threads() -> int:
    """torch's thread count; a constant to `torch.compile` (`get_num_threads` would break the graph), so a compiled
    step keeps the split it was traced with: the result is the same, only the speed depends on it."""
    return torch.get_num_threads()


def _weight_slices(weight: torch.Tensor) -> int:
    """How many row blocks `QwenVLLinear` splits `weight` into for a few-row CPU product (0: do not split)."""
    if weight.numel() < _SLICED_PRODUCT_MIN_NUMEL or not weight.is_contiguous():
        return 0
    threads = _intra_op_threads()
    if threads < 2:
        return 0
    for slices in (4 * threads, 2 * threads, threads):
        if weight.shape[0] % slices == 0:
            return slices
    return 0


class QwenVLLinear(nn.Linear):
    """`nn.Linear` whose few-row products on the CPU, without gradients, read the weight on every thread.

    A decode step is one matrix-vector product per projection (or one of a few rows per sequence of the batch) and
    is bound by reading the weights, yet on the 2-vCPU AVX2 host we measure the BLAS product of one row runs on one
    thread (~13-15 GB/s where a two-thread copy reaches ~27), and products of up to ~128 rows are poorly threaded too.
    So:

    - fp32, 1-128 rows: the weight is viewed as `k` blocks of output rows and multiplied in one `bmm`, which torch
      spreads over the threads (~20-25 GB/s at one row; the 102 M benchmark model's eager decode step 27.0 -> 20.3 ms
      at batch 1, 63.7 -> 40.9 ms at batch 8, 123.6 -> 94.1 ms at batch 32; compiled steps 55.2 -> 35.8 ms at batch
      8; benchmarks/RESULTS.md, optimisation 23). No copy: the blocks are a view. Each output is the same dot
      product, summed by another kernel.
    - compiled (`qwenvl.inference.compiled_decode_config`), one row, any dtype: the product is written as a
      multiply-and-sum, which inductor turns into one vectorised reduction per layer (~32 GB/s; 21.3 -> 15.0 ms,
      optimisation 22).

    Training, autocast, other devices and dtypes, one thread, small weights and more rows take plain `F.linear`.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            rows = input.shape[:-1].numel()
            if rows == 1 and torch.compiler.is_compiling():
                output = (input.unsqueeze(-2).float() * self.weight.float()).sum(-1).to(input.dtype)
                return output if self.bias is None else output + self.bias
            if rows <= _SLICED_PRODUCT_MAX_ROWS and self.weight.dtype == input.dtype == torch.float32:
                slices = _weight_slices(self.weight)
                if slices:
                    return self._sliced_product(input, slices)
        return F.linear(input, self.weight, self.bias)

    def _sliced_product(self, input: torch.Tensor, slices: int) -> torch.Tensor:
        out_features, in_features = self.weight.shape
        rows = input.shape[:-1].numel()
        blocks = self.weight.view(slices, out_features // slices, in_features).transpose(1, 2)
        inputs = input.reshape(1, rows, in_features).expand(slices, rows, in_features)
        if self.bias is None:
            output = torch.bmm(inputs, blocks)
        else:
            output = torch.baddbmm(self.bias.view(slices, 1, out_features // slices), inputs, blocks)
        return output.transpose(0, 1).reshape(*input.shape[:-1], out_features)


class QwenVLRMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype before the weight multiply (as the original)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(hidden_states.dtype) * self.weight


class QwenVLRotaryEmbedding(nn.Module):
    """Rotate-half RoPE over `rotary_pct` of each head, with the release's dynamic NTK scaling at inference.

    In eval mode a prefill longer than `seq_length` raises the base by α^(d/(d-2)), α = 2^⌈log2(L/seq_length)+1⌉ − 1;
    the α chosen at prefill is kept for the decode steps that follow. Training always uses α = 1.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.config = config
        self.dim = int(config.kv_channels * config.rotary_pct)
        self.ntk_alpha = 1.0
        self.register_buffer("inv_freq", self.compute_inv_freq(1.0), persistent=False)

    def compute_inv_freq(self, alpha: float, device: torch.device | None = None) -> torch.Tensor:
        base = self.config.rotary_emb_base * alpha ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))

    def update_ntk_alpha(self, seq_len: int) -> None:
        alpha = 1.0
        if self.config.use_dynamic_ntk and seq_len > self.config.seq_length:
            alpha = max(2 ** math.ceil(math.log2(seq_len / self.config.seq_length) + 1) - 1, 1)
        self.ntk_alpha = float(alpha)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = 1.0 if self.training else self.ntk_alpha
        inv_freq = self.inv_freq if alpha == 1.0 else self.compute_inv_freq(alpha, self.inv_freq.device)
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of x (batch, heads, length, head_dim); any remainder passes through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


class QwenVLCacheLayer(DynamicLayer):
    """A `DynamicLayer` that appends in place: each decode step copies its own keys and values, not the whole cache.

    `DynamicLayer.update` concatenates, copying every cached position at every step (quadratic in the generated
    length). Here `keys`/`values` are views of the filled part of larger buffers; when an update does not fit, the
    buffers are regrown by an eighth of the needed length (at least 16 positions), never past `max_length` (what
    `generate` can reach) while that suffices. So the spare capacity is at most ~1/8 of the cache, and the first update
    allocates exactly its own length: a forward that never decodes holds what `DynamicLayer` would. The inherited
    methods (crop, batch selection, beam reordering, offloading) replace `keys`/`values` by other tensors; the next
    update sees that they no longer view its buffers and regrows from them. As with a static cache, a crop followed
    by an update overwrites positions that views taken before the crop still show.
    """

    def __init__(self, max_length: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def _views_buffers(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> bool:
        """Whether `keys`/`values` still start the buffers, and the buffers fit `needed` positions of these states."""
        pairs = ((self.keys, self.key_buffer, key_states), (self.values, self.value_buffer, value_states))
        for cached, buffer, new in pairs:
            if (
                buffer is None
                or buffer.shape[-2] < needed
                or buffer.shape[:-2] != new.shape[:-2]
                or buffer.shape[-1] != new.shape[-1]
                or buffer.dtype != new.dtype
                or buffer.device != new.device
                or cached.data_ptr() != buffer.data_ptr()
                or cached.shape[:-2] != buffer.shape[:-2]
                or cached.stride() != buffer.stride()
            ):
                return False
        return True

    def _regrow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, needed: int) -> None:
        capacity = needed
        if length:
            capacity += max(needed // 8, 16)
            if self.max_length is not None and needed <= self.max_length:
                capacity = min(capacity, self.max_length)
        buffers = []
        for cached, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
            if length:
                buffer[..., :length, :].copy_(cached)
            buffers.append(buffer)
        self.key_buffer, self.value_buffer = buffers

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # Traced code cannot compare data pointers (a graph break per layer): concatenate, as `DynamicLayer` does;
            # the next eager update regrows from the result. Compiled decoding proper uses a static cache.
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not self._views_buffers(key_states, value_states, needed):
            self._regrow(key_states, value_states, length, needed)
        self.key_buffer[..., length:needed, :].copy_(key_states)
        self.value_buffer[..., length:needed, :].copy_(value_states)
        self.keys = self.key_buffer[..., :needed, :]
        self.values = self.value_buffer[..., :needed, :]
        return self.keys, self.values

    def offload(self) -> None:
        # Held buffers would keep the device memory that offloading frees; the next update regrows from the prefetch.
        super().offload()
        self.key_buffer = self.value_buffer = None

    def reset(self) -> None:
        super().reset()
        self.key_buffer = self.value_buffer = None


class QwenVLCache(DynamicCache):
    """The default cache of the model's forwards and of `generate`: a `DynamicCache` of `QwenVLCacheLayer`s.

    `max_length`: the most positions the cache will hold (`generate` passes its `max_length - 1`), which bounds the
    layers' spare capacity; without it they grow by an eighth.
    """

    def __init__(self, config: QwenVLConfig | None = None, max_length: int | None = None, **kwargs):
        super().__init__(config=config, **kwargs)
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = QwenVLCacheLayer
        self.layers = [
            QwenVLCacheLayer(max_length) if type(layer) is DynamicLayer and not layer.is_initialized else layer
            for layer in self.layers
        ]


class QwenVLAttention(nn.Module):
    """Causal self-attention: fused `c_attn` ([Q|K|V], the only biased projection) and `c_proj`."""

    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.projection_size = self.num_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.num_key_value_groups = 1
        self.c_attn = QwenVLLinear(config.hidden_size, 3 * self.projection_size)
        self.c_proj = QwenVLLinear(self.projection_size, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        logn_scale: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query, key, value = (
            t.view(*input_shape, self.num_heads, self.head_dim).transpose(1, 2)
            for t in self.c_attn(hidden_states).split(self.projection_size, dim=-1)
        )
        cos, sin = position_embeddings
        query = apply_rotary_pos_emb(query, cos, sin)
        key = apply_rotary_pos_emb(key, cos, sin)
        if logn_scale is not None:
            query = query * logn_scale[:, None, :, None].to(query.dtype)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention = _attention_interface(self.config)
        attn_output, attn_weights = attention(
            self, query, key, value, attention_mask,
            dropout=self.config.attn_dropout_prob if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return self.c_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


class QwenVLMLP(nn.Module):
    """SwiGLU with the release's naming: `w2` is the SiLU gate, `w1` the linear branch, `c_proj` the output."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        ff_dim = config.intermediate_size // 2
        self.w1 = QwenVLLinear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.w2 = QwenVLLinear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.c_proj = QwenVLLinear(ff_dim, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(hidden_states) * F.silu(self.w2(hidden_states)))


class QwenVLBlock(GradientCheckpointingLayer):
    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = QwenVLRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QwenVLAttention(config, layer_idx)
        self.ln_2 = QwenVLRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QwenVLMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        logn_scale: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.attn(
            self.ln_1(hidden_states), position_embeddings, attention_mask=attention_mask, cache=cache,
            logn_scale=logn_scale, **kwargs,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained model classes
# ----------------------------------------------------------------------------------------------------------------


class QwenVLPreTrainedModel(PreTrainedModel):
    config_class = QwenVLConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QwenVLBlock", "VisualAttentionBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": QwenVLBlock, "attentions": QwenVLAttention}
    input_modalities = ("image", "text")

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, QwenVLRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(1.0))
        elif isinstance(module, QwenVLAttention) or isinstance(module, QwenVLMLP):
            # GPT-2-style scaled init of residual output projections, as the release.
            init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, ResamplerAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.trunc_normal_(module.kv_proj.weight, std=0.02)
            table = torch.from_numpy(get_2d_sincos_pos_embed(module.query.shape[1], module.grid_size))
            init.copy_(module.pos_embed, table)
        elif isinstance(module, VisionTransformer):
            width = module.positional_embedding.shape[1]
            init.normal_(module.positional_embedding, std=width**-0.5)
            init.normal_(module.proj, std=module.proj.shape[0] ** -0.5)


class QwenVLModel(QwenVLPreTrainedModel):
    """Embeddings, image fusion and the decoder; returns the final hidden states.

    It takes `pixel_values` itself because TRL's trainers call the base model directly and apply `lm_head` on their own.
    """

    _input_embed_layer = "wte"

    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList([QwenVLBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = QwenVLRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = QwenVLRotaryEmbedding(config)
        self.visual = VisionTransformer(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images once: (n_images, 3, S, S) → (n_images, n_queries, hidden). Reusable across forwards."""
        return self.visual(pixel_values)

    def merge_image_features(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write image k's features over the k-th `<imgpad>` run (row-major), checking the spans first."""
        n_images, n_queries = image_features.shape[:2]
        n_spans = int((input_ids == self.config.image_start_id).sum())
        image_mask = input_ids == self.config.image_token_id
        n_tokens = int(image_mask.sum())
        if n_spans != n_images or n_tokens != n_images * n_queries:
            raise ValueError(
                f"{IMAGE_MISMATCH}: {n_images} image(s) of {n_queries} features were given, but input_ids hold "
                f"{n_spans} <img> span(s) and {n_tokens} <imgpad> tokens (expected {n_images * n_queries}). "
                "Was the prompt truncated through an image, or built without the processor?"
            )
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))

    def _position_ids(self, attention_mask, past_seen: int, length: int, device) -> torch.Tensor:
        """Positions count real tokens only, so a left-padded row sees the same RoPE angles as when alone."""
        if attention_mask is not None and attention_mask.ndim == 2:
            position_ids = attention_mask.long().cumsum(-1) - 1
            return position_ids.clamp_(min=0)[:, -length:]
        return torch.arange(past_seen, past_seen + length, device=device).unsqueeze(0)

    def _logn_scale(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """LogN attention scaling of the release: queries past `seq_length` are scaled by log(p)/log(seq_length)."""
        if self.training or not self.config.use_logn_attn:
            return None
        # Eager calls skip the scaling inside the trained context; a compiled decode step cannot read the positions
        # without a graph break, and computes the scale (all ones inside that context) instead.
        if not torch.compiler.is_compiling() and int(position_ids.max()) + 1 <= self.config.seq_length:
            return None
        positions = (position_ids + 1).float()
        scale = torch.log(positions) / math.log(self.config.seq_length)
        return torch.where(positions > self.config.seq_length, scale, torch.ones_like(scale))

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(n_images, 3, image_size, image_size)`):
            Images in row-major order of their `<img>` spans in `input_ids`.
        image_features (`torch.FloatTensor` of shape `(n_images, n_queries, hidden_size)`):
            Output of `get_image_features`, to reuse image encodings across forwards instead of `pixel_values`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass either pixel_values or image_features, not both")
        if use_cache and cache is None and not self.training:
            cache = QwenVLCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        # A compiled forward is a decode step (`generate` compiles only those, prefill runs eagerly): the prefill-only
        # checks below read tensor values, which would break the graph.
        first_forward = not torch.compiler.is_compiling() and past_seen == 0

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
            if pixel_values is not None:
                image_features = self.get_image_features(pixel_values)
            if image_features is not None:
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
            elif first_forward and bool((input_ids == self.config.image_token_id).any()):
                raise ValueError(
                    f"{IMAGE_MISMATCH}: input_ids hold image placeholder tokens but no pixel_values were given"
                )
        elif pixel_values is not None or image_features is not None:
            raise ValueError("Images need input_ids (to locate their <imgpad> spans), not inputs_embeds")
        hidden_states = self.drop(inputs_embeds)

        length = hidden_states.shape[1]
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, past_seen, length, hidden_states.device)
        if first_forward and not self.training:
            self.rotary_emb.update_ntk_alpha(length)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        logn_scale = self._logn_scale(position_ids)

        for block in self.h:
            hidden_states = block(
                hidden_states, position_embeddings, attention_mask=causal_mask, cache=cache, logn_scale=logn_scale,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden_states), cache=cache)


class QwenVLForConditionalGeneration(QwenVLChatMixin, QwenVLPreTrainedModel, GenerationMixin):
    """Qwen-VL with its (untied) LM head: training loss, `generate`, and the chat helpers."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.transformer = QwenVLModel(config)
        self.lm_head = QwenVLLinear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"
        self.loss_chunk_size: int | None = None
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.transformer.get_image_features(pixel_values)

    def enable_chunked_loss(self, chunk_size: int | None = None) -> None:
        """Train without the (batch, length, vocab) logits (`chunked_causal_lm_loss`).

        In training mode, a forward with `labels` then returns the same loss and gradients but `logits=None`: the
        head runs only on labelled positions, `chunk_size` at a time (default: as many as make ~32 M logits), each
        chunk recomputed in backward. Evaluation and generation are unchanged. Costs one more head matmul per labelled
        position; saves the logits' fp32 copies, which at the release's 151,936-token vocabulary outweigh a 7 B
        model's per-token activations under gradient checkpointing.
        """
        if chunk_size is None:
            chunk_size = max(1, 2**25 // self.config.vocab_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
        self.loss_chunk_size = chunk_size

    def disable_chunked_loss(self) -> None:
        self.loss_chunk_size = None

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_features=image_features,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if self.loss_chunk_size and self.training and labels is not None:
            loss = chunked_causal_lm_loss(
                self.lm_head, hidden_states, labels, self.loss_chunk_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"), shift_labels=kwargs.get("shift_labels"),
            )
            return CausalLMOutputWithPast(
                loss=loss, cache=outputs.cache, hidden_states=outputs.hidden_states, attentions=outputs.attentions
            )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        # `generate` makes a plain `DynamicCache` unless told otherwise; ours appends in place (`QwenVLCacheLayer`).
        # A cache the caller passed, an offloaded one and an assistant's (which records its past) are left alone.
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
        cache = model_kwargs.get("cache")
        if (
            type(cache) is DynamicCache
            and not getattr(cache, "_is_user_defined", False)
            and not cache.offloading
            and not generation_config.is_assistant
        ):
            model_kwargs["cache"] = QwenVLCache(config=self.config, max_length=max_cache_length)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        # Precomputed `image_features` behave like `pixel_values`: used on prefill only.
        image_features = kwargs.pop("image_features", None)
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not model_inputs.get("use_cache", True):
            model_inputs["image_features"] = image_features
        return model_inputs


class QwenVLForSequenceClassification(QwenVLPreTrainedModel):
    """A score head on the last real token: reward models (`num_labels=1`) and, applied per token, value models."""

    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = QwenVLModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def last_token_index(self, input_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Index of each row's last attended token (works for left and right padding)."""
        if attention_mask is not None:
            mask = attention_mask.bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            mask = input_ids != self.config.pad_token_id
        else:
            raise ValueError("Pooling needs attention_mask, or input_ids with config.pad_token_id set")
        positions = torch.arange(mask.shape[-1], device=mask.device)
        return (positions * mask).argmax(-1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_features=image_features,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        index = self.last_token_index(input_ids, attention_mask)
        pooled = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), index]
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


@dataclass
class LikelihoodRewardOutput(SequenceClassifierOutputWithPast):
    """`QwenVLForLikelihoodReward`'s outputs: those of a one-label sequence classifier plus `token_rewards`, of shape
    `(batch, seq_len)`: each scored token's share of the reward (`reward_scale * log p(token)`) at its position, 0
    elsewhere; a row sums to its `logits` (up to rounding). PPO can credit each sampled token with its own share
    (`PPOConfig.dense_rewards`)."""

    token_rewards: torch.FloatTensor | None = None


class QwenVLForLikelihoodReward(QwenVLPreTrainedModel):
    """A reward model that scores a reply by its log-likelihood under a fine-tuned copy of the policy.

    `r = config.reward_scale * sum_t log p(token_t | image, prompt, earlier tokens)` over the last turn: the tokens
    after the last `config.reply_start_token_id` (the chat template's `<|im_start|>`; its role line and closing
    `<|im_end|>` included, identical for every reply to a prompt). Initialised from the SFT model it starts with what
    the policy already knows about the image and a pairwise ranking loss (`QwenVLRewardTrainer`) sharpens it; a
    score head on the last token of the same model must learn to check an answer against the image from the
    preference pairs alone, and on the demo's pairs it stayed at chance (docs/findings.md).

    Same weights as `QwenVLForConditionalGeneration` (an SFT folder loads as is) and the same outputs as
    `QwenVLForSequenceClassification` with `num_labels=1` (`logits` of shape (batch, 1)), so the reward trainer,
    PPO and `score_conversations` take either. A saved folder's `auto_map` points `AutoModelForSequenceClassification`
    at this class, so it loads back with `trust_remote_code=True`.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: QwenVLConfig, reply_start_token_id: int | None = None,
                 reward_scale: float | None = None):
        super().__init__(config)
        if reply_start_token_id is not None:
            config.reply_start_token_id = int(reply_start_token_id)
        if reward_scale is not None:
            config.reward_scale = float(reward_scale)
        if getattr(config, "reply_start_token_id", None) is None:
            raise ValueError(
                "QwenVLForLikelihoodReward needs config.reply_start_token_id, the id of the token that opens the "
                "scored turn (`<|im_start|>`), e.g. from_pretrained(path, reply_start_token_id="
                "tokenizer.convert_tokens_to_ids('<|im_start|>'))"
            )
        config.reward_scale = float(getattr(config, "reward_scale", 1.0))
        config.num_labels = 1
        self.transformer = QwenVLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def reply_mask(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """True at the attended tokens after each row's last `reply_start_token_id` (a row without one: after its
        first attended token)."""
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        starts = torch.where((input_ids == self.config.reply_start_token_id) & mask, positions, -1).amax(-1)
        first = torch.where(mask, positions, input_ids.shape[1]).amin(-1)
        starts = torch.where(starts >= 0, starts, first)
        return mask & (positions > starts[:, None])

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LikelihoodRewardOutput:
        if input_ids is None:
            raise ValueError("QwenVLForLikelihoodReward scores token ids: pass input_ids")
        kwargs.pop("use_cache", None)
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, pixel_values=pixel_values,
            image_features=image_features, use_cache=False, **kwargs,
        )
        scored = self.reply_mask(input_ids, attention_mask)
        # Only the scored span needs logits (a 151k vocabulary makes the full sequence's costly).
        first = int(scored.float().argmax(-1).min()) if scored.any() else input_ids.shape[1] - 1
        logits = self.lm_head(outputs.last_hidden_state[:, max(first - 1, 0) : -1])
        targets = input_ids[:, max(first, 1) :]
        token_logps = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        scored_logps = token_logps * scored[:, max(first, 1) :]
        rewards = scored_logps.sum(-1, keepdim=True) * self.config.reward_scale
        token_rewards = torch.zeros(input_ids.shape, dtype=token_logps.dtype, device=token_logps.device)
        token_rewards[:, max(first, 1) :] = scored_logps * self.config.reward_scale
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=rewards, labels=labels, pooled_logits=rewards, config=self.config)
        return LikelihoodRewardOutput(
            loss=loss, logits=rewards, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            token_rewards=token_rewards,
        )


# ----------------------------------------------------------------------------------------------------------------
# CPU inference: pre-packed linear weights
# ----------------------------------------------------------------------------------------------------------------


def _packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed, version, data_ptr = self._cpu_packed_weight
    weight = self.weight
    if (
        not torch.compiler.is_compiling()  # compiled, `QwenVLLinear` streams one-row weights faster itself
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dim() >= 2
        and x.dtype == weight.dtype
        and weight._version == version
        and weight.data_ptr() == data_ptr
    ):
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
    return type(self).forward(self, x)  # compiled, training, another dtype, or weights changed since packing


def _cpu_can_pack_bf16_linear() -> bool:
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        ops._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
    except RuntimeError:  # "bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"
        return False
    return True


def pack_linear_weights_for_cpu(model: nn.Module) -> int:
    """Keep a copy of every bf16 `nn.Linear` weight in oneDNN's blocked layout, for CPU inference (e.g. generation).

    With plain weights oneDNN re-lays each one out on every call, which at decode time (one row per sequence) costs
    about as much as the product itself; packed, a decode step is ~25 % faster (benchmarks/RESULTS.md), with identical
    outputs. Costs one extra copy of those weights. Calls with gradients enabled, in another dtype, or after the
    weight changed (loading, `.to()`, training) use the plain weight. Returns the number of layers packed (0 where
    this torch build has no oneDNN, or this CPU no bf16 kernels for it: oneDNN's bf16 path needs AVX-512 or
    AVX-NE-CONVERT, which an AVX2-only CPU lacks; the model is then left unchanged).
    """
    if not _cpu_can_pack_bf16_linear():
        return 0
    packed = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
            module._cpu_packed_weight = (
                torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), weight._version, weight.data_ptr()
            )
            module.forward = _packed_linear_forward.__get__(module)
            packed += 1
    return packed


__all__ = [
    "QwenVLPreTrainedModel",
    "QwenVLModel",
    "QwenVLForConditionalGeneration",
    "QwenVLForSequenceClassification",
    "QwenVLForLikelihoodReward",
]
