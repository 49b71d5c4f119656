"""The core model: the release's layout and math, remote-code loading, generation, backends, safety."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from qwenvl import (
    QwenVLConfig,
    QwenVLForConditionalGeneration,
    QwenVLForSequenceClassification,
)
from qwenvl.modeling_qwenvl import IMAGE_MISMATCH, get_2d_sincos_pos_embed, get_abs_pos

from conftest import IMG, IMG_END, PAD_IMG, REFERENCE, image_span, tiny_config_kwargs, tiny_model


# --------------------------------------------------------------------------------------------------------------
# The release's layout
# --------------------------------------------------------------------------------------------------------------


def test_release_config_on_meta_device_has_the_checkpoint_layout():
    config = QwenVLConfig.from_pretrained(REFERENCE / "Qwen-VL-Chat")
    with torch.device("meta"):
        model = QwenVLForConditionalGeneration(config)
    state = model.state_dict()
    index = json.loads((REFERENCE / "Qwen-VL-Chat" / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shapes = json.loads((REFERENCE / "Qwen-VL-Chat" / "weight_shapes.json").read_text())["shapes"]

    assert set(state) == set(index)
    assert {k: list(v.shape) for k, v in state.items()} == shapes
    assert sum(v.numel() for v in state.values()) == 9_656_935_168


def test_release_config_keeps_every_field_and_derives_image_ids():
    original = json.loads((REFERENCE / "Qwen-VL-Chat" / "config.json").read_text())
    config = QwenVLConfig.from_pretrained(REFERENCE / "Qwen-VL-Chat")
    saved = config.to_dict()
    for key, value in original.items():
        if key in ("auto_map", "model_type", "transformers_version", "architectures"):
            continue  # ours point at this package's code
        if key == "torch_dtype":
            assert saved["dtype"] == value  # transformers 5 renamed the field
        elif key == "visual":
            assert {k: saved["visual"][k] for k in value} == value and saved["visual"]["n_queries"] == 256
        else:
            assert saved[key] == value, key
    assert (config.image_start_id, config.image_end_id, config.image_token_id) == (151857, 151858, 151859)
    assert set(saved["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM",
                                      "AutoModelForImageTextToText", "AutoModelForSequenceClassification"}


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="kv_channels"):
        QwenVLConfig(**tiny_config_kwargs(kv_channels=8))
    with pytest.raises(ValueError, match="unknown keys"):
        QwenVLConfig(**tiny_config_kwargs(visual={"n_querys": 4}))
    with pytest.raises(ValueError, match="image_token_id"):
        QwenVLConfig(**tiny_config_kwargs(image_token_id=5))


# --------------------------------------------------------------------------------------------------------------
# The release's math, checked against independent reference computations
# --------------------------------------------------------------------------------------------------------------


def test_vision_tower_matches_the_original_computation():
    """Per-head packed ViT in_proj, bicubic positional tables, nn.MultiheadAttention-layout adapter, x @ proj."""
    model = tiny_model().transformer.visual.float()
    v = model.attn_pool
    pixel_values = torch.randn(2, 3, 28, 28)

    # Reference ViT: in_proj rows grouped per head as [q|k|v] of head_dim each.
    x = F.conv2d(pixel_values, model.conv1.weight, stride=14).flatten(2).transpose(1, 2)
    pos = model.positional_embedding.reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(4, -1)
    x = F.layer_norm(x + pos, (32,), model.ln_pre.weight, model.ln_pre.bias, 1e-6)
    for blk in model.transformer.resblocks:
        h = F.layer_norm(x, (32,), blk.ln_1.weight, blk.ln_1.bias, 1e-6)
        qkv = F.linear(h, blk.attn.in_proj.weight, blk.attn.in_proj.bias).view(2, 4, 4, 3, 8)  # B, L, heads, qkv, hd
        q, k, val = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        att = torch.softmax((q / math.sqrt(8)) @ k.transpose(-1, -2), -1) @ val
        x = x + F.linear(att.transpose(1, 2).reshape(2, 4, 32), blk.attn.out_proj.weight, blk.attn.out_proj.bias)
        h = F.layer_norm(x, (32,), blk.ln_2.weight, blk.ln_2.bias, 1e-6)
        x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(h)))

    # Reference adapter: torch's own MultiheadAttention with the same packed weights.
    mha = torch.nn.MultiheadAttention(64, 4)
    mha.load_state_dict({"in_proj_weight": v.attn.in_proj_weight, "in_proj_bias": v.attn.in_proj_bias,
                         "out_proj.weight": v.attn.out_proj.weight, "out_proj.bias": v.attn.out_proj.bias})
    kv = F.layer_norm(v.kv_proj(x), (64,), v.ln_kv.weight, v.ln_kv.bias, 1e-6)
    q = F.layer_norm(v.query, (64,), v.ln_q.weight, v.ln_q.bias, 1e-6)
    # 4 queries on a 2x2 grid and 4 patches on a 2x2 grid: the key table is used as is.
    out, _ = mha((q + v.pos_embed).unsqueeze(1).expand(-1, 2, -1), (kv + v.pos_embed).transpose(0, 1),
                 kv.transpose(0, 1))
    expected = F.layer_norm(out.transpose(0, 1), (64,), model.ln_post.weight, model.ln_post.bias, 1e-6) @ model.proj

    torch.testing.assert_close(model(pixel_values), expected, atol=1e-5, rtol=1e-5)


def test_adapter_positions_are_the_2d_sincos_table():
    table = get_2d_sincos_pos_embed(8, 2)  # dim 8: per axis 2 sines + 2 cosines
    omega = 1.0 / 10000 ** (torch.arange(2) / 2.0)
    for i in range(2):  # row
        for j in range(2):  # column
            expected = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega),
                                  torch.cos(i * omega)])
            torch.testing.assert_close(torch.from_numpy(table[i * 2 + j]).float(), expected)
    model = tiny_model()
    torch.testing.assert_close(model.transformer.visual.attn_pool.pos_embed.data,
                               torch.from_numpy(get_2d_sincos_pos_embed(64, 2)))
    assert not model.transformer.visual.attn_pool.pos_embed.requires_grad


def test_decoder_block_matches_the_original_computation():
    """fp32 RMSNorm, [Q|K|V] c_attn with bias, rotate-half RoPE over the whole head, w2 as the SiLU gate."""
    model = tiny_model()
    block = model.transformer.h[0]
    x = torch.randn(1, 5, 64)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    h = rms(x, block.ln_1.weight)
    q, k, val = (t.view(1, 5, 4, 16).transpose(1, 2) for t in block.attn.c_attn(h).split(64, -1))
    inv = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    ang = torch.arange(5).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        return t * cos + torch.cat([-t[..., 8:], t[..., :8]], -1) * sin

    scores = rope(q) @ rope(k).transpose(-1, -2) / 4.0 + torch.full((5, 5), float("-inf")).triu(1)
    att = (torch.softmax(scores, -1) @ val).transpose(1, 2).reshape(1, 5, 64)
    h1 = x + block.attn.c_proj(att)
    m = rms(h1, block.ln_2.weight)
    expected = h1 + block.mlp.c_proj(block.mlp.w1(m) * F.silu(block.mlp.w2(m)))

    position_embeddings = model.transformer.rotary_emb(x, torch.arange(5)[None])
    torch.testing.assert_close(block(x, position_embeddings), expected, atol=1e-5, rtol=1e-5)
    assert block.attn.c_attn.bias is not None and block.attn.c_proj.bias is None and block.mlp.w1.bias is None


def test_dynamic_ntk_and_logn_apply_only_in_eval_beyond_seq_length():
    model = tiny_model()  # seq_length 64
    ids = torch.randint(3, 290, (1, 100))
    rotary = model.transformer.rotary_emb
    model(ids)
    assert rotary.ntk_alpha == 3.0  # 64 < 100 <= 128
    assert model.transformer._logn_scale(torch.arange(100)[None])[0, 99] == pytest.approx(math.log(100) / math.log(64))
    model(ids[:, :64])
    assert rotary.ntk_alpha == 1.0 and model.transformer._logn_scale(torch.arange(64)[None]) is None
    model.train()
    assert model.transformer._logn_scale(torch.arange(100)[None]) is None


# --------------------------------------------------------------------------------------------------------------
# Images in
# --------------------------------------------------------------------------------------------------------------


def test_image_k_fills_the_kth_span_in_row_major_order():
    model = tiny_model()
    ids = torch.tensor([[5, *image_span(), 6, *image_span(), 7], [8, 9, *image_span(), 10, 11, 12, 13, 14, 15, 16]])
    pixel_values = torch.randn(3, 3, 28, 28)
    features = model.get_image_features(pixel_values)
    embeds = model.transformer.merge_image_features(ids, model.transformer.wte(ids), features)
    torch.testing.assert_close(embeds[0, 2:6], features[0])
    torch.testing.assert_close(embeds[0, 9:13], features[1])
    torch.testing.assert_close(embeds[1, 3:7], features[2])
    # Precomputed features give the same logits as pixels.
    torch.testing.assert_close(model(ids, pixel_values=pixel_values).logits, model(ids, image_features=features).logits)


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_image_count_mismatch_raises(n_images):
    model = tiny_model()
    ids = torch.tensor([[5, *image_span(), 6, *image_span(), 7]])
    pixel_values = torch.randn(n_images, 3, 28, 28) if n_images else None
    with pytest.raises(ValueError, match=IMAGE_MISMATCH):
        model(ids, pixel_values=pixel_values)


def test_truncated_image_span_raises():
    model = tiny_model()
    ids = torch.tensor([[5, IMG, PAD_IMG, PAD_IMG]])
    with pytest.raises(ValueError, match=IMAGE_MISMATCH):
        model(ids, pixel_values=torch.randn(1, 3, 28, 28))


def test_forward_and_generate_open_no_file_and_no_socket(tmp_path):
    model = tiny_model()
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    # A span whose ids spell a path, as the original tokenizer produced: refused as a mismatch, never read.
    path_span = [IMG, *list(str(secret).encode())[:4], IMG_END]
    ids = torch.tensor([[*image_span(), 5, 6, 7]])
    pixel_values = torch.randn(1, 3, 28, 28)

    def run_all():
        model(ids, pixel_values=pixel_values)
        model.generate(ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                       do_sample=False)
        with pytest.raises(ValueError, match=IMAGE_MISMATCH):
            model(torch.tensor([[*path_span, *image_span(), 5]]), pixel_values=pixel_values)

    run_all()  # warm-up: lazy imports may read source files once
    events = []
    recording = True

    def audit(event, args):
        if recording and event in ("open", "os.listdir", "socket.__new__", "socket.connect", "urllib.Request"):
            events.append((event, args))

    sys.addaudithook(audit)  # audit hooks cannot be removed; this one stops recording below
    try:
        run_all()
    finally:
        recording = False
    assert events == []


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def test_greedy_generate_with_cache_equals_without():
    model = tiny_model()
    ids = torch.tensor([[5, 6, *image_span(), 7, 8]])
    kwargs = dict(pixel_values=torch.randn(1, 3, 28, 28), attention_mask=torch.ones_like(ids), max_new_tokens=12,
                  do_sample=False, min_new_tokens=12)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert with_cache.shape[1] == ids.shape[1] + 12
    assert torch.equal(with_cache, without)


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny_model()
    prompts = [[5, *image_span(), 6, 7, 8, 9, 10, 11], [12, *image_span(), 13], [14, 15, 16]]
    images = [torch.randn(1, 3, 28, 28), torch.randn(1, 3, 28, 28), None]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = model.generate(ids, attention_mask=mask, pixel_values=torch.cat([i for i in images if i is not None]),
                           max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        single = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                pixel_values=image, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert batch[row, width:].tolist() == single[0, len(prompt):].tolist()


def test_left_padding_leaves_logits_unchanged():
    model = tiny_model()
    prompt = [5, *image_span(), 6, 7]
    image = torch.randn(1, 3, 28, 28)
    alone = model(torch.tensor([prompt]), pixel_values=image).logits[0]
    padded = model(torch.tensor([[0, 0, 0] + prompt]), attention_mask=torch.tensor([[0, 0, 0] + [1] * len(prompt)]),
                   pixel_values=image).logits[0, 3:]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree():
    ids = torch.tensor([[0, 0, 5, *image_span(), 6, 7], [8, 9, 10, *image_span(), 11, 12]])
    mask = torch.tensor([[0, 0] + [1] * 9, [1] * 11])
    pixel_values = torch.randn(2, 3, 28, 28)
    outputs = {}
    for impl in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=impl)
        assert model.config._attn_implementation == impl
        outputs[impl] = model(ids, attention_mask=mask, pixel_values=pixel_values).logits
    valid = mask.bool()
    assert (outputs["eager"] - outputs["sdpa"])[valid].abs().max() <= 1e-4


def test_hidden_states_are_returned_per_block():
    model = tiny_model()
    out = model(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.tensor([[5, *image_span(), 6, 7, 8, 9]])
    pixel_values = torch.randn(1, 3, 28, 28)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(block.gradient_checkpointing for block in model.transformer.h)
            assert all(block.gradient_checkpointing for block in model.transformer.visual.transformer.resblocks)
        model(ids, pixel_values=pixel_values, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 30
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_frozen_vision_trunk_builds_no_graph():
    model = tiny_model().train()
    visual = model.transformer.visual
    for p in visual._trunk_parameters():
        p.requires_grad_(False)
    patches = visual.encode_patches(torch.randn(1, 3, 28, 28))
    assert patches.grad_fn is None
    assert visual(torch.randn(1, 3, 28, 28)).grad_fn is not None  # the adapter still trains


def test_sequence_classifier_pools_the_last_real_token():
    model = tiny_model(cls=QwenVLForSequenceClassification, num_labels=1)
    right = model(torch.tensor([[5, 6, 7, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0, 0]])).logits
    left = model(torch.tensor([[0, 0, 5, 6, 7]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1]])).logits
    alone = model(torch.tensor([[5, 6, 7]])).logits
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    assert alone.shape == (1, 1)


# --------------------------------------------------------------------------------------------------------------
# Hub-ready saving, loaded where `qwenvl` is not installed
# --------------------------------------------------------------------------------------------------------------


def test_saved_model_loads_in_a_fresh_process_without_qwenvl(tmp_path, run_isolated):
    lm = tiny_model(seed=1)
    rm = tiny_model(seed=2, cls=QwenVLForSequenceClassification, num_labels=1)
    lm.save_pretrained(tmp_path / "lm")
    rm.save_pretrained(tmp_path / "rm")
    ids = torch.tensor([[5, *image_span(), 6, 7]])
    pixel_values = torch.randn(1, 3, 28, 28)
    torch.save({"ids": ids, "pixel_values": pixel_values}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = {
            "causal": lm(ids, pixel_values=pixel_values).logits,
            "base": lm.transformer(ids, pixel_values=pixel_values).last_hidden_state,
            "reward": rm(ids, pixel_values=pixel_values).logits,
        }
    saved = sorted(p.name for p in (tmp_path / "lm").iterdir())
    assert {"config.json", "configuration_qwenvl.py", "modeling_qwenvl.py", "model.safetensors",
            "generation_config.json"} <= set(saved)

    run_isolated(f"""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
        from transformers import AutoModelForSequenceClassification
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        out = {{}}
        with torch.no_grad():
            m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'lm')!r}, trust_remote_code=True)
            assert "qwenvl" not in type(m).__module__.split(".")[0]
            out["causal"] = m(inputs["ids"], pixel_values=inputs["pixel_values"]).logits
            m = AutoModelForImageTextToText.from_pretrained({str(tmp_path / 'lm')!r}, trust_remote_code=True)
            assert torch.equal(m(inputs["ids"], pixel_values=inputs["pixel_values"]).logits, out["causal"])
            m = AutoModel.from_pretrained({str(tmp_path / 'lm')!r}, trust_remote_code=True)
            out["base"] = m(inputs["ids"], pixel_values=inputs["pixel_values"]).last_hidden_state
            m = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'rm')!r}, trust_remote_code=True)
            out["reward"] = m(inputs["ids"], pixel_values=inputs["pixel_values"]).logits
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    """)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("source, target", [(16, 32), (16, 2), (4, 8), (8, 5)])
def test_positional_tables_resize_exactly_like_bicubic_interpolation(source, target):
    table = torch.randn(source * source, 24)
    expected = F.interpolate(table.reshape(1, source, source, -1).permute(0, 3, 1, 2), size=(target, target),
                             mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(target * target, -1)

    torch.testing.assert_close(get_abs_pos(table, target * target), expected, atol=1e-5, rtol=1e-5)


def test_a_resize_first_made_under_inference_mode_still_trains():
    with torch.inference_mode():
        get_abs_pos(torch.randn(9, 4), 36)  # first use of the (3 -> 6) resize weights: inside `generate`, say
    table = torch.randn(9, 4, requires_grad=True)

    get_abs_pos(table, 36).sum().backward()

    assert table.grad is not None and table.grad.abs().sum() > 0
