#!/usr/bin/env python
"""PPO-ptx on prompts with images (RLHF step 3): `qwenvl.rl.PPOTrainer`.

The policy starts from an SFT checkpoint; the reward is either a vision-language reward model (`--reward_model_path`,
e.g. the output of `examples/reward.py`; the critic starts as its copy) or the programmatic rewards of
`qwenvl.rl.rewards` (IoU of the first `<box>` against the row's `box`, exact match against its `answer`), or both
(`--task_rewards`: the reward model's score plus the programmatic rewards, weighted by `--reward_weights`). With
`--ptx_coef > 0` each policy loss also gets the language-modelling loss of one batch of `--ptx_data_path` (SFT rows,
e.g. an original finetune JSON), InstructGPT's PPO-ptx. `--num_generations K` samples K responses per prompt and
scores each against the mean of the others (leave-one-out baseline). The policy is saved hub-ready in `--output_dir`.

Prompt rows (JSON/JSONL, a saved dataset or a Hub dataset): `image` or `images` (paths relative to the file),
`prompt` (user text or messages), and the reward columns (`box` in pixels, `answer`); e.g. the `<split>_ppo.jsonl`
files of `qwenvl.data.synthetic`.

    python examples/ppo.py --tiny --output_dir out/ppo --total_episodes 32
    accelerate launch examples/ppo.py --model_name_or_path out/sft --reward_model_path out/rm \
        --data_path data/train_ppo.jsonl --ptx_data_path data/train.json --ptx_coef 0.5 --output_dir out/ppo \
        --mixed_precision bf16 --learning_rate 1e-6 --per_device_train_batch_size 2 --gradient_accumulation_steps 8
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import datasets
from accelerate import PartialState
from transformers import HfArgumentParser

from qwenvl import QwenVLForConditionalGeneration, QwenVLForSequenceClassification
from qwenvl.rl import PPOConfig, PPOTrainer, exact_match_reward, iou_reward
from qwenvl.testing import write_tiny_run_once
from qwenvl.train import shutdown_distributed, decode_image_columns, load_processor, load_rows


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "The SFT policy (a qwenvl folder)."})
    reward_model_path: str | None = field(
        default=None, metadata={"help": "A reward model folder; without it the IoU and exact-match rewards are used."}
    )
    task_rewards: bool = field(
        default=False,
        metadata={"help": "With --reward_model_path, also add the IoU and exact-match rewards (--reward_weights)."},
    )
    data_path: str | None = field(default=None, metadata={"help": "Prompt rows."})
    ptx_data_path: str | None = field(default=None, metadata={"help": "SFT rows for the pre-training term."})
    freeze_vision: bool = field(
        default=True,
        metadata={"help": "Keep the vision tower (ViT and adapter) frozen: images are then encoded once per rollout."},
    )
    use_lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters on the LLM (the reference is the adapters-off model)."}
    )
    lora_r: int = 16
    tiny: bool = field(
        default=False,
        metadata={"help": "Tiny random policy and small synthetic shapes data under <output_dir> (smoke runs)."},
    )


def rows_dataset(path: str) -> datasets.Dataset:
    rows = load_rows(path)
    dataset = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)
    return decode_image_columns(dataset)


def prepare_tiny(script_args: ScriptArguments, config: PPOConfig) -> None:
    """Save a tiny random 'SFT' policy and write synthetic grounding / VQA prompts, then point the arguments at them."""
    base, data = write_tiny_run_once(config.output_dir, PartialState(cpu=config.use_cpu), overwrite=False,
                                     seed=config.seed, n_train=8)
    script_args.model_name_or_path = script_args.model_name_or_path or base
    script_args.data_path = script_args.data_path or os.path.join(data, "train_ppo.jsonl")
    if config.ptx_coef > 0:
        script_args.ptx_data_path = script_args.ptx_data_path or os.path.join(data, "train.json")


# With --tiny, defaults small enough for a CPU smoke run (command-line values still win).
TINY_DEFAULTS = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, num_mini_batches=2,
                     response_length=12, learning_rate=1e-4, total_episodes=16, temperature=1.0)


def main(argv: list[str] | None = None) -> PPOTrainer:
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ScriptArguments, PPOConfig))
    if "--tiny" in argv:
        parser.set_defaults(**TINY_DEFAULTS)
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
    if script_args.tiny:
        prepare_tiny(script_args, config)
    if not script_args.model_name_or_path or not script_args.data_path:
        raise ValueError("pass --model_name_or_path and --data_path (or --tiny)")

    processor = load_processor(script_args.model_name_or_path)
    policy = QwenVLForConditionalGeneration.from_pretrained(script_args.model_name_or_path)
    if script_args.freeze_vision:
        policy.transformer.visual.requires_grad_(False)
    reward_model, reward_fn = None, None
    if script_args.reward_model_path:
        reward_model = QwenVLForSequenceClassification.from_pretrained(script_args.reward_model_path)
        if reward_model.config.vocab_size != policy.config.vocab_size:
            raise ValueError(
                f"{script_args.reward_model_path}: the reward model's vocabulary ({reward_model.config.vocab_size}) "
                f"differs from the policy's ({policy.config.vocab_size}); both must use the same processor"
            )
    if not script_args.reward_model_path or script_args.task_rewards:
        reward_fn = [iou_reward, exact_match_reward]
    peft_config = None
    if script_args.use_lora:
        from qwenvl.train import lora_config

        peft_config = lora_config(r=script_args.lora_r, lora_alpha=2 * script_args.lora_r)

    trainer = PPOTrainer(
        config,
        processor,
        policy,
        reward_model=reward_model,
        reward_fn=reward_fn,
        train_dataset=rows_dataset(script_args.data_path),
        ptx_dataset=load_rows(script_args.ptx_data_path) if script_args.ptx_data_path else None,
        peft_config=peft_config,
    )
    history = trainer.train()
    trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        with open(os.path.join(config.output_dir, "ppo_history.json"), "w", encoding="utf-8") as handle:
            json.dump(history, handle, indent=1)
        last = history[-1]
        ptx = f", ptx loss {last['loss/ptx_avg']:.3f}" if "loss/ptx_avg" in last else ""
        print(f"update {last['update']}: score {last['objective/scores']:.3f}, KL {last['objective/kl']:.3f}, "
              f"entropy {last['policy/entropy_avg']:.3f}{ptx}")
    return trainer


if __name__ == "__main__":
    main()
    shutdown_distributed()
