"""The default KV cache appends in place (`QwenVLCacheLayer`) and behaves exactly like transformers' `DynamicLayer`."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache

from qwenvl import QwenVLCache
from qwenvl.modeling_qwenvl import QwenVLCacheLayer

from conftest import image_span, tiny_model


def states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, length, 8, generator=generator), torch.randn(batch, 2, length, 8, generator=generator))


def assert_same_layer(ours: QwenVLCacheLayer, reference: DynamicLayer) -> None:
    assert ours.get_seq_length() == reference.get_seq_length()
    assert torch.equal(ours.keys, reference.keys)
    assert torch.equal(ours.values, reference.values)


def both_layers(*updates: tuple[int, int]) -> tuple[QwenVLCacheLayer, DynamicLayer]:
    """A `QwenVLCacheLayer` and a `DynamicLayer` given the same updates, (batch, length) each."""
    ours, reference = QwenVLCacheLayer(), DynamicLayer()
    for seed, (batch, length) in enumerate(updates):
        returned = ours.update(*states(batch, length, seed))
        expected = reference.update(*states(batch, length, seed))
        assert all(torch.equal(a, b) for a, b in zip(returned, expected))
    return ours, reference


def test_decoding_one_position_at_a_time_equals_concatenation_and_rarely_regrows():
    ours, reference = both_layers((3, 40))
    assert ours.key_buffer.shape[-2] == 40, "the first update allocates exactly its own length"
    buffers_seen = {ours.key_buffer.data_ptr()}
    for step in range(200):
        key, value = states(3, 1, 100 + step)
        returned = ours.update(key, value)
        expected = reference.update(key, value)
        assert torch.equal(returned[0], expected[0]) and torch.equal(returned[1], expected[1])
        assert returned[0].data_ptr() == ours.key_buffer.data_ptr(), "keys are a view of the buffer, not a copy"
        buffers_seen.add(ours.key_buffer.data_ptr())
    assert_same_layer(ours, reference)
    assert ours.get_seq_length() == 240
    assert len(buffers_seen) <= 16, "growth by an eighth: a dozen reallocations for 200 steps, not one per step"
    assert ours.key_buffer.shape[-2] <= 240 + max(240 // 8, 16), "spare capacity: at most an eighth"


def test_spare_capacity_stops_at_max_length_while_it_suffices():
    ours = QwenVLCacheLayer(max_length=50)
    ours.update(*states(1, 45, 0))
    ours.update(*states(1, 1, 1))
    assert ours.key_buffer.shape[-2] == 50, "regrown to max_length, not by 16 positions past it"
    for seed in range(4):
        ours.update(*states(1, 1, 2 + seed))
    assert ours.key_buffer.shape[-2] == 50
    ours.update(*states(1, 1, 9))  # beyond max_length: still correct, growing as without it
    assert ours.get_seq_length() == 51 and ours.key_buffer.shape[-2] == 51 + 16


def test_crop_then_update_reuses_the_buffer_and_equals_dynamic_layer():
    ours, reference = both_layers((2, 30), (2, 1), (2, 1))
    buffer = ours.key_buffer
    ours.crop(-5)
    reference.crop(-5)
    assert_same_layer(ours, reference)
    ours.update(*states(2, 3, 7))
    reference.update(*states(2, 3, 7))
    assert_same_layer(ours, reference)
    assert ours.key_buffer is buffer


@pytest.mark.parametrize(
    "edit",
    [
        lambda layer: layer.batch_select_indices(torch.tensor([2, 0])),
        lambda layer: layer.batch_select_indices(slice(0, 2)),
        lambda layer: layer.reorder_cache(torch.tensor([1, 1, 0])),
        lambda layer: layer.batch_repeat_interleave(2),
    ],
    ids=["select-indices", "select-slice", "beam-reorder", "repeat-interleave"],
)
def test_batch_edits_then_updates_equal_dynamic_layer(edit):
    ours, reference = both_layers((3, 20), (3, 1))
    edit(ours)
    edit(reference)
    assert_same_layer(ours, reference)
    batch = reference.keys.shape[0]
    for seed in range(3):
        ours.update(*states(batch, 1, 50 + seed))
        reference.update(*states(batch, 1, 50 + seed))
        assert_same_layer(ours, reference)


def test_new_states_of_another_dtype_regrow_instead_of_casting():
    ours, reference = both_layers((1, 10))
    key, value = states(1, 1, 3)
    ours.keys, ours.values = ours.keys.double(), ours.values.double()
    reference.keys, reference.values = reference.keys.double(), reference.values.double()
    ours.update(key.double(), value.double())
    reference.update(key.double(), value.double())
    assert_same_layer(ours, reference)
    assert ours.key_buffer.dtype == torch.float64


def test_offload_releases_the_buffers_and_later_updates_regrow():
    ours, reference = both_layers((2, 12), (2, 1))
    ours.offload()
    assert ours.key_buffer is None and ours.value_buffer is None
    ours.prefetch()
    for seed in range(2):
        ours.update(*states(2, 1, 30 + seed))
        reference.update(*states(2, 1, 30 + seed))
        assert_same_layer(ours, reference)


def test_reset_then_update_starts_over():
    ours, reference = both_layers((2, 12), (2, 1))
    ours.reset()
    reference.reset()
    assert ours.key_buffer is None and ours.value_buffer is None, "a reset cache holds no memory"
    ours.update(*states(2, 4, 9))
    reference.update(*states(2, 4, 9))
    assert_same_layer(ours, reference)


# --------------------------------------------------------------------------------------------------------------
# The model and `generate`
# --------------------------------------------------------------------------------------------------------------


def prompt_batch() -> dict:
    ids = torch.tensor([[0, 0, 5, *image_span(), 6, 7], [8, 9, 10, *image_span(), 11, 12]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pixel_values = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)


def cache_used_by_generate(model, **kwargs) -> tuple[torch.Tensor, object]:
    out = model.generate(**prompt_batch(), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, out.cache


def test_generate_defaults_to_the_in_place_cache_with_the_dynamic_caches_tokens():
    model = tiny_model()
    tokens, cache = cache_used_by_generate(model)
    assert type(cache) is QwenVLCache
    assert all(type(layer) is QwenVLCacheLayer for layer in cache.layers)
    assert cache.get_seq_length() == tokens.shape[1] - 1  # the last token is sampled, never fed back
    assert all(layer.key_buffer.shape[-2] <= tokens.shape[1] - 1 for layer in cache.layers), "sized to generate's end"

    reference_tokens, reference_cache = cache_used_by_generate(model, cache=DynamicCache(config=model.config))
    assert type(reference_cache) is DynamicCache, "a cache the caller passes is used as given"
    assert all(type(layer) is DynamicLayer for layer in reference_cache.layers)
    assert torch.equal(tokens, reference_tokens)


def test_beam_search_with_the_in_place_cache_equals_the_dynamic_cache():
    model = tiny_model()
    kwargs = dict(num_beams=3, num_return_sequences=2)
    tokens, cache = cache_used_by_generate(model, **kwargs)
    assert type(cache) is QwenVLCache
    reference_tokens, _ = cache_used_by_generate(model, cache=DynamicCache(config=model.config), **kwargs)
    assert torch.equal(tokens, reference_tokens)


def test_assisted_decoding_crops_and_refills_the_in_place_cache_with_greedy_tokens(monkeypatch):
    """Assisted decoding crops the main model's cache after rejected draft tokens and writes over them."""
    crops = []
    crop = QwenVLCacheLayer.crop
    monkeypatch.setattr(QwenVLCacheLayer, "crop", lambda self, n: (crops.append(n), crop(self, n))[1])
    model = tiny_model()
    assistant = tiny_model(seed=1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30, do_sample=False)
    greedy = model.generate(ids, **kwargs)
    assisted = model.generate(ids, assistant_model=assistant, return_dict_in_generate=True, **kwargs)
    assert type(assisted.cache) is QwenVLCache
    assert any(n < 0 for n in crops), "the draft model's tokens were never rejected: the test exercises nothing"
    assert torch.equal(assisted.sequences, greedy)


def test_a_static_cache_implementation_is_left_alone():
    model = tiny_model()
    tokens, static = cache_used_by_generate(model, cache_implementation="static")
    assert isinstance(static, StaticCache)
    assert torch.equal(tokens, cache_used_by_generate(model)[0])


def test_forward_with_use_cache_returns_an_in_place_cache_holding_only_the_prompt():
    model = tiny_model()
    with torch.no_grad():
        out = model(**prompt_batch(), use_cache=True)
    assert type(out.cache) is QwenVLCache
    layer = out.cache.layers[0]
    assert layer.keys.shape[-2] == layer.key_buffer.shape[-2] == 11, "no spare capacity until a second update"


def test_compiled_blocks_concatenate_instead_of_breaking_the_graph():
    """Traced code cannot compare data pointers: under `torch.compile` (here `compile_regions`' blocks) the layer
    concatenates like `DynamicLayer`, with the eager tokens and no graph break."""
    from torch._dynamo.utils import counters

    from qwenvl.train import compile_regions

    model = tiny_model()
    eager_tokens, _ = cache_used_by_generate(model)
    compile_regions(model)
    counters.clear()
    compiled_tokens, cache = cache_used_by_generate(model)
    assert type(cache) is QwenVLCache
    assert torch.equal(compiled_tokens, eager_tokens)
    assert dict(counters["graph_break"]) == {}


def test_a_deep_copied_prompt_cache_is_reused_without_touching_the_original():
    """transformers' prefix-reuse recipe: fill a cache with a shared prefix, `deepcopy` it for each continuation."""
    model = tiny_model()
    prefix = torch.tensor([[5, 6, 7, 8]])
    prompt_cache = QwenVLCache(config=model.config)
    with torch.no_grad():
        model(prefix, cache=prompt_cache, use_cache=True)
    for suffix in ([9, 10], [11, 12, 13]):
        ids = torch.cat([prefix, torch.tensor([suffix])], 1)
        fresh = model.generate(ids, max_new_tokens=8, do_sample=False)
        reused = model.generate(ids, max_new_tokens=8, do_sample=False, cache=copy.deepcopy(prompt_cache))
        assert torch.equal(reused, fresh)
    assert prompt_cache.get_seq_length() == 4
