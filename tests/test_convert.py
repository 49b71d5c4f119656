"""`qwenvl convert`: an original snapshot (sharded pickled .bin + index) becomes a hub-ready folder, weights unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from qwenvl import QwenVLConfig, QwenVLForConditionalGeneration
from qwenvl.convert import ConversionError, convert_official_checkpoint

from conftest import REFERENCE

# The release's config.json with every size shrunk (real vocabulary size and special-token ids kept).
TINY_RELEASE_SIZES = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, kv_channels=8,
                          intermediate_size=32, seq_length=64)
TINY_VISUAL = dict(image_size=28, patch_size=14, width=16, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)


def write_original_snapshot(folder, n_shards: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a snapshot exactly as the release lays it out: original config, `pytorch_model-0000k-of-0000n.bin`."""
    folder.mkdir(parents=True)
    config = json.loads((REFERENCE / "Qwen-VL-Chat" / "config.json").read_text())
    config.update(TINY_RELEASE_SIZES)
    config["visual"].update(TINY_VISUAL)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(REFERENCE / "Qwen-VL-Chat" / "generation_config.json", folder)

    ours = QwenVLConfig(**{k: v for k, v in config.items() if k != "model_type"})
    torch.manual_seed(seed)
    state = {k: v.to(torch.bfloat16) for k, v in QwenVLForConditionalGeneration(ours).state_dict().items()}
    keys = list(state)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: state[k].clone() for k in keys[i::n_shards]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def test_converter_round_trips_an_original_snapshot(tmp_path):
    state = write_original_snapshot(tmp_path / "Qwen-VL-Chat")
    out = convert_official_checkpoint(tmp_path / "Qwen-VL-Chat", tmp_path / "converted", max_shard_size=4_000_000)

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "configuration_qwenvl.py", "modeling_qwenvl.py", "README.md",
            "model.safetensors.index.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: image-text-to-text" in card
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151643, 151645] and generation["top_p"] == 0.3
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen_vl" and "AutoModelForSequenceClassification" in config["auto_map"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.dtype == torch.bfloat16
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_converter_refuses_a_bin_that_carries_a_pickled_callable(tmp_path):
    write_original_snapshot(tmp_path / "snap")
    shard = tmp_path / "snap" / "pytorch_model-00001-of-00002.bin"
    payload = torch.load(shard, weights_only=True)
    payload["transformer.wte.weight"] = torch.zeros(1)
    payload["__reduce_me__"] = print  # a callable: unpickling it would run arbitrary code in a real attack
    torch.save(payload, shard)
    with pytest.raises(ConversionError, match="refused to load"):
        convert_official_checkpoint(tmp_path / "snap", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no half-written folder left


def test_converter_names_missing_and_unexpected_keys(tmp_path):
    write_original_snapshot(tmp_path / "snap", n_shards=1)
    shard = tmp_path / "snap" / "pytorch_model-00001-of-00001.bin"
    payload = torch.load(shard, weights_only=True)
    del payload["transformer.h.1.mlp.w2.weight"]
    payload["transformer.h.1.mlp.w3.weight"] = torch.zeros(2)
    torch.save(payload, shard)
    with pytest.raises(ConversionError) as err:
        convert_official_checkpoint(tmp_path / "snap", tmp_path / "out")
    assert "transformer.h.1.mlp.w2.weight" in str(err.value) and "transformer.h.1.mlp.w3.weight" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_convert_console_command(tmp_path):
    write_original_snapshot(tmp_path / "snap")
    ok = subprocess.run([sys.executable, "-m", "qwenvl.cli", "convert", str(tmp_path / "snap"), str(tmp_path / "out")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "config.json").exists()
    again = subprocess.run([sys.executable, "-m", "qwenvl.cli", "convert", str(tmp_path / "snap"),
                            str(tmp_path / "out")], capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_converted_folder_is_one_repo_with_the_real_tokenizer_and_processor(tmp_path):
    write_original_snapshot(tmp_path / "snap")
    shutil.copy(REFERENCE / "qwen.tiktoken", tmp_path / "snap")
    out = convert_official_checkpoint(tmp_path / "snap", tmp_path / "out")
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
            "processing_qwenvl.py", "tokenization_qwenvl.py"} <= {p.name for p in out.iterdir()}

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert processor.tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<imgpad>"]) == [151857, 151858, 151859]
    assert processor.num_image_tokens == model.config.visual["n_queries"] == 256
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[[Image.new("RGB", (50, 40), "red")]], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 28, 28)
    logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 151936) and torch.isfinite(logits).all()
