"""`localize_adapter`: a fresh adapter's queries start by pooling the patches of their own grid cell."""

from __future__ import annotations

import pytest
import torch

from qwenvl import QwenVLConfig, QwenVLForConditionalGeneration
from qwenvl.modeling_qwenvl import get_abs_pos
from qwenvl.train import localize_adapter

from conftest import tiny_config_kwargs


def _model() -> QwenVLForConditionalGeneration:
    torch.manual_seed(0)
    visual = dict(image_size=64, patch_size=8, width=32, layers=1, heads=4, mlp_ratio=2.0, output_dim=64,
                  image_start_id=300, n_queries=16)
    return QwenVLForConditionalGeneration(QwenVLConfig(**tiny_config_kwargs(visual=visual)))


def _attention(model, patches: torch.Tensor) -> torch.Tensor:
    """The adapter's attention probabilities, (heads, queries, patches), recomputed from its parameters."""
    resampler = model.transformer.visual.attn_pool
    attention = resampler.attn
    kv = resampler.ln_kv(resampler.kv_proj(patches))
    query = resampler.ln_q(resampler.query) + resampler.pos_embed
    key = kv + get_abs_pos(resampler.pos_embed, patches.shape[0])
    w_q, w_k, _ = attention.in_proj_weight.chunk(3)
    b_q, b_k, _ = attention.in_proj_bias.chunk(3)
    heads, head_dim = attention.num_heads, attention.head_dim
    q = (query @ w_q.T + b_q).unflatten(-1, (heads, head_dim)).transpose(0, 1)
    k = (key @ w_k.T + b_k).unflatten(-1, (heads, head_dim)).transpose(0, 1)
    return torch.softmax(q @ k.transpose(1, 2) * attention.scaling, dim=-1)


def _own_cell_mass(probabilities: torch.Tensor) -> float:
    """Mean attention mass each query (4×4 grid) puts on the 2×2 patches (8×8 grid) under its own cell."""
    masses = []
    for query in range(16):
        row, col = divmod(query, 4)
        cell = [(2 * row + dy) * 8 + 2 * col + dx for dy in (0, 1) for dx in (0, 1)]
        masses.append(probabilities.mean(0)[query, cell].sum())
    return float(torch.stack(masses).mean())


@torch.no_grad()
def test_localized_queries_attend_to_their_own_grid_cell():
    patches = torch.randn(64, 32)
    model = _model()
    uniform_share = 4 / 64
    assert _own_cell_mass(_attention(model, patches)) < 2 * uniform_share  # default init: nearly uniform

    localize_adapter(model)

    assert _own_cell_mass(_attention(model, patches)) > 0.4
    features = model.transformer.visual(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(features).all()


def test_localized_adapter_still_trains_everything():
    model = _model()
    localize_adapter(model)
    resampler = model.transformer.visual.attn_pool
    model.transformer.visual(torch.randn(2, 3, 64, 64)).square().mean().backward()
    for name in ("query", "kv_proj.weight", "attn.in_proj_weight", "ln_q.weight", "ln_kv.weight"):
        assert resampler.get_parameter(name).grad.abs().sum() > 0, name


def test_localize_adapter_refuses_models_without_an_adapter_and_too_many_frequencies():
    with pytest.raises(ValueError, match="adapter"):
        localize_adapter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="head_dim"):
        localize_adapter(_model(), n_frequencies=5)  # 4 × 5 columns > head_dim 16
