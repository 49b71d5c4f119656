"""Compiled decode steps over a static cache (`qwenvl.inference.compiled_decode_config`): the same tokens as eager
decoding with the dynamic cache, from one graph per step (no graph breaks). How each projection computes its product
there is in test_linear_products.py."""

from __future__ import annotations

import pytest
import torch

from conftest import split_config_kwargs, tiny_config_kwargs
from qwenvl import QwenVLConfig, QwenVLForConditionalGeneration
from qwenvl.inference import compiled_decode_config


def _image_prompt(config: QwenVLConfig, batch: int, text_tokens: int) -> dict:
    n_queries = config.visual["n_queries"]
    start = config.image_start_id
    span = [start] + [config.image_token_id] * n_queries + [start + 1]
    text = torch.randint(2, 250, (batch, text_tokens), generator=torch.Generator().manual_seed(0))
    input_ids = torch.cat([torch.tensor(span).expand(batch, -1), text], dim=1)
    pixels = torch.randn(batch, 3, config.visual["image_size"], config.visual["image_size"],
                         generator=torch.Generator().manual_seed(1))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def test_the_compile_config_works_off_accelerators_and_without_cuda_graphs():
    config = compiled_decode_config()
    assert config._compile_all_devices is True and config.mode == "default" and config.dynamic is False
    assert compiled_decode_config(fullgraph=True).fullgraph is True


@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch", "split"),
    # batch 1: every projection a one-row product, a reduction (`QwenVLLinear`); "split": two threads and weights
    # wide enough that products of 2 rows are split over the threads, eagerly and compiled.
    [(1, False), (2, False), (2, True)],
)
def test_compiled_static_cache_decoding_gives_the_eager_tokens_without_graph_breaks(batch, split):
    torch.manual_seed(0)
    if split:
        torch.set_num_threads(2)
    model = QwenVLForConditionalGeneration(
        QwenVLConfig(**(split_config_kwargs() if split else tiny_config_kwargs()))).eval()
    prompt = _image_prompt(model.config, batch=batch, text_tokens=5)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    with torch.inference_mode():
        eager = model.generate(**prompt, **kwargs)
        compiled = model.generate(**prompt, **kwargs, cache_implementation="static",
                                  compile_config=compiled_decode_config())

    assert torch.equal(eager, compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step did go through dynamo
    assert not torch._dynamo.utils.counters["graph_break"]
