#!/usr/bin/env python
"""Group relative policy optimisation with images: TRL's `GRPOTrainer` on a Qwen-VL policy and our processor.

Rewards (summed, `--reward_weights` to weigh them):
- `iou_reward`: IoU of the first `<box>` of the completion with the row's `box` (pixels), for grounding prompts;
- `exact_match_reward`: normalised exact match with the row's `answer`, for short-answer prompts;
- with `--reward_model_path`, a vision-language reward model (e.g. from `examples/reward.py`) wrapped in
  `qwenvl.rl.RewardModelScorer`: TRL scores `PreTrainedModel` rewards on text only, the wrapper gives it the images.
Rows without a `box` (or an `answer`) get `None` from that reward, which TRL leaves out of their sum.

The policy is loaded by TRL from `--model_name_or_path`, so `--beta > 0` (a KL penalty to a frozen copy) works. The
output folder is hub-ready: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Rows: `image`/`images`, `prompt` (user text or messages) and the reward columns, e.g. the `<split>_ppo.jsonl` files
of `qwenvl.data.synthetic`.

    python examples/grpo.py --tiny --output_dir out/grpo --use_cpu --report_to none --max_steps 2
    accelerate launch examples/grpo.py --model_name_or_path out/sft --reward_model_path out/rm \
        --data_path data/train_ppo.jsonl --output_dir out/grpo --bf16 --beta 0.04 --num_generations 8
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
from transformers import HfArgumentParser
from trl import GRPOConfig, GRPOTrainer

from qwenvl import QwenVLForSequenceClassification
from qwenvl.rl import RewardModelScorer, exact_match_reward, iou_reward
from qwenvl.testing import write_tiny_run_once
from qwenvl.train import shutdown_distributed, decode_image_columns, load_processor, load_dataset_with_columns


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "The SFT policy (a qwenvl folder)."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A vision-language reward model folder, added to the programmatic rewards."}
    )
    data_path: str | None = field(default=None, metadata={"help": "Prompt rows."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM."})
    lora_r: int = 16
    tiny: bool = field(
        default=False,
        metadata={"help": "Tiny random policy and small synthetic shapes data under <output_dir> (smoke runs)."},
    )


def as_conversation(row: dict[str, Any]) -> dict[str, Any]:
    """GRPO needs conversational prompts when rows have images."""
    if isinstance(row["prompt"], str):
        row = {**row, "prompt": [{"role": "user", "content": row["prompt"]}]}
    return row


def prompt_dataset(path: str) -> datasets.Dataset:
    return decode_image_columns(load_dataset_with_columns(path, ("prompt",)).map(as_conversation))


def prepare_tiny(script_args: ScriptArguments, args: GRPOConfig) -> None:
    base, data = write_tiny_run_once(args.output_dir, args.distributed_state, seed=args.seed, n_train=4)
    script_args.model_name_or_path = base
    script_args.data_path = os.path.join(data, "train_ppo.jsonl")


def main(argv: list[str] | None = None) -> GRPOTrainer:
    parser = HfArgumentParser((ScriptArguments, GRPOConfig))
    script_args, args = parser.parse_args_into_dataclasses(args=argv)
    if script_args.tiny:
        prepare_tiny(script_args, args)
    if not script_args.model_name_or_path or not script_args.data_path:
        raise ValueError("pass --model_name_or_path and --data_path (or --tiny)")

    processor = load_processor(script_args.model_name_or_path)
    reward_funcs: list[Any] = [iou_reward, exact_match_reward]
    if script_args.reward_model_path:
        reward_model = QwenVLForSequenceClassification.from_pretrained(script_args.reward_model_path)
        reward_funcs.append(RewardModelScorer(reward_model.to(args.device), processor))
    peft_config = None
    if script_args.use_lora:
        from qwenvl.train import lora_config

        peft_config = lora_config(r=script_args.lora_r, lora_alpha=2 * script_args.lora_r)

    trainer = GRPOTrainer(
        model=script_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=prompt_dataset(script_args.data_path),
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
    shutdown_distributed()
