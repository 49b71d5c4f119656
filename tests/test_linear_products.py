"""`QwenVLLinear`: the decoder's projections and LM head compute few-row CPU inference products their own way (fp32
ones split over the threads; one row, when compiled, a weight-streaming reduction) with `F.linear`'s result, and every
other call is exactly `F.linear`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwenvl.modeling_qwenvl as modeling
from conftest import split_config_kwargs
from qwenvl import QwenVLConfig, QwenVLForConditionalGeneration
from qwenvl.modeling_qwenvl import QwenVLLinear

SPLIT_OPS = {"aten::bmm", "aten::baddbmm"}
LINEAR_OPS = {"aten::mm", "aten::addmm", "aten::linear"}


def _eager_ops(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    """`module(x)` and the names of the aten ops it ran."""
    with torch.profiler.profile() as profile:
        out = module(x)
    return out, {event.name for event in profile.events()}


def _traced_ops(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """`module(x)` through dynamo, and the names of the functions and methods its graph calls."""
    ops = []

    def record(graph_module, example_inputs):
        ops.extend(str(getattr(node.target, "__name__", node.target)) for node in graph_module.graph.nodes
                   if node.op in ("call_function", "call_method"))
        return graph_module.forward

    torch._dynamo.reset()
    return torch.compile(module, backend=record)(x), ops


# ----------------------------------------------------------------------------------------------------------------
# Eager: fp32 products of 1-128 rows split over the threads
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 256), (3, 1, 256), (2, 4, 256), (4, 32, 256)])  # 1-128 rows
def test_an_eager_few_row_product_is_split_over_the_threads_with_the_linear_result(shape, bias):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    layer = QwenVLLinear(256, 512, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        out, ops = _eager_ops(layer, x)
        expected = F.linear(x, layer.weight, layer.bias)

    assert ops & SPLIT_OPS and not ops & LINEAR_OPS
    assert out.shape == expected.shape == (*shape[:-1], 512) and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["one thread", "129 rows", "gradients", "autocast", "bf16", "small weight",
                                  "indivisible outputs"])
def test_every_other_eager_call_is_exactly_the_linear(case):
    torch.manual_seed(0)
    torch.set_num_threads(1 if case == "one thread" else 2)
    # 256 x 256 weights are the smallest split; 511 outputs divide into no multiple of the two threads.
    in_features, out_features = {"small weight": (128, 256), "indivisible outputs": (256, 511)}.get(case, (256, 512))
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    layer = QwenVLLinear(in_features, out_features).to(dtype)
    x = torch.randn(129 if case == "129 rows" else 1, 1, in_features, dtype=dtype)
    with torch.set_grad_enabled(case == "gradients"), torch.autocast("cpu", enabled=case == "autocast"):
        out, ops = _eager_ops(layer, x)
        expected = F.linear(x, layer.weight, layer.bias)

    assert not ops & SPLIT_OPS
    assert torch.equal(out, expected)


def test_greedy_decoding_gives_the_same_tokens_split_or_not(monkeypatch):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = QwenVLForConditionalGeneration(QwenVLConfig(**split_config_kwargs())).eval()
    prompt = torch.randint(2, 250, (2, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=1)

    with torch.inference_mode():
        with torch.profiler.profile() as profile:
            split = model.generate(prompt, **kwargs)
        monkeypatch.setattr(modeling, "_SLICED_PRODUCT_MAX_ROWS", 0)
        plain = model.generate(prompt, **kwargs)

    assert SPLIT_OPS & {event.name for event in profile.events()}
    assert torch.equal(split, plain)


# ----------------------------------------------------------------------------------------------------------------
# Compiled: one-row products as a reduction, 2-128 rows split over the threads
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_a_compiled_one_row_product_is_a_reduction_with_the_linear_result(bias):
    torch.manual_seed(0)
    layer = QwenVLLinear(48, 80, bias=bias)
    x = torch.randn(1, 1, 48)
    with torch.no_grad():
        out, ops = _traced_ops(layer, x)
        expected = F.linear(x, layer.weight, layer.bias)

    assert "linear" not in ops and "sum" in ops
    assert out.shape == expected.shape == (1, 1, 80) and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_a_compiled_few_row_product_is_split_over_the_threads_without_graph_breaks():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    layer = QwenVLLinear(256, 512)
    x = torch.randn(4, 1, 256)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        out, ops = _traced_ops(layer, x)
        expected = F.linear(x, layer.weight, layer.bias)

    assert "baddbmm" in ops and "linear" not in ops and "sum" not in ops
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["one thread", "129 rows", "gradients", "autocast"])
def test_every_other_compiled_call_is_the_plain_linear(case):
    torch.manual_seed(0)
    torch.set_num_threads(1 if case == "one thread" else 2)
    layer = QwenVLLinear(256, 512)
    x = torch.randn(129 if case == "129 rows" else 4 if case == "one thread" else 1, 1, 256)
    with torch.set_grad_enabled(case == "gradients"), torch.autocast("cpu", enabled=case == "autocast"):
        _, ops = _traced_ops(layer, x)

    assert "linear" in ops and "sum" not in ops and "bmm" not in ops and "baddbmm" not in ops
