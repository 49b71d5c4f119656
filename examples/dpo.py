#!/usr/bin/env python
"""Direct preference optimisation with images: TRL's `DPOTrainer` on a Qwen-VL policy and our processor.

TRL switches to its vision path when `processing_class` is a processor and the rows carry `image`/`images`: the
prompt is rendered with our chat template (images become `Picture k: <img></img>`), chosen and rejected replies are
appended, and `pixel_values` go to the policy and the reference. The reference is the starting policy, loaded again
from `--model_name_or_path` (or the policy with its adapters disabled, with `--use_lora`). The output folder is
hub-ready: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Rows: the same preference pairs as `examples/reward.py` (`image`/`images`, `prompt`, `chosen`, `rejected`); string
fields are turned into a user and an assistant message.

    python examples/dpo.py --tiny --output_dir out/dpo --use_cpu --report_to none --max_steps 4
    accelerate launch examples/dpo.py --model_name_or_path out/sft --data_path data/train_preference.jsonl \
        --output_dir out/dpo --bf16 --learning_rate 5e-7 --beta 0.1
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
from transformers import HfArgumentParser
from trl import DPOConfig, DPOTrainer

from qwenvl import QwenVLForConditionalGeneration
from qwenvl.testing import write_tiny_run_once
from qwenvl.train import shutdown_distributed, decode_image_columns, load_processor, load_dataset_with_columns


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "The SFT policy (a qwenvl folder)."})
    data_path: str | None = field(default=None, metadata={"help": "Preference pairs."})
    eval_data_path: str | None = None
    freeze_vision: bool = field(
        default=True, metadata={"help": "Keep the vision tower (ViT and adapter) frozen; only the LLM side trains."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM."})
    lora_r: int = 16
    tiny: bool = field(
        default=False,
        metadata={"help": "Tiny random policy and small synthetic shapes data under <output_dir> (smoke runs)."},
    )


def as_conversation(row: dict[str, Any]) -> dict[str, Any]:
    """String prompt / replies as messages: TRL renders messages with the chat template, strings as raw text."""
    row = dict(row)
    if isinstance(row["prompt"], str):
        row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    for key in ("chosen", "rejected"):
        if isinstance(row[key], str):
            row[key] = [{"role": "assistant", "content": row[key]}]
    return row


def preference_dataset(path: str) -> datasets.Dataset:
    dataset = load_dataset_with_columns(path, ("prompt", "chosen", "rejected"))
    return decode_image_columns(dataset.map(as_conversation))


def prepare_tiny(script_args: ScriptArguments, args: DPOConfig) -> None:
    base, data = write_tiny_run_once(args.output_dir, args.distributed_state, seed=args.seed, n_train=8)
    script_args.model_name_or_path = base
    script_args.data_path = os.path.join(data, "train_preference.jsonl")


def main(argv: list[str] | None = None) -> DPOTrainer:
    parser = HfArgumentParser((ScriptArguments, DPOConfig))
    script_args, args = parser.parse_args_into_dataclasses(args=argv)
    if script_args.tiny:
        prepare_tiny(script_args, args)
    if not script_args.model_name_or_path or not script_args.data_path:
        raise ValueError("pass --model_name_or_path and --data_path (or --tiny)")
    args.remove_unused_columns = False  # the collator needs the raw prompt, replies and images

    processor = load_processor(script_args.model_name_or_path)
    model = QwenVLForConditionalGeneration.from_pretrained(script_args.model_name_or_path)
    peft_config = None
    if script_args.use_lora:
        from qwenvl.train import lora_config

        peft_config = lora_config(r=script_args.lora_r, lora_alpha=2 * script_args.lora_r)
    elif script_args.freeze_vision:
        model.transformer.visual.requires_grad_(False)

    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=preference_dataset(script_args.data_path),
        eval_dataset=preference_dataset(script_args.eval_data_path) if script_args.eval_data_path else None,
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
    shutdown_distributed()
