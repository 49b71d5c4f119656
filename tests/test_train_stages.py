"""`apply_stage`: exactly the named components train, frozen weights stay bit-identical, a frozen ViT builds no
autograd graph."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from qwenvl.testing import build_tiny_model_and_processor
from qwenvl.train import STAGES, QwenVLDataCollator, QwenVLTrainer, apply_stage, component_of

# Written out from the stage definitions (qwenvl.train.stages), independently of the implementation.
ADAPTER = r"transformer\.visual\.attn_pool\.(?!pos_embed).*|transformer\.visual\.(ln_post\..*|proj)"
RESAMPLER = r"transformer\.visual\.attn_pool\.(?!pos_embed).*"
VIT = r"transformer\.visual\.(conv1|positional_embedding|ln_pre|transformer)\b.*"
LLM = r"transformer\.(wte|h|ln_f)\..*|lm_head\..*"
EXPECTED = {
    "pretrain": [ADAPTER],
    "pretrain-paper": [ADAPTER, VIT],
    "multitask": [ADAPTER, VIT, LLM],
    "multitask-frozen-vit": [ADAPTER, LLM],
    "chat-sft": [RESAMPLER, LLM],
}

ROWS = [
    {"images": [Image.new("RGB", (32, 32), (220, 30, 35))],
     "messages": [{"role": "user", "content": "Describe the image in English:"},
                  {"role": "assistant", "content": "A red square."}]},
    {"images": [Image.new("RGB", (32, 32), (30, 75, 220))],
     "messages": [{"role": "user", "content": "What colour is it? Answer:"}, {"role": "assistant", "content": "blue"}]},
]



@pytest.mark.parametrize("stage", sorted(STAGES))
def test_apply_stage_leaves_exactly_the_named_components_trainable(stage, capsys):
    model, _ = build_tiny_model_and_processor()
    table = apply_stage(model, stage)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {name for name, _ in model.named_parameters() if any(re.fullmatch(p, name) for p in EXPECTED[stage])}
    assert trainable == expected
    assert "transformer.visual.attn_pool.pos_embed" not in trainable  # the fixed sin-cos table never trains

    printed = capsys.readouterr().out
    assert f"stage {stage!r}" in printed and str(table) in printed
    rows = {row["component"]: row for row in table}
    assert rows["total"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert table.trainable_components() == set(STAGES[stage])


def test_component_names_cover_every_parameter_of_the_release_layout():
    model, _ = build_tiny_model_and_processor()
    components = {component_of(name) for name, _ in model.named_parameters()}
    assert components == {"vit", "resampler", "projection", "llm", "lm_head"}
    assert component_of("base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight") == "llm"
    assert component_of("visual.attn_pool.query") == "resampler"  # the bare base model (AutoModel)
    with pytest.raises(ValueError, match="unknown stage"):
        apply_stage(model, "stage-3")


def test_stage1_step_changes_only_the_adapter(tmp_path):
    model, processor = build_tiny_model_and_processor()
    apply_stage(model, "pretrain", verbose=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                             use_cpu=True, report_to=[], save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True)
    QwenVLTrainer(model=model, args=args, train_dataset=ROWS, data_collator=QwenVLDataCollator(processor),
                  processing_class=processor).train()

    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} should have been updated"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("stage, vit_graph", [("pretrain", False), ("chat-sft", False), ("pretrain-paper", True)])
def test_frozen_vit_runs_without_an_autograd_graph(stage, vit_graph):
    model, processor = build_tiny_model_and_processor()
    apply_stage(model.train(), stage, verbose=False)
    seen = {}
    vit = model.transformer.visual.transformer
    vit.register_forward_hook(lambda module, inputs, out: seen.update(vit=out.grad_fn is not None))
    batch = QwenVLDataCollator(processor)(ROWS)
    model(**batch).loss.backward()
    assert seen["vit"] is vit_graph
    assert model.transformer.visual.attn_pool.query.grad is not None  # the adapter still gets gradients


def test_pretrain_paper_stage_trains_at_a_lower_image_size():
    model, processor = build_tiny_model_and_processor()  # configured for 28-px images
    apply_stage(model.train(), "pretrain-paper", verbose=False)
    processor.image_processor.size = {"height": 14, "width": 14}
    batch = QwenVLDataCollator(processor)(ROWS)
    assert batch["pixel_values"].shape[-1] == 14
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.visual.positional_embedding.grad.abs().sum() > 0
