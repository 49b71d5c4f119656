"""DPO and GRPO with images through TRL (`examples/dpo.py`, `examples/grpo.py`), on tiny models: they train a few
steps with our processor and write checkpoints that reload with `AutoModelForCausalLM` and `trust_remote_code`."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from qwenvl.testing import build_tiny_model_and_processor

from conftest import load_example


TINY_TRL_ARGS = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
                 "--logging_steps", "1", "--max_steps", "2"]




def assert_reloads(trainer, out: Path) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])
    assert {"processor_config.json", "chat_template.jinja", "modeling_qwenvl.py"} <= {p.name for p in out.iterdir()}


def test_trl_vision_preference_collator_gives_each_sequence_its_prompt_images():
    _, processor = build_tiny_model_and_processor()
    red, blue = Image.new("RGB", (28, 28), (220, 30, 35)), Image.new("RGB", (28, 28), (30, 75, 220))
    rows = [
        {"images": [red], "prompt": [{"role": "user", "content": "What colour?"}],
         "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]},
        {"images": [blue, red], "prompt": [{"role": "user", "content": "Which is red?"}],
         "chosen": [{"role": "assistant", "content": "Picture 2"}],
         "rejected": [{"role": "assistant", "content": "Picture 1"}]},
    ]
    batch = DataCollatorForVisionPreference(processor)(rows)

    image_start = processor.tokenizer.convert_tokens_to_ids("<img>")
    assert (batch["input_ids"] == image_start).sum(1).tolist() == [1, 2, 1, 2]  # chosen rows, then rejected rows
    expected = processor(images=[red, blue, red] * 2, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], expected)
    assert batch["completion_mask"].sum() > 0


def test_dpo_example_trains_with_images_and_reloads(tmp_path):
    out = tmp_path / "dpo"
    trainer = load_example("dpo").main(["--tiny", "--output_dir", str(out), "--per_device_train_batch_size", "2",
                                        *TINY_TRL_ARGS])

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    assert all("rewards/margins" in entry and "logps/chosen" in entry for entry in logged)
    assert_reloads(trainer, out)


def test_grpo_example_scores_with_the_vision_reward_model_and_iou_and_reloads(tmp_path):
    reward_model, processor = build_tiny_model_and_processor(seed=7, reward_model=True)
    reward_model.save_pretrained(tmp_path / "rm")
    processor.save_pretrained(tmp_path / "rm")
    out = tmp_path / "grpo"

    trainer = load_example("grpo").main([
        "--tiny", "--output_dir", str(out), "--reward_model_path", str(tmp_path / "rm"), "--beta", "0.04",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "6",
        *TINY_TRL_ARGS,
    ])

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    # The reward model scored every completion (with the images); IoU and exact match scored their own rows.
    assert all(entry["rewards/reward_model_reward/mean"] is not None for entry in logged)
    assert {"rewards/iou_reward/mean", "rewards/exact_match_reward/mean", "kl"} <= set(logged[0])
    assert_reloads(trainer, out)
