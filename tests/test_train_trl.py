"""TRL's SFTTrainer trains our model with our processor (messages with assistant_only_loss, prompt/completion), and its
checkpoints reload with AutoModel / AutoProcessor in a process without qwenvl."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from PIL import Image
from trl import SFTConfig, SFTTrainer

from qwenvl.testing import build_tiny_model_and_processor
from qwenvl.train import QwenVLDataCollator, render_supervised

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RED, BLUE = Image.new("RGB", (32, 32), (220, 30, 35)), Image.new("RGB", (32, 32), (30, 75, 220))



def messages_rows() -> list[dict]:
    return [
        {"images": [RED], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it? Answer:"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<ref>it</ref><box>(0,0),(999,999)</box>"}]}]},
        {"images": [BLUE, RED], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Which one is blue? Answer:"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Picture 1"}]}]},
    ]


def sft_config(tmp_path, **overrides) -> SFTConfig:
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                  use_cpu=True, report_to=[], logging_steps=1, save_steps=2, disable_tqdm=True, max_length=None,
                  gradient_checkpointing=False)
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def test_sft_trainer_assistant_only_loss_masks_like_our_collator_and_checkpoints_reload(tmp_path, run_isolated):
    model, processor = build_tiny_model_and_processor()
    rows = messages_rows()
    trainer = SFTTrainer(model=model.train(), args=sft_config(tmp_path, assistant_only_loss=True),
                         train_dataset=Dataset.from_list(rows), processing_class=processor)

    trl_batch = trainer.data_collator(rows)
    ours = QwenVLDataCollator(processor)(rows)
    assert torch.equal(trl_batch["input_ids"], ours["input_ids"])
    assert torch.equal(trl_batch["labels"], ours["labels"])  # only assistant content + <|im_end|>, no image tokens
    assert render_supervised(trl_batch, processor.tokenizer)[1].endswith("assistant\n[[Picture 1<|im_end|>]]")

    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    checkpoint = tmp_path / "checkpoint-2"
    printed = run_isolated(f"""
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor
        path = {str(checkpoint)!r}
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        base = AutoModel.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Colour?"}}]}}]
        inputs = processor.apply_chat_template(messages, images=[Image.new("RGB", (32, 32), (220, 30, 35))],
                                               add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            hidden = base(**inputs).last_hidden_state
            logits = model(**inputs).logits
        print(type(base).__name__, type(processor).__name__, tuple(hidden.shape) == tuple(logits.shape[:2]) + (64,))
    """)
    assert printed.split() == ["QwenVLModel", "QwenVLProcessor", "True"]


def test_sft_trainer_trains_on_prompt_completion_rows(tmp_path):
    model, processor = build_tiny_model_and_processor()
    rows = [
        {"images": [RED], "prompt": [{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": "Colour? Answer:"}]}],
         "completion": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]},
        {"images": [BLUE], "prompt": [{"role": "user", "content": [{"type": "image"},
                                                                   {"type": "text", "text": "Colour? Answer:"}]}],
         "completion": [{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]},
    ]
    trainer = SFTTrainer(model=model.train(), args=sft_config(tmp_path, save_strategy="no"),
                         train_dataset=Dataset.from_list(rows), processing_class=processor)
    ours = QwenVLDataCollator(processor)(rows)
    trl_batch = trainer.data_collator(rows)
    assert [text.split("[[")[1:] for text in render_supervised(trl_batch, processor.tokenizer)] == [
        ["red<|im_end|>]]"], ["blue<|im_end|>]]"]]  # only the completion is supervised
    assert torch.equal(trl_batch["input_ids"], ours["input_ids"]) and torch.equal(trl_batch["labels"], ours["labels"])

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_sft_trl_script_with_our_collator_and_original_masking(tmp_path):
    (tmp_path / "images").mkdir()
    RED.save(tmp_path / "images" / "red.png")
    rows = [{"id": str(k), "conversations": [
        {"from": "user", "value": "Picture 1: <img>images/red.png</img>\n<ref>the square</ref>"},
        {"from": "assistant", "value": f"<ref>the square</ref><box>(0,0),({k}99,999)</box>"}]} for k in range(4)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    spec = importlib.util.spec_from_file_location("example_sft_trl", EXAMPLES / "sft_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    trainer = module.main([
        "--tiny", "--data_path", str(tmp_path / "train.json"), "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
        "--qwenvl_collator", "--label_mode", "original", "--gradient_checkpointing", "false", "--save_steps", "2",
    ])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert render_supervised(batch, trainer.processing_class.tokenizer)[0].startswith("[[<|im_start|>]]system")
    saved = {path.name for path in (out / "checkpoint-2").iterdir()}
    assert {"README.md", "model.safetensors", "processor_config.json"} <= saved
    assert "label mode `original`" in (out / "README.md").read_text()
