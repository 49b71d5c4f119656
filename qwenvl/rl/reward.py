"""Vision-language reward models on TRL's `RewardTrainer`: a preference collator with images and a small subclass.

TRL 1.16's `RewardTrainer` is text-only: it tokenises `chosen` / `rejected` up front and its collator carries no
images. Here rows stay raw until batching: [`QwenVLPreferenceCollator`] renders `chat(prompt + chosen)` and
`chat(prompt + rejected)` with the processor's chat template, and [`QwenVLRewardTrainer`] encodes each prompt's
images once and gives the same features to its chosen and its rejected sequence. TRL's loss is kept:
`-log sigmoid(r_chosen - r_rejected - margin)`, plus `center_rewards_coefficient * mean((r_c + r_r)^2)` when set,
and so are its metrics (`accuracy` is the pairwise accuracy; `eval_accuracy` on held-out pairs).

Preference rows: `prompt` (a user string or a list of messages), `chosen` and `rejected` (assistant strings or
lists of assistant messages), `images` (a list of image objects, or `image`), optional `margin`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import ProcessorMixin
from trl import RewardConfig, RewardTrainer
from trl.data_utils import prepare_multimodal_messages

from .value import vision_tower


def _row_images(example: dict[str, Any], row: int) -> list[Any]:
    images = example.get("images")
    if images is None and example.get("image") is not None:
        images = [example["image"]]
    images = list(images or [])
    for image in images:
        if not isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
            raise ValueError(
                f"preference row {row}: field 'images' holds a {type(image).__name__}; pass image objects (PIL, "
                "numpy or torch), e.g. by loading the files in the dataset"
            )
    return images


def _as_messages(value: Any, role: str, field: str, row: int) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return list(value)
    raise ValueError(
        f"preference row {row}: field '{field}' must be a string or a non-empty list of messages, got {value!r:.80}"
    )


@dataclass
class QwenVLPreferenceCollator:
    """Batches preference rows into `input_ids` (the B chosen sequences, then the B rejected ones), `attention_mask`,
    `pixel_values` (each row's images once, row-major) and optionally `margin`.

    Both sequences of a row are the chat rendering of the same prompt (with the same images) followed by one reply,
    i.e. exactly what `qwenvl.rl.rewards.RewardModelScorer` and the PPO trainer score later. `max_length` drops
    nothing silently: a pair longer than it raises, naming the row (filter long rows from the dataset first).
    """

    processor: ProcessorMixin
    max_length: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra chat-template variables, e.g. `{"trusted_text": True}` for prompts with grounding tags (as in SFT)."""

    def _render(self, example: dict[str, Any], row: int) -> tuple[str, str, list[Any]]:
        for field in ("prompt", "chosen", "rejected"):
            if example.get(field) is None:
                raise ValueError(f"preference row {row}: missing field '{field}'")
        images = _row_images(example, row)
        prompt = _as_messages(example["prompt"], "user", "prompt", row)
        texts = []
        for field in ("chosen", "rejected"):
            reply = _as_messages(example[field], "assistant", field, row)
            try:
                messages = prepare_multimodal_messages(prompt + reply, images=images)
            except ValueError as error:
                raise ValueError(f"preference row {row}: {error}") from error
            texts.append(self.processor.apply_chat_template(messages, tokenize=False,
                                                            **(self.chat_template_kwargs or {})))
        return texts[0], texts[1], images

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        chosen, rejected, images = [], [], []
        for row, example in enumerate(examples):
            c, r, i = self._render(example, row)
            chosen.append(c)
            rejected.append(r)
            images.append(i)
        has_images = any(images)
        encoded = self.processor(
            text=chosen + rejected,
            images=images + images if has_images else None,
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        if self.max_length is not None:
            lengths = encoded["attention_mask"].sum(-1)
            too_long = (lengths > self.max_length).nonzero().flatten().tolist()
            if too_long:
                rows = sorted({i % len(examples) for i in too_long})
                raise ValueError(
                    f"preference rows {rows} (of this batch) are longer than max_length={self.max_length} tokens "
                    "with their images; filter them out of the dataset"
                )
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if has_images:
            # Rows are chosen then rejected, so the first half of the images are each row's images once.
            batch["pixel_values"] = encoded["pixel_values"][: sum(len(i) for i in images)]
        if any("margin" in example for example in examples):
            missing = [row for row, example in enumerate(examples) if example.get("margin") is None]
            if missing:
                raise ValueError(f"preference rows {missing} (of this batch) have no 'margin' while others do")
            batch["margin"] = torch.tensor([float(example["margin"]) for example in examples])
        return batch


class QwenVLRewardTrainer(RewardTrainer):
    """TRL's `RewardTrainer` for a Qwen-VL reward model (`QwenVLForSequenceClassification`, `num_labels=1`).

    Differences from the parent:
    - `processing_class` is the `QwenVLProcessor` (or the collator carries it): `RewardTrainer` sees its tokenizer,
      and the default collator is [`QwenVLPreferenceCollator`] on the processor;
    - rows are not tokenised up front (images are processed per batch), so `prompt` / `images` / ... survive
      `remove_unused_columns`. For the same reason `RewardConfig.max_length` filters nothing: drop long rows from
      the dataset, or pass `QwenVLPreferenceCollator(processor, max_length=...)` to fail loudly on them;
    - each row's images are encoded once and shared by its chosen and rejected sequences;
    - saves (final and checkpoints) include the processor, so the folder is hub-ready.
    """

    def __init__(self, model: Any, args: RewardConfig | None = None, data_collator: Any = None,
                 processing_class: Any = None, **kwargs: Any):
        processor = processing_class if isinstance(processing_class, ProcessorMixin) else None
        if processor is None and isinstance(data_collator, QwenVLPreferenceCollator):
            processor = data_collator.processor
        if processor is None:
            raise ValueError("QwenVLRewardTrainer needs the QwenVLProcessor as processing_class (or in the collator)")
        if data_collator is None:
            data_collator = QwenVLPreferenceCollator(processor)
        self.processor = processor
        super().__init__(model=model, args=args, data_collator=data_collator,
                         processing_class=processor.tokenizer, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # rendered and encoded by the collator, images included

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["images", "image", "prompt", "chosen", "rejected", "margin"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values = inputs.pop("pixel_values", None)
        if pixel_values is not None:
            features = vision_tower(self.accelerator.unwrap_model(model))(pixel_values)
            inputs["image_features"] = torch.cat([features, features])  # chosen rows, then rejected rows
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        self.processor.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)


__all__ = ["QwenVLPreferenceCollator", "QwenVLRewardTrainer"]
