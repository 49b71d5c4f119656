"""Regional compilation: compiled blocks and loss train exactly like eager ones, under the same parameter names."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from benchmarks.workloads import train_batch
from qwenvl import QwenVLConfig, QwenVLForConditionalGeneration
from qwenvl.train import compile_regions, lora_config

from conftest import tiny_config_kwargs


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_and_loss_give_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    eager = QwenVLForConditionalGeneration(QwenVLConfig(**tiny_config_kwargs()))
    compiled = copy.deepcopy(eager)
    batch = train_batch(eager.config, 2, 16, images_per_sample=1)

    assert compile_regions(compiled) == 2 + 2  # decoder blocks + ViT blocks
    eager_loss, eager_grads = loss_and_grads(eager, batch)
    compiled_loss, compiled_grads = loss_and_grads(compiled, batch)

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep the release's names


def test_a_lora_wrapped_model_compiles_its_blocks_and_base_loss():
    model = get_peft_model(QwenVLForConditionalGeneration(QwenVLConfig(**tiny_config_kwargs())), lora_config(r=4))

    assert compile_regions(model) == 4
    base = model.get_base_model()
    assert hasattr(base.loss_function, "_torchdynamo_orig_callable")
    assert all(block._compiled_call_impl is not None for block in base.transformer.h)


def test_a_model_without_qwen_vl_blocks_is_refused():
    with pytest.raises(ValueError, match="no Qwen-VL blocks"):
        compile_regions(torch.nn.Linear(2, 2))


def test_the_training_recipe_compiles_when_asked(tmp_path):
    from transformers import TrainingArguments

    from qwenvl.train import ModelArguments, setup_trainable

    model = QwenVLForConditionalGeneration(QwenVLConfig(**tiny_config_kwargs()))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])

    model, _ = setup_trainable(model, ModelArguments(tiny=True, stage="multitask", compile_regions=True), args)

    assert all(block._compiled_call_impl is not None for block in model.transformer.h)
