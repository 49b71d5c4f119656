"""Reward functions for Qwen-VL RL, usable by our PPO trainer and by TRL's `GRPOTrainer` / `RLOOTrainer`.

TRL calls every callable reward as `fn(prompts=..., completions=..., completion_ids=..., trainer_state=...,
log_extra=..., log_metric=..., **dataset_columns)` and expects one `float` (or `None`, "no opinion") per completion.
Completions are strings for plain-text datasets and `[{"role": "assistant", "content": str}]` for conversational ones;
for vision datasets the prompts carry the images as `{"type": "image", "image": <PIL.Image>}` content blocks and the
`image` / `images` columns are passed along as well. All functions here accept that calling convention and ignore the
keywords they do not use.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ..grounding import parse_boxes


Completion = str | list[dict[str, Any]]


def completion_text(completion: Completion) -> str:
    """The text of a completion: the string itself, or the concatenated text content of a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        parts = []
        for message in completion:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(block.get("text", "") for block in content if block.get("type") == "text")
            elif content is not None:
                raise TypeError(f"message content must be a string or a list of blocks, got {type(content).__name__}")
        return "".join(parts)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _column_value(column: Sequence[Any] | None, name: str, row: int, n_rows: int) -> Any:
    if column is None:
        return None
    if len(column) != n_rows:
        raise ValueError(f"column '{name}' has {len(column)} rows but there are {n_rows} completions")
    return column[row]


def _prompt_images(prompt: Any) -> list[Any]:
    """Images embedded in a conversational prompt as `{"type": "image", "image": ...}` blocks, in order."""
    if not isinstance(prompt, list):
        return []
    return [
        block["image"]
        for message in prompt
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for block in message["content"]
        if block.get("type") == "image" and "image" in block
    ]


def _row_images(
    row: int, n_rows: int, image: Sequence[Any] | None, images: Sequence[Any] | None, prompts: Sequence[Any] | None
) -> list[Any]:
    """The images of one row: the `images` column, else the `image` column, else those embedded in the prompt."""
    row_images = _column_value(images, "images", row, n_rows)
    if row_images is not None:
        return list(row_images)
    row_image = _column_value(image, "image", row, n_rows)
    if row_image is not None:
        return [row_image]
    return _prompt_images(_column_value(prompts, "prompts", row, n_rows))


def _image_size(img: Any, row: int) -> tuple[int, int]:
    """(width, height) of a PIL image or of an image file (only the header is read)."""
    if isinstance(img, Image.Image):
        return img.size
    if isinstance(img, (str, os.PathLike)):
        try:
            with Image.open(img) as opened:
                return opened.size
        except OSError as error:
            raise ValueError(f"row {row}: cannot read image '{img}': {error}") from error
    raise ValueError(f"row {row}: expected a PIL image or an image path, got {type(img).__name__}")


# ---------------------------------------------------------------------------------------------------------------------
# Grounding: IoU of the first predicted box
# ---------------------------------------------------------------------------------------------------------------------

# "(x1,y1),(x2,y2)" with neither <box> tag: TRL decodes completions with `skip_special_tokens=True`, which drops
# both `<box>` and `</box>` when they are special tokens.
_BARE_BOX = re.compile(r"\(\s*\d+\s*,\s*\d+\s*\)\s*,\s*\(\s*\d+\s*,\s*\d+\s*\)")


def first_box(text: str, image_size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """First box of a model output in pixels (`image_size` is `(width, height)`), or `None` if there is none.

    Boxes are read by `qwenvl.grounding.parse_boxes`, which accepts a box with either of its tags; when both tags are
    gone the first bare `(x1,y1),(x2,y2)` pair is used, with the same pixel convention.
    """
    boxes = parse_boxes(text, image_size)
    if not boxes:
        match = _BARE_BOX.search(text)
        if match is None:
            return None
        boxes = parse_boxes(f"<box>{match.group(0)}</box>", image_size)
        if not boxes:
            return None
    return tuple(float(v) for v in boxes[0][1])


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes; a box with no area has IoU 0 with everything."""
    ax1, ay1, ax2, ay2 = box_a
    bx1, by1, bx2, by2 = box_b
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _reference_box(value: Any, row: int) -> tuple[float, float, float, float]:
    try:
        coords = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        coords = ()
    if (
        len(coords) != 4
        or not all(math.isfinite(v) for v in coords)
        or coords[2] <= coords[0]
        or coords[3] <= coords[1]
    ):
        raise ValueError(
            f"row {row}: field 'box' must be [x1, y1, x2, y2] in pixels with x1 < x2 and y1 < y2, got {value!r}"
        )
    return coords


def iou_reward(
    completions: Sequence[Completion],
    box: Sequence[Sequence[float] | None],
    image: Sequence[Any] | None = None,
    images: Sequence[Sequence[Any]] | None = None,
    prompts: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """IoU between the first box of each completion and the reference `box` column, in [0, 1].

    `box` is `[x1, y1, x2, y2]` in pixels of the row's image. The completion's `[0, 1000)` coordinates are mapped to
    pixels with `qwenvl.grounding.parse_boxes`, using the size of the row's last image (`images` column, else
    `image`, else the images embedded in the prompt): like the original Qwen-VL, a box refers to the latest picture.
    A completion without a parseable box scores 0; a row whose `box` is `None` scores `None`, so that TRL ignores
    this reward for it (useful when grounding rows are mixed with other tasks).
    """
    n_rows = len(completions)
    rewards: list[float | None] = []
    for row, completion in enumerate(completions):
        reference = _column_value(box, "box", row, n_rows)
        if reference is None:
            rewards.append(None)
            continue
        reference = _reference_box(reference, row)
        row_images = _row_images(row, n_rows, image, images, prompts)
        if not row_images or row_images[-1] is None:
            raise ValueError(f"row {row}: iou_reward needs the image (column 'image' or 'images') to scale the box")
        predicted = first_box(completion_text(completion), _image_size(row_images[-1], row))
        rewards.append(0.0 if predicted is None else box_iou(predicted, reference))
    return rewards


# ---------------------------------------------------------------------------------------------------------------------
# Short answers: normalised exact match
# ---------------------------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_number_separator(text: str, i: int) -> bool:
    return text[i] in ".," and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer: NFKC, lower case, no punctuation or symbols (except the "." and "," inside
    numbers such as 3.5 or 1,000), no English articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(
        " " if unicodedata.category(ch)[0] in "PS" and not _is_number_separator(text, i) else ch
        for i, ch in enumerate(text)
    )
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_reward(
    completions: Sequence[Completion], answer: Sequence[str | Sequence[str] | None], **kwargs: Any
) -> list[float | None]:
    """1.0 if the normalised completion equals the normalised `answer` (or any of a list of answers), else 0.0.

    Normalisation ([`normalize_answer`]) makes "The Cat." match "cat" and full-width punctuation match ASCII. Rows
    whose `answer` is `None` score `None`, so that TRL ignores this reward for them.
    """
    n_rows = len(completions)
    rewards: list[float | None] = []
    for row, completion in enumerate(completions):
        reference = _column_value(answer, "answer", row, n_rows)
        if reference is None:
            rewards.append(None)
            continue
        references = [reference] if isinstance(reference, str) else reference
        if (
            not isinstance(references, (list, tuple))
            or not references
            or not all(isinstance(r, str) for r in references)
        ):
            raise ValueError(
                f"row {row}: field 'answer' must be a string or a non-empty list of strings, got {reference!r}"
            )
        prediction = normalize_answer(completion_text(completion))
        rewards.append(float(any(prediction == normalize_answer(r) for r in references)))
    return rewards


# ---------------------------------------------------------------------------------------------------------------------
# Vision-language reward model
# ---------------------------------------------------------------------------------------------------------------------


class RewardModelScorer:
    """Reward callable that scores prompt + completion with a vision-language reward model, images included.

    TRL scores `PreTrainedModel` rewards text-only; wrapping the reward model in this callable gives it the images.
    Conversational rows are rendered with `processor.apply_chat_template` (prompt messages followed by the completion
    messages), plain rows are `prompt + completion` and must already contain one `<img></img>` per image. The batch
    is then encoded with `processor(text=..., images=..., padding=True, padding_side="right", return_tensors="pt")`
    and the score of each row is `reward_model(**inputs).logits[:, 0]`. Rendering must match the reward model's
    training format, which is what the processor's chat template guarantees.

    The reward model is put in eval mode, since dropout would make scores noisy.
    """

    # TRL names each reward by `__name__` in its logs.
    __name__ = "reward_model_reward"

    def __init__(self, reward_model: torch.nn.Module, processor: Any, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.reward_model = reward_model.eval()
        self.processor = processor
        self.batch_size = batch_size

    def _render(self, prompt: Any, completion: Completion, row_images: list[Any], row: int) -> tuple[str, list[Any]]:
        if isinstance(prompt, str):
            return prompt + completion_text(completion), row_images
        if not isinstance(prompt, list):
            raise ValueError(
                f"row {row}: a prompt must be a string or a list of messages, got {type(prompt).__name__}"
            )
        # Imported here so that using the other rewards does not import TRL.
        from trl.data_utils import prepare_multimodal_messages

        reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        messages = list(prompt) + list(reply)
        # Images already embedded in the prompt win; otherwise the column images go before the first user turn.
        messages = prepare_multimodal_messages(messages, images=None if _prompt_images(messages) else row_images)
        text = self.processor.apply_chat_template(messages, tokenize=False)
        return text, _prompt_images(messages)

    @torch.inference_mode()
    def _score(self, texts: list[str], images: list[list[Any]]) -> list[float]:
        inputs = self.processor(
            text=texts,
            images=images if any(images) else None,
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        device = getattr(self.reward_model, "device", None)
        dtype = getattr(self.reward_model, "dtype", None)
        inputs = {
            key: value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            if isinstance(value, torch.Tensor)
            else value
            for key, value in inputs.items()
        }
        outputs = self.reward_model(**inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        if logits.dim() != 2 or logits.size(0) != len(texts) or logits.size(1) != 1:
            raise ValueError(
                f"the reward model must return logits of shape ({len(texts)}, 1), got {tuple(logits.shape)}; "
                "load it with num_labels=1"
            )
        return logits[:, 0].float().tolist()

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Completion],
        image: Sequence[Any] | None = None,
        images: Sequence[Sequence[Any]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        n_rows = len(completions)
        if len(prompts) != n_rows:
            raise ValueError(f"got {len(prompts)} prompts but {n_rows} completions")
        texts, all_images = [], []
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            row_images = _row_images(row, n_rows, image, images, None)
            text, used_images = self._render(prompt, completion, row_images, row)
            texts.append(text)
            all_images.append(used_images)
        scores: list[float] = []
        for start in range(0, n_rows, self.batch_size):
            end = start + self.batch_size
            scores.extend(self._score(texts[start:end], all_images[start:end]))
        return scores


def make_reward_model_reward(reward_model: torch.nn.Module, processor: Any, batch_size: int = 8) -> RewardModelScorer:
    """Wrap a vision-language reward model (`QwenVLForSequenceClassification`, logits `(B, 1)`) as a reward callable
    for `GRPOTrainer(reward_funcs=[...])` or our PPO trainer; see [`RewardModelScorer`]."""
    return RewardModelScorer(reward_model, processor, batch_size=batch_size)
