#!/usr/bin/env python
"""Supervised fine-tuning of Qwen-VL with the Hugging Face `Trainer`: stage 2 (`--stage multitask`) or chat SFT.

Data: an original Qwen-VL finetune JSON (`--data_path train.json --image_root images/`), a JSON/JSONL of
`images` + `messages` (or `prompt`/`completion`) rows, a saved `datasets` folder or a Hub dataset. Bad rows are
reported (index, reason) before training starts.

    # a tiny from-scratch smoke run on CPU
    python examples/sft.py --tiny --data_path data/train.json --output_dir out/sft --max_steps 20 --use_cpu

    # multi-task stage 2 from a converted checkpoint, bf16, gradient checkpointing
    python examples/sft.py --model_name_or_path Qwen-VL-hf --stage multitask --data_path data/train.json \
        --output_dir out/stage2 --bf16 --activation_checkpointing --per_device_train_batch_size 4 \
        --gradient_accumulation_steps 8 --learning_rate 1e-5 --lr_scheduler_type cosine --warmup_steps 100

    # LoRA on the LLM (original recipe), plus the resampler
    python examples/sft.py --model_name_or_path Qwen-VL-Chat-hf --use_lora --lora_resampler ...

    # the same on two processes (DDP; see examples/README.md for DeepSpeed / FSDP configs)
    accelerate launch --num_processes 2 examples/sft.py ...

Resume with `--resume_from_checkpoint out/sft/checkpoint-500`; push with `--push_to_hub --hub_model_id me/name`.
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser, TrainingArguments

from qwenvl.train import (
    shutdown_distributed,
    DataArguments,
    ModelArguments,
    QwenVLTrainer,
    build_collator,
    build_datasets,
    load_model_and_processor,
    prepare_training_arguments,
    setup_trainable,
)


def main(argv: list[str] | None = None, stage: str = "chat-sft", captions: bool = False) -> QwenVLTrainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.set_defaults(stage=stage)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args = prepare_training_arguments(training_args)

    model, processor = load_model_and_processor(model_args, training_args)
    collator = build_collator(processor, data_args)
    train_dataset, eval_dataset = build_datasets(data_args, collator, captions=captions)
    model, table = setup_trainable(model, model_args, training_args)

    lora = None
    if model_args.use_lora or model_args.q_lora:
        lora = {"r": model_args.lora_r, "alpha": model_args.lora_alpha, "resampler": model_args.lora_resampler,
                "vit": model_args.lora_vit, "4-bit": model_args.q_lora}
    trainer = QwenVLTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        model_card={
            "base_model": model_args.model_name_or_path or "tiny random Qwen-VL (--tiny)",
            "stage": model_args.stage,
            "label_mode": data_args.label_mode,
            "table": table,
            "data_path": data_args.data_path,
            "lora": lora,
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
