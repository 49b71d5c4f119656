"""LoRA with PEFT: targets, train/save/reload/merge with the same logits, adapters saved by the original finetune
script, gradient checkpointing, the example script, and QLoRA (GPU only)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import save_file

from qwenvl import QwenVLForConditionalGeneration
from qwenvl.testing import build_tiny_model_and_processor
from qwenvl.train import QwenVLDataCollator, lora_config, lora_target_modules

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ROWS = [
    {"images": [Image.new("RGB", (32, 32), (220, 30, 35))],
     "messages": [{"role": "user", "content": "Colour? Answer:"}, {"role": "assistant", "content": "red"}]},
    {"images": [Image.new("RGB", (32, 32), (30, 75, 220))],
     "messages": [{"role": "user", "content": "Where is <ref>it</ref>?"},
                  {"role": "assistant", "content": "<ref>it</ref><box>(1,2),(500,600)</box>"}]},
]



@pytest.fixture
def base_dir(tmp_path) -> Path:
    model, processor = build_tiny_model_and_processor(seed=0)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora_layers(model) -> set[str]:
    return {name.removeprefix("base_model.model.").removesuffix(".lora_A") for name, _ in model.named_modules()
            if name.endswith(".lora_A")}


def test_default_targets_are_the_llm_projections_of_the_original_recipe(base_dir):
    expected = {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2")}
    model = QwenVLForConditionalGeneration.from_pretrained(base_dir)
    assert lora_layers(get_peft_model(model, lora_config(r=4))) == expected

    model = QwenVLForConditionalGeneration.from_pretrained(base_dir)
    with_vision = lora_layers(get_peft_model(model, lora_config(r=4, resampler=True, vit=True)))
    assert with_vision - expected == (
        {"transformer.visual.attn_pool.kv_proj", "transformer.visual.attn_pool.attn.out_proj"}
        | {f"transformer.visual.transformer.resblocks.{i}.{m}" for i in range(2)
           for m in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")}
    )
    assert re.fullmatch(lora_target_modules(), "transformer.visual.transformer.resblocks.0.mlp.c_proj") is None


def test_lora_train_save_reload_and_merge_give_the_same_logits(base_dir, tmp_path):
    processor_batch = QwenVLDataCollator(build_tiny_model_and_processor()[1])(ROWS)
    model = get_peft_model(QwenVLForConditionalGeneration.from_pretrained(base_dir), lora_config(r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**processor_batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    inputs = {k: v for k, v in processor_batch.items() if k != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits
        base = QwenVLForConditionalGeneration.from_pretrained(base_dir).eval()(**inputs).logits
    assert not torch.allclose(trained, base, atol=1e-4)  # the adapter matters

    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    reloaded = PeftModel.from_pretrained(QwenVLForConditionalGeneration.from_pretrained(base_dir),
                                         tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=1e-5, atol=1e-6)
    merged = reloaded.merge_and_unload()
    assert type(merged) is QwenVLForConditionalGeneration and not lora_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, trained, rtol=1e-4, atol=1e-5)


def test_adapter_saved_by_the_original_finetune_script_loads(base_dir, tmp_path):
    """Original finetune.py adapters: suffix targets ["c_attn", "attn.c_proj", "w1", "w2"], keys named after the
    release's modules."""
    r, alpha = 4, 16
    folder = tmp_path / "original_adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir), "r": r,
        "lora_alpha": alpha, "lora_dropout": 0.05, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": ["c_attn", "attn.c_proj", "w1", "w2"], "modules_to_save": None,
    }))
    base = QwenVLForConditionalGeneration.from_pretrained(base_dir).eval()
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        for module in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"):
            linear = base.get_submodule(f"transformer.h.{i}.{module}")
            key = f"base_model.model.transformer.h.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, linear.in_features, generator=generator) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(linear.out_features, r, generator=generator) * 0.1
    save_file(tensors, folder / "adapter_model.safetensors")

    # Expected: every targeted weight W becomes W + (alpha / r) B A; the vision tower is untouched.
    expected = QwenVLForConditionalGeneration.from_pretrained(base_dir).eval()
    with torch.no_grad():
        for key in {k.rsplit(".lora_", 1)[0] for k in tensors}:
            linear = expected.get_submodule(key.removeprefix("base_model.model."))
            linear.weight += alpha / r * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]

    loaded = PeftModel.from_pretrained(base, folder).eval()
    assert lora_layers(loaded) == {key.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for key in tensors}
    inputs = {k: v for k, v in QwenVLDataCollator(build_tiny_model_and_processor()[1])(ROWS).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_lora_gradients(base_dir):
    batch = QwenVLDataCollator(build_tiny_model_and_processor()[1])(ROWS)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # same adapter init; random B too, so that every LoRA matrix gets a gradient
        model = get_peft_model(QwenVLForConditionalGeneration.from_pretrained(base_dir),
                               LoraConfig(r=4, lora_dropout=0.0, target_modules=lora_target_modules(vit=True),
                                          init_lora_weights=False))
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and any("visual" in name for name in plain)
    assert all(grad.abs().sum() > 0 for grad in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sft_script_with_lora_saves_an_adapter_with_its_processor(tmp_path):
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "Colour? Answer:", "completion": " red"}, {"prompt": "Shape? Answer:", "completion": " square"}]))
    spec = importlib.util.spec_from_file_location("example_sft_lora", EXAMPLES / "sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    module.main(["--tiny", "--use_lora", "--lora_r", "4", "--lora_resampler", "--data_path",
                 str(tmp_path / "rows.jsonl"), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2",
                 "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--activation_checkpointing", "true"])
    files = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json",
            "chat_template.jinja", "README.md"} <= files
    assert "model.safetensors" not in files
    config = json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "tiny-base")
    assert "AutoPeftModelForCausalLM" in (out / "README.md").read_text()


def _qlora_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "QLoRA (bitsandbytes 4-bit) needs a CUDA GPU; none is available"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "QLoRA needs the bitsandbytes package, which is not installed"
    return None


@pytest.mark.skipif(_qlora_unavailable() is not None, reason=_qlora_unavailable() or "")
def test_qlora_quantises_the_llm_keeps_the_vision_tower_and_trains(base_dir):
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    from qwenvl.train import qlora_quantization_config

    model = QwenVLForConditionalGeneration.from_pretrained(
        base_dir, quantization_config=qlora_quantization_config(torch.bfloat16), device_map={"": 0})
    assert isinstance(model.transformer.h[0].attn.c_attn, bnb.nn.Linear4bit)
    assert not isinstance(model.transformer.visual.attn_pool.kv_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    model = get_peft_model(prepare_model_for_kbit_training(model), lora_config(r=4))
    batch = {k: v.to("cuda") for k, v in QwenVLDataCollator(build_tiny_model_and_processor()[1])(ROWS).items()}
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
