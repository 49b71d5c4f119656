#!/usr/bin/env python
"""Train a vision-language reward model on preference pairs with TRL's `RewardTrainer` (RLHF step 2).

The reward model is `QwenVLForSequenceClassification(num_labels=1)` initialised from an SFT checkpoint: the backbone
is the SFT model's, the `score` head is new. Each pair shares its prompt's images; the loss is
`-log sigmoid(r_chosen - r_rejected - margin)` (`--center_rewards_coefficient` adds reward centring). The pairwise
accuracy on the held-out pairs (`--eval_data_path`) is printed at the end, and the output folder is hub-ready
(weights, remote code, processor): `AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`.

Rows (JSON/JSONL, a saved dataset or a Hub dataset): `image` or `images` (paths relative to the file, or image
objects), `prompt` (user text or messages), `chosen`, `rejected`, optional `margin`; e.g. the
`<split>_preference.jsonl` files of `qwenvl.data.synthetic`.

    python examples/reward.py --tiny --output_dir out/rm --use_cpu --report_to none
    accelerate launch examples/reward.py --model_name_or_path out/sft --data_path data/train_preference.jsonl \
        --eval_data_path data/val_preference.jsonl --output_dir out/rm --bf16 --learning_rate 1e-5
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import datasets
from transformers import HfArgumentParser
from trl import RewardConfig

from qwenvl import QwenVLForSequenceClassification
from qwenvl.rl import QwenVLRewardTrainer
from qwenvl.testing import write_tiny_run_once
from qwenvl.train import shutdown_distributed, decode_image_columns, load_processor, load_dataset_with_columns


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "The SFT checkpoint (a qwenvl folder)."})
    data_path: str | None = field(default=None, metadata={"help": "Training preference pairs."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Held-out pairs for the pairwise accuracy."})
    freeze_vision: bool = field(
        default=True, metadata={"help": "Keep the vision tower (ViT and adapter) frozen; only the LLM side trains."}
    )
    tiny: bool = field(
        default=False,
        metadata={"help": "Tiny random SFT model and small synthetic shapes data under <output_dir> (smoke runs)."},
    )
    tiny_scenes: int = field(default=24, metadata={"help": "Synthetic training scenes with --tiny (2 pairs each)."})


def preference_dataset(path: str) -> datasets.Dataset:
    """Rows with image paths resolved and decoded lazily by `datasets`."""
    return decode_image_columns(load_dataset_with_columns(path, ("prompt", "chosen", "rejected")))


def prepare_tiny(script_args: ScriptArguments, args: RewardConfig) -> None:
    """Save a tiny random 'SFT' model and write synthetic pairs, then point the arguments at them."""
    base, data = write_tiny_run_once(args.output_dir, args.distributed_state, seed=args.seed,
                                     n_train=script_args.tiny_scenes, n_val=8)
    script_args.model_name_or_path = base
    script_args.data_path = os.path.join(data, "train_preference.jsonl")
    script_args.eval_data_path = os.path.join(data, "val_preference.jsonl")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ScriptArguments, RewardConfig))
    script_args, args = parser.parse_args_into_dataclasses(args=argv)
    if script_args.tiny:
        prepare_tiny(script_args, args)
    if not script_args.model_name_or_path or not script_args.data_path:
        raise ValueError("pass --model_name_or_path and --data_path (or --tiny)")

    processor = load_processor(script_args.model_name_or_path)
    # The SFT backbone with a new score head (its `lm_head` is not used).
    model = QwenVLForSequenceClassification.from_pretrained(script_args.model_name_or_path, num_labels=1)
    model.config.pad_token_id = processor.tokenizer.pad_token_id
    if script_args.freeze_vision:
        model.transformer.visual.requires_grad_(False)

    train_dataset = preference_dataset(script_args.data_path)
    eval_dataset = preference_dataset(script_args.eval_data_path) if script_args.eval_data_path else None
    trainer = QwenVLRewardTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processor
    )
    trainer.train()
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    if metrics and args.process_index == 0:
        print(f"held-out pairwise accuracy: {metrics['eval_accuracy']:.3f} on {len(eval_dataset)} pairs")
    trainer.save_model(args.output_dir)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
    shutdown_distributed()
