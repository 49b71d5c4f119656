#!/usr/bin/env python
"""Supervised fine-tuning of Qwen-VL with TRL's `SFTTrainer` and our processor.

Rows are TRL's vision-language formats: `images` + `messages`, or `images` + `prompt`/`completion` (message lists).
An original Qwen-VL finetune JSON works too (it is read into `images` + `messages`). Image files are decoded lazily
by `datasets`, in the DataLoader workers.

By default TRL's own collator builds the batches; `--assistant_only_loss` then restricts the loss to the assistant
turns (our chat template marks them with `{% generation %}`), and prompt/completion rows train on the completion
only. `--qwenvl_collator` uses `qwenvl.train.QwenVLDataCollator` instead (grounding tags in user text, the
original masking with `--label_mode original`, truncation that never cuts an image).

    python examples/sft_trl.py --tiny --data_path data/train.json --output_dir out/trl --max_steps 20 \
        --assistant_only_loss --use_cpu
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml examples/sft_trl.py \
        --model_name_or_path Qwen-VL-Chat-hf --data_path data/train.json --output_dir out/trl --bf16 \
        --assistant_only_loss --use_lora
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer

from qwenvl.train import (
    shutdown_distributed,
    DatasetArguments,
    HubReadyMixin,
    ModelArguments,
    build_collator,
    build_datasets,
    decode_image_columns,
    load_model_and_processor,
    prepare_training_arguments,
    setup_trainable,
)


@dataclass
class CollatorArguments:
    qwenvl_collator: bool = field(
        default=False, metadata={"help": "Batch with qwenvl.train.QwenVLDataCollator instead of TRL's collator."}
    )


class QwenVLSFTTrainer(HubReadyMixin, SFTTrainer):
    """TRL's `SFTTrainer` whose checkpoints carry our model card."""


def main(argv: list[str] | None = None) -> QwenVLSFTTrainer:
    parser = HfArgumentParser((ModelArguments, DatasetArguments, CollatorArguments, SFTConfig))
    model_args, data_args, collator_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args = prepare_training_arguments(training_args)

    model, processor = load_model_and_processor(model_args, training_args)
    collator = build_collator(processor, data_args, training_args.max_length, training_args.pad_to_multiple_of)
    train_dataset, eval_dataset = build_datasets(data_args, collator)  # validated: bad rows are reported first
    if not collator_args.qwenvl_collator:
        train_dataset = decode_image_columns(train_dataset.remove_columns("length"))
        eval_dataset = decode_image_columns(eval_dataset.remove_columns("length")) if eval_dataset else None
    model, table = setup_trainable(model, model_args, training_args)

    trainer = QwenVLSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator if collator_args.qwenvl_collator else None,
        processing_class=processor,
        model_card={
            "base_model": model_args.model_name_or_path or "tiny random Qwen-VL (--tiny)",
            "stage": model_args.stage,
            "label_mode": data_args.label_mode if collator_args.qwenvl_collator else (
                "TRL assistant_only_loss" if training_args.assistant_only_loss else "TRL default"),
            "table": table,
            "data_path": data_args.data_path,
            "lora": {"r": model_args.lora_r, "alpha": model_args.lora_alpha} if model_args.use_lora else None,
        },
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.write_model_card(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
    shutdown_distributed()
