#!/usr/bin/env python
"""Stage 1 of Qwen-VL: pre-train the vision-language adapter on image–caption pairs with the HF `Trainer`.

`--stage pretrain` (default, the seed's stage 1): the ViT and the LLM are frozen and only the adapter learns
(resampler + ln_post + proj; see `qwenvl.train.stages`). `--stage pretrain-paper`: the paper's stage 1, where the ViT
trains too; add `--image_size 224` to train at the paper's lower resolution (positional tables are interpolated).

Data rows are image–caption pairs (`image` or `images`, and `caption` or `text`), e.g. a JSONL file
`{"image": "cats/001.jpg", "caption": "Two cats on a sofa."}` with `--image_root`, a saved `datasets` folder or a
Hub dataset. Each becomes the base-model format `<img>…</img>caption<|endoftext|>` with the loss on the caption and
`<|endoftext|>`. Rows already in `prompt`/`completion` or `messages` form are used as they are.

    python examples/pretrain.py --tiny --data_path captions.jsonl --output_dir out/stage1 --max_steps 50 --use_cpu
    accelerate launch --num_processes 8 examples/pretrain.py --model_name_or_path Qwen-VL-hf \
        --data_path captions.jsonl --image_root images/ --output_dir out/stage1 --bf16 \
        --learning_rate 2e-4 --adam_beta2 0.98 --adam_epsilon 1e-6 --weight_decay 0.05 --warmup_steps 500 \
        --lr_scheduler_type cosine --max_length 512

All other options (LoRA, gradient checkpointing, resuming, `--push_to_hub`) are those of `examples/sft.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sft import main as sft_main

from qwenvl.train import shutdown_distributed


def main(argv: list[str] | None = None):
    return sft_main(argv, stage="pretrain", captions=True)


if __name__ == "__main__":
    main(sys.argv[1:])
    shutdown_distributed()
