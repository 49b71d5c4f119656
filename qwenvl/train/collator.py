"""Turn chat samples with images into padded training batches with label masks.

A feature (one dataset row) is one of

* `{"images": [...], "messages": [...]}`: TRL's vision-language format. Message content is a string or a list of
  `{"type": "image"}` / `{"type": "text", "text": ...}` blocks. When no message has an image block, one block per
  image is put at the start of the first user message (as TRL's `prepare_multimodal_messages` does).
* `{"images": [...], "prompt": [...], "completion": [...]}` with message lists: only the completion is supervised.
* `{"images": [...], "prompt": str, "completion": str}`: plain text (base-model style, e.g. captions for stage 1).
  The prompt holds one `<img></img>` placeholder per image (or none: then `Picture k: <img></img>\\n` lines are put
  in front); the completion is followed by `<|endoftext|>` and supervised with it. As in the chat template,
  control tokens typed in the text stay text and grounding tags are tags (in the prompt only with `trusted_text`).

Images may be PIL images, arrays, tensors, encoded bytes, `datasets` `Image(decode=False)` dicts or file paths;
files are decoded here, i.e. in the DataLoader workers, never in `forward`.

Label modes (labels are aligned with `input_ids`; the model shifts them):

* `"assistant"` (default): only the assistant content and its `<|im_end|>` are supervised. System and user turns,
  role headers (`<|im_start|>assistant\\n`), image spans and padding are -100.
* `"original"`: the original `finetune.py` masking (reference §8.2): additionally every `<|im_start|>`,
  every `<|im_end|>` and the `\\n` after each `<|im_end|>` are supervised, and the sequence ends with that `\\n`
  like the original's. Role names, their newline, system and user text stay masked. Unlike the original, batches
  are padded to their longest sample (not to `model_max_length`) and `attention_mask` marks padding only (the
  original masked every `<|endoftext|>`). Plain prompt/completion samples have no ChatML, so both modes agree.

The assistant text is tokenised apart from the text before it, exactly as the model sees it when it generates after
`<|im_start|>assistant\\n`, so every label boundary is a token boundary.

Truncation to `max_length` never splits an image span: a span that does not fit is dropped together with its image
(and the images after it), with a warning. Use `qwenvl.train.validate_rows` to report such rows before training.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils.chat_template_utils import render_jinja_template

from ..data.official import load_image
from ..tokenization_qwenvl import (
    ENDOFTEXT,
    GROUNDING_TOKENS,
    IM_END,
    IM_START,
    IMAGE_END,
    IMAGE_PAD,
    IMAGE_START,
    escape_special_tokens,
)

__all__ = ["IGNORE_INDEX", "LABEL_MODES", "EncodedSample", "QwenVLDataCollator", "render_supervised"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LABEL_MODES = ("assistant", "original")
PLACEHOLDER = IMAGE_START + IMAGE_END


@dataclass
class EncodedSample:
    """One sample as token ids and aligned labels; `images` are still undecoded (paths, bytes or objects)."""

    input_ids: list[int]
    labels: list[int]
    images: list[Any] = field(default_factory=list)
    truncated_from: int | None = None  # the length before truncation, when truncated
    images_dropped: int = 0

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _as_image_list(feature: Mapping[str, Any]) -> list[Any]:
    images = feature.get("images")
    if images is None and feature.get("image") is not None:
        images = [feature["image"]]
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"'images' must be a list, got {type(images).__name__}")
    return list(images)


def _template_messages(messages: Any, images: list[Any], where: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages as the chat template sees them (image blocks without payload) and the images in block order."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} dicts")
    out: list[dict[str, Any]] = []
    inline: list[Any] = []
    n_blocks = 0
    for turn, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {turn} must be a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: message {turn} has role {role!r}; expected 'system', 'user' or 'assistant'")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"{where}: message {turn} content must be a string or a list of blocks")
        blocks = []
        for block in content:
            kind = block.get("type") if isinstance(block, Mapping) else None
            if kind == "image":
                n_blocks += 1
                if block.get("image") is not None:
                    inline.append(block["image"])
                blocks.append({"type": "image"})
            elif kind == "text":
                if not isinstance(block.get("text"), str):
                    raise ValueError(f"{where}: message {turn} has a text block without a string 'text'")
                blocks.append({"type": "text", "text": block["text"]})
            else:
                raise ValueError(f"{where}: message {turn} has a block of type {kind!r}; expected 'image' or 'text'")
        out.append({"role": role, "content": blocks})

    if inline:
        # TRL's collator writes the `images` into the blocks in place; the same objects twice are one set of images.
        if images and (len(images) != len(inline) or any(a is not b for a, b in zip(images, inline))):
            raise ValueError(f"{where}: different images are given in 'images' and inside image blocks; use one")
        if len(inline) != n_blocks:
            raise ValueError(f"{where}: only {len(inline)} of {n_blocks} image blocks carry an image")
        return out, inline
    if n_blocks == 0 and images:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"{where}: {len(images)} image(s) but no user message to put them in")
        text = first_user["content"]
        rest = [{"type": "text", "text": text}] if isinstance(text, str) else list(text)
        first_user["content"] = [{"type": "image"} for _ in images] + rest
    elif n_blocks != len(images):
        raise ValueError(f"{where}: the messages have {n_blocks} image block(s) but {len(images)} image(s) were given")
    return out, images


def _decode_image(image: Any, where: str, index: int) -> Any:
    """A file path or a `datasets` `Image(decode=False)` dict → a decoded image; other objects go to the processor."""
    try:
        if isinstance(image, (str, os.PathLike)):
            return load_image(image)
        if isinstance(image, Mapping):
            if image.get("bytes") is not None:
                return image["bytes"]
            if image.get("path"):
                return load_image(image["path"])
            raise ValueError("an image dict needs 'bytes' or 'path'")
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: image {index}: {error}") from None
    return image


def _escape(text: str, keep_grounding: bool) -> str:
    """Special-token strings in `text` made plain text, except the grounding tags when `keep_grounding`."""
    escaped = escape_special_tokens(text)
    if keep_grounding:
        for tag in GROUNDING_TOKENS:
            escaped = escaped.replace(escape_special_tokens(tag), tag)
    return escaped


class QwenVLDataCollator:
    """Collate chat (or prompt/completion) samples with images into `input_ids`, `attention_mask`, `labels` and
    `pixel_values` (absent when the batch has no image), right-padded to the batch's longest sample.

    Args:
        processor: a `QwenVLProcessor` (its tokenizer, chat template, image processor and `num_image_tokens`).
        label_mode: `"assistant"` (loss on assistant content + `<|im_end|>`) or `"original"` (the original
            finetune script's masking, reference §8.2). See the module docstring.
        max_length: truncate longer samples (never through an image span). `None` keeps everything.
        pad_to_multiple_of: pad the batch length up to a multiple of this (e.g. 8 for tensor cores).
        trusted_text: parse grounding tags (`<ref>`, `<box>`, `<quad>`) in user and system text, as the original
            finetune data needs; ChatML control tokens and image tags typed in text always stay plain text.
        cache_encodings: encode each distinct row once and keep the result (keyed by the row's JSON text; ~8 bytes
            a token), for training over several epochs, length grouping (which encodes every row first) and phases
            that share rows. Rendering the chat template and tokenising cost ~1 ms a row, as much as a small model's
            training step spends on it. Rows holding values JSON can't spell (decoded images, bytes) are encoded
            every time. Each DataLoader worker fills its own copy (`dataloader_persistent_workers` keeps it across
            epochs).
        cache_images: keep each image file's pixel values after its first use (keyed by its path; 4 bytes per value,
            49 KB for a 64-pixel image, 2.4 MB at 448), so an image read by several rows or epochs is decoded and
            resized once. For a training set whose images fit in memory. Images given as objects or bytes are
            processed every time.
    """

    def __init__(
        self,
        processor: Any,
        label_mode: str = "assistant",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        trusted_text: bool = True,
        cache_encodings: bool = False,
        cache_images: bool = False,
    ):
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or getattr(processor, "image_processor", None) is None:
            raise ValueError("QwenVLDataCollator needs a QwenVLProcessor (with .tokenizer and .image_processor)")
        if not processor.chat_template:
            raise ValueError("the processor has no chat template")
        self.processor = processor
        self.tokenizer = tokenizer
        self.label_mode = label_mode
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.trusted_text = trusted_text
        self.num_image_tokens = processor.num_image_tokens
        self.image_span = IMAGE_START + IMAGE_PAD * self.num_image_tokens + IMAGE_END

        ids = tokenizer.convert_tokens_to_ids
        self.im_start_id, self.im_end_id = ids(IM_START), ids(IM_END)
        self.image_start_id, self.image_end_id, self.image_pad_id = ids(IMAGE_START), ids(IMAGE_END), ids(IMAGE_PAD)
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else ids(ENDOFTEXT)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) != 1:
            raise ValueError(f"the tokenizer encodes '\\n' as {newline}; the Qwen-VL format needs a single token")
        self.newline_id = newline[0]
        # Counters for logging (`truncated`, `images_dropped`, `unsupervised`), per process: each DataLoader
        # worker counts its own batches.
        self.stats = {"truncated": 0, "images_dropped": 0, "unsupervised": 0}
        self._encodings: dict[str, tuple] | None = {} if cache_encodings else None
        self._pixels: dict[str, torch.Tensor] | None = {} if cache_images else None

    # ------------------------------------------------------------------------------------------------------------
    # Encoding of one sample
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _refuse_image_tags(text: str, where: str) -> None:
        for tag in (IMAGE_START, IMAGE_END, IMAGE_PAD):
            if tag in text:
                raise ValueError(
                    f"{where}: the text contains {tag} outside an empty placeholder {PLACEHOLDER}; image paths in "
                    "text are never read: pass the images in 'images' and write one placeholder per image"
                )

    def _tokenize(self, text: str, where: str) -> tuple[list[int], int]:
        """Ids of one text segment with each `<img></img>` expanded; checks that no other image tag is present."""
        n_images = text.count(PLACEHOLDER)
        self._refuse_image_tags(text.replace(PLACEHOLDER, ""), where)
        ids = self.tokenizer(text.replace(PLACEHOLDER, self.image_span), add_special_tokens=False)["input_ids"]
        n_pads = n_images * self.num_image_tokens
        if ids.count(self.image_start_id) != n_images or ids.count(self.image_pad_id) != n_pads:
            raise ValueError(f"{where}: the tokenizer did not keep the image tags as single tokens")
        return ids, n_images

    def _render(self, messages: list[dict[str, Any]], supervise_from: int, where: str) -> list[tuple[str, bool]]:
        """Render with the chat template and split into (text, supervised) segments at the generation spans."""
        rendered, spans = render_jinja_template(
            conversations=[messages],
            chat_template=self.processor.chat_template,
            return_assistant_tokens_mask=True,
            trusted_text=self.trusted_text,
        )
        text, spans = rendered[0], spans[0]
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(spans) != len(assistant_turns):
            raise ValueError(
                f"{where}: the chat template marked {len(spans)} generation span(s) for {len(assistant_turns)} "
                "assistant message(s); it needs one {% generation %} block per assistant message"
            )
        segments, last = [], 0
        for turn, (start, end) in zip(assistant_turns, spans):
            if start > last:
                segments.append((text[last:start], False))
            segments.append((text[start:end], turn >= supervise_from))
            last = end
        if last < len(text):
            segments.append((text[last:], False))
        return segments

    def encode(self, feature: Mapping[str, Any], where: str = "sample") -> EncodedSample:
        """Token ids and labels of one feature (no image is decoded); `ValueError` naming `where` on bad input."""
        key = _cache_key(feature) if self._encodings is not None else None
        if key is None:
            return self._encode(feature, where)
        cached = self._encodings.get(key)
        if cached is None:
            cached = self._encodings[key] = _packed(self._encode(feature, where))
        input_ids, labels, images, truncated_from, images_dropped = cached
        return EncodedSample(list(input_ids), list(labels), list(images), truncated_from, images_dropped)

    def encode_ahead(self, features: Sequence[Mapping[str, Any]], workers: int = 1, where: str = "row") -> None:
        """Fill the encoding cache (`cache_encodings=True`) for `features` before training, in `workers` forked
        processes: length grouping otherwise encodes every row on one core before the first step (~1 ms a row, 33 s
        for the demo's 32,000 multi-task rows). Rows already cached, or that a key can't stand for, are left to
        `encode`. A bad row raises the `ValueError` `encode` would, naming `where` and the row's index."""
        if self._encodings is None:
            raise ValueError("encode_ahead fills the encoding cache: build the collator with cache_encodings=True")
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        todo, keys = [], set()
        for index, feature in enumerate(features):
            key = _cache_key(feature)
            if key is not None and key not in self._encodings and key not in keys:
                keys.add(key)
                named = f" (id {feature['id']!r})" if isinstance(feature, Mapping) and "id" in feature else ""
                todo.append((f"{where} {index}{named}", key, feature))
        if workers == 1 or len(todo) < 2 * workers or "fork" not in multiprocessing.get_all_start_methods():
            encoded = _encode_rows(self, todo)
        else:
            encoded = _encode_forked(self, todo, workers)
        self._encodings.update(encoded)

    def _encode(self, feature: Mapping[str, Any], where: str) -> EncodedSample:
        if not isinstance(feature, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(feature).__name__}")
        try:
            images = _as_image_list(feature)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

        if "messages" in feature and feature["messages"] is not None:
            messages, images = _template_messages(feature["messages"], images, where)
            segments, extra, is_chat = self._render(messages, 0, where), [], True
        elif feature.get("prompt") is not None and feature.get("completion") is not None:
            prompt, completion = feature["prompt"], feature["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                segments, extra, images = self._plain_segments(prompt, completion, images, where)
                is_chat = False
            elif isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
                if not completion or any(
                    not isinstance(m, Mapping) or m.get("role") != "assistant" for m in completion
                ):
                    raise ValueError(f"{where}: 'completion' must be a non-empty list of assistant messages")
                messages, images = _template_messages(list(prompt) + list(completion), images, where)
                segments, extra, is_chat = self._render(messages, len(prompt), where), [], True
            else:
                raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")
        else:
            raise ValueError(f"{where}: a feature needs 'messages', or 'prompt' and 'completion'")

        input_ids: list[int] = []
        supervised: list[bool] = []
        n_images = 0
        for text, is_supervised in segments:
            ids, count = self._tokenize(text, where)
            n_images += count
            input_ids += ids
            supervised += [is_supervised] * len(ids)
        input_ids += [token for token, _ in extra]
        supervised += [flag for _, flag in extra]
        if n_images != len(images):
            raise ValueError(
                f"{where}: the text holds {n_images} image placeholder(s) but {len(images)} image(s) were given"
            )

        if self.label_mode == "original" and is_chat:
            input_ids.append(self.newline_id)  # the original ends every turn, the last one included, with "\n"
            supervised.append(False)
        labels = self._labels(input_ids, supervised)
        return self._truncate(EncodedSample(input_ids, labels, list(images)))

    def _plain_segments(
        self, prompt: str, completion: str, images: list[Any], where: str
    ) -> tuple[list[tuple[str, bool]], list[tuple[int, bool]], list[Any]]:
        """Plain text follows the chat template's rules: control tokens typed in text stay text, grounding tags are
        tags in the completion (and in the prompt with `trusted_text`), `<img></img>` marks where images go."""
        for text in (prompt.replace(PLACEHOLDER, ""), completion):
            self._refuse_image_tags(text, where)
        prompt = PLACEHOLDER.join(_escape(part, self.trusted_text) for part in prompt.split(PLACEHOLDER))
        completion = _escape(completion, keep_grounding=True)
        if images and PLACEHOLDER not in prompt:
            prompt = "".join(f"Picture {k}: {PLACEHOLDER}\n" for k in range(1, len(images) + 1)) + prompt
        return [(prompt, False), (completion, True)], [(self.eos_id, True)], images

    def _labels(self, input_ids: list[int], supervised: list[bool]) -> list[int]:
        image_tokens = (self.image_start_id, self.image_pad_id, self.image_end_id)
        labels = []
        for i, (token, is_supervised) in enumerate(zip(input_ids, supervised)):
            keep = is_supervised and token not in image_tokens
            if self.label_mode == "original":
                keep = keep or token in (self.im_start_id, self.im_end_id)
                keep = keep or (token == self.newline_id and i > 0 and input_ids[i - 1] == self.im_end_id)
            labels.append(token if keep else IGNORE_INDEX)
        return labels

    def _truncate(self, sample: EncodedSample) -> EncodedSample:
        if self.max_length is None or len(sample.input_ids) <= self.max_length:
            return sample
        cut = self.max_length
        starts = [i for i, token in enumerate(sample.input_ids) if token == self.image_start_id]
        kept_images = 0
        for start in starts:
            end = start + self.num_image_tokens + 2
            if end <= cut:
                kept_images += 1
            else:
                cut = min(cut, start)
                break
        return EncodedSample(
            sample.input_ids[:cut],
            sample.labels[:cut],
            sample.images[:kept_images],
            truncated_from=len(sample.input_ids),
            images_dropped=len(sample.images) - kept_images,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Batching
    # ------------------------------------------------------------------------------------------------------------

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("QwenVLDataCollator got an empty batch")
        samples = [self.encode(feature, where=f"feature {i}") for i, feature in enumerate(features)]
        for i, sample in enumerate(samples):
            if sample.truncated_from is not None:
                self.stats["truncated"] += 1
                self.stats["images_dropped"] += sample.images_dropped
                logger.warning(
                    "feature %d: %d tokens truncated to %d%s", i, sample.truncated_from, len(sample.input_ids),
                    f", dropping {sample.images_dropped} image(s) whose span did not fit"
                    if sample.images_dropped
                    else "",
                )
            if sample.num_supervised == 0:
                self.stats["unsupervised"] += 1
                logger.warning("feature %d has no supervised token (all labels are -100): it adds no loss", i)

        length = max(len(sample.input_ids) for sample in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

        images = [
            (image, f"feature {row}", k) for row, sample in enumerate(samples) for k, image in enumerate(sample.images)
        ]
        if images:
            batch["pixel_values"] = self._pixel_values(images)
        return batch

    def _pixel_values(self, images: list[tuple[Any, str, int]]) -> torch.Tensor:
        """Pixel values of `(image, where, index)` triples, in order; with `cache_images`, files come from the cache."""
        def process(triples: list[tuple[Any, str, int]]) -> torch.Tensor:
            decoded = [_decode_image(image, where, k) for image, where, k in triples]
            return self.processor.image_processor(decoded, return_tensors="pt")["pixel_values"]

        if self._pixels is None:
            return process(images)
        rows = []
        for triple in images:
            image = triple[0]
            if not isinstance(image, (str, os.PathLike)):
                rows.append(process([triple])[0])
                continue
            key = os.fspath(image)
            if key not in self._pixels:
                self._pixels[key] = process([triple])[0]
            rows.append(self._pixels[key])
        return torch.stack(rows)


def _collapse_spans(text: str) -> str:
    """`<imgpad><imgpad>...` runs → `<imgpad>xN` in decoded text."""
    return re.sub(f"(?:{re.escape(IMAGE_PAD)})+", lambda m: f"{IMAGE_PAD}x{len(m.group()) // len(IMAGE_PAD)}", text)


def _render_one(input_ids: list[int], labels: list[int], mask: list[int] | None, tokenizer: Any) -> str:
    runs: list[tuple[bool, list[int]]] = []
    for position, (token, label) in enumerate(zip(input_ids, labels)):
        if mask is not None and not mask[position]:
            continue
        if label not in (IGNORE_INDEX, token):
            raise ValueError(f"labels are not aligned with input_ids at position {position} ({label} vs {token})")
        is_supervised = label != IGNORE_INDEX
        if runs and runs[-1][0] == is_supervised:
            runs[-1][1].append(token)
        else:
            runs.append((is_supervised, [token]))
    pieces = []
    for is_supervised, ids in runs:
        text = _collapse_spans(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        pieces.append(f"[[{text}]]" if is_supervised else text)
    return "".join(pieces)


def _as_list(values: Any) -> list:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def render_supervised(batch_or_sample: Mapping[str, Any] | EncodedSample, tokenizer: Any) -> str | list[str]:
    """The decoded text of a sample (or of every row of a batch) with the supervised runs in `[[...]]`.

    Image spans are shortened to `<img><imgpad>xN</img>` and padding (attention_mask 0) is left out. Use it to check
    what a dataset teaches: `print(render_supervised(collator([row]), processor.tokenizer)[0])`.
    """
    if isinstance(batch_or_sample, EncodedSample):
        return _render_one(batch_or_sample.input_ids, batch_or_sample.labels, None, tokenizer)
    input_ids, labels = batch_or_sample["input_ids"], batch_or_sample["labels"]
    mask = batch_or_sample.get("attention_mask")
    input_ids, labels = _as_list(input_ids), _as_list(labels)
    mask = _as_list(mask) if mask is not None else None
    if input_ids and isinstance(input_ids[0], int):
        return _render_one(input_ids, labels, mask, tokenizer)
    return [
        _render_one(ids, row_labels, mask[row] if mask is not None else None, tokenizer)
        for row, (ids, row_labels) in enumerate(zip(input_ids, labels))
    ]


def _packed(sample: EncodedSample) -> tuple:
    """The cache's compact form of an encoded sample (arrays of int32: ~8 bytes a token)."""
    return (array("i", sample.input_ids), array("i", sample.labels), tuple(sample.images), sample.truncated_from,
            sample.images_dropped)


def _cache_key(feature: Any) -> str | None:
    """The encoding cache's key for a row: its JSON text, or None for a row JSON can't spell (an image object,
    bytes), which a key can't stand for."""
    try:
        return json.dumps(feature, sort_keys=True)
    except (TypeError, ValueError):
        return None


def _encode_rows(collator: QwenVLDataCollator, todo: list[tuple[str, str, Any]]) -> list[tuple[str, tuple]]:
    """`(key, packed encoding)` of each `(where, key, feature)`."""
    return [(key, _packed(collator._encode(feature, where))) for where, key, feature in todo]


_FORKED_WORK: tuple | None = None  # (collator, todo): what forked encoders inherit instead of receiving it pickled


def _encode_forked_slice(bounds: tuple[int, int]) -> list[tuple[str, tuple]]:
    collator, todo = _FORKED_WORK
    return _encode_rows(collator, todo[bounds[0] : bounds[1]])


def _encode_forked(collator: QwenVLDataCollator, todo: list[tuple[str, str, Any]],
                   workers: int) -> list[tuple[str, tuple]]:
    """Encode `todo` in forked processes, which inherit the collator and the rows (nothing to pickle but the results).
    The children only render templates and tokenise. TOKENIZERS_PARALLELISM is set for the fork so that `tokenizers`
    does not print its after-fork warning (its children then tokenise on one thread, as these do anyway)."""
    global _FORKED_WORK
    step = -(-len(todo) // (4 * workers))
    slices = [(start, min(start + step, len(todo))) for start in range(0, len(todo), step)]
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _FORKED_WORK = (collator, todo)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_encode_forked_slice, slices, chunksize=1)
    finally:
        _FORKED_WORK = None
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return [item for part in parts for item in part]
