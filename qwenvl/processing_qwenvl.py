"""Qwen-VL processor: text + image objects -> `input_ids`, `attention_mask`, `pixel_values`.

In text, each image is the empty placeholder `<img></img>` (the chat template writes `Picture k: <img></img>\n`).
The processor pairs the k-th placeholder of the batch (row-major) with the k-th image and expands it to `<img>` +
`num_image_tokens` x `<imgpad>` + `</img>`; the model fills the k-th `<imgpad>` run with image k's features.

Text given to the processor is trusted markup (usually the chat template's output): its special tokens are parsed.
Two things are refused because they would let text choose what the model sees:
* an image tag with something inside (`<img>/etc/passwd</img>`): the original model opened that path; here paths
  and URLs are never read, images come only through `images=`;
* a stray `<img>`, `</img>` or `<imgpad>`, which would create an image slot with no image.
Untrusted text must go through the chat template (or `escape_special_tokens`), which keeps it plain text.

Truncation only removes text: when `max_length` would cut or drop any image span the call raises (it never returns
ids whose image slots disagree with `pixel_values`). Filter such samples out of a dataset by length beforehand.

This file is remote code: it must work copied flat next to a checkpoint.
"""

import re
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin
from transformers.tokenization_utils_base import TruncationStrategy
from transformers.utils.generic import PaddingStrategy

from .image_processing_qwenvl import QwenVLImageProcessor, QwenVLImageProcessorKwargs, flatten_images
from .tokenization_qwenvl import (
    IMAGE_END,
    IMAGE_PAD,
    IMAGE_START,
    QwenVLTokenizerFast,
    escape_special_tokens,
    load_default_chat_template,
)


__all__ = ["QwenVLProcessor", "QwenVLImageProcessor", "QwenVLTokenizerFast", "IMAGE_PLACEHOLDER"]

IMAGE_PLACEHOLDER = IMAGE_START + IMAGE_END
_IMAGE_TAG_RE = re.compile(re.escape(IMAGE_START) + "|" + re.escape(IMAGE_END) + "|" + re.escape(IMAGE_PAD))
# Markers that `apply_chat_template(..., sanitize_control_tokens=True)` puts around control tokens of user strings.
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"
_MARKED_RE = re.compile(f"{_MARK_START}(.*?){_MARK_END}", re.DOTALL)


class QwenVLProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: QwenVLImageProcessorKwargs


def _find_image_placeholders(text: str, sample: int, num_image_tokens: int) -> list[tuple[int, int]]:
    """Character spans of the image placeholders of one text; `ValueError` for any other use of the image tags.

    A placeholder is `<img></img>`, or an already expanded `<img>` + `num_image_tokens` x `<imgpad>` + `</img>`
    (e.g. decoded ids fed back).
    """
    spans: list[tuple[int, int]] = []
    open_at: int | None = None
    pads = 0
    position = 0
    for match in _IMAGE_TAG_RE.finditer(text):
        tag = match.group()
        if open_at is not None and text[position : match.start()]:
            inside = text[open_at + len(IMAGE_START) : match.start()]
            raise ValueError(
                f"text {sample}: found {IMAGE_START}{inside[:60]}...: image paths and URLs in text are never read. "
                f"Pass the images as objects with images= and write the empty placeholder {IMAGE_PLACEHOLDER} where "
                "each one goes (the chat template does this for {'type': 'image'} blocks)."
            )
        if tag == IMAGE_START:
            if open_at is not None:
                raise ValueError(f"text {sample}: {IMAGE_START} at character {match.start()} inside another image tag")
            open_at, pads = match.start(), 0
        elif open_at is None:
            raise ValueError(
                f"text {sample}: stray {tag} at character {match.start()} outside an image placeholder; write "
                f"{IMAGE_PLACEHOLDER} for each image (or escape untrusted text with escape_special_tokens)"
            )
        elif tag == IMAGE_PAD:
            pads += 1
        else:
            if pads not in (0, num_image_tokens):
                raise ValueError(
                    f"text {sample}: image span at character {open_at} holds {pads} {IMAGE_PAD} tokens, expected "
                    f"0 (placeholder) or {num_image_tokens}"
                )
            spans.append((open_at, match.end()))
            open_at = None
        position = match.end()
    if open_at is not None:
        raise ValueError(f"text {sample}: unclosed {IMAGE_START} at character {open_at}")
    return spans


def _is_per_sample(images: Any, n_texts: int) -> bool:
    return (
        isinstance(images, (list, tuple))
        and len(images) == n_texts
        and len(images) > 0
        and all(item is None or isinstance(item, (list, tuple)) for item in images)
    )


class QwenVLProcessor(ProcessorMixin):
    """AutoProcessor for Qwen-VL: `QwenVLImageProcessor` + `QwenVLTokenizerFast` + the ChatML template.

    `num_image_tokens` must equal the model's `config.visual["n_queries"]` (256 for the release) and the image
    processor's size its `config.visual["image_size"]`.
    """

    valid_processor_kwargs = QwenVLProcessorKwargs

    def __init__(
        self,
        image_processor: QwenVLImageProcessor | None = None,
        tokenizer: QwenVLTokenizerFast | None = None,
        chat_template: str | None = None,
        num_image_tokens: int = 256,
        **kwargs,
    ):
        if not isinstance(num_image_tokens, int) or num_image_tokens <= 0:
            raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or load_default_chat_template()
        self.num_image_tokens = num_image_tokens
        self.image_token = IMAGE_PAD
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD) if tokenizer is not None else None
        self.image_start_token_id = tokenizer.convert_tokens_to_ids(IMAGE_START) if tokenizer is not None else None
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(IMAGE_END) if tokenizer is not None else None
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    @property
    def image_span(self) -> str:
        """The text one image expands to."""
        return IMAGE_START + IMAGE_PAD * self.num_image_tokens + IMAGE_END

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise `text` (a string or a list), expanding each `<img></img>` with the next image of `images`.

        `images`: one image, a flat list (paired with the placeholders in batch order) or one list per text
        (`None` or `[]` for a text without images). Text kwargs: `padding`, `padding_side`, `truncation`,
        `max_length`, `pad_to_multiple_of`, `return_tensors`, `return_offsets_mapping`, `return_attention_mask`.
        """
        if videos is not None or audio is not None:
            raise ValueError("Qwen-VL takes images only: videos and audio are not supported")
        if images is None and text is None:
            raise ValueError("QwenVLProcessor needs text, images or both")
        merged = self._merge_kwargs(QwenVLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)

        if text is None:
            pixel_values = self.image_processor(flatten_images(images), **images_kwargs)["pixel_values"]
            return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

        for unsupported in ("return_overflowing_tokens", "text_pair", "is_split_into_words"):
            if text_kwargs.get(unsupported):
                raise ValueError(f"{unsupported} is not supported by QwenVLProcessor")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(sample, str) for sample in texts):
            raise ValueError("text must be a string or a list of strings")
        if text_kwargs.pop("sanitize_control_tokens", False):
            texts = [self._unmark(sample) for sample in texts]
        spans = [_find_image_placeholders(sample, i, self.num_image_tokens) for i, sample in enumerate(texts)]
        flat_images = self._pair_images(images, spans)

        data: dict[str, Any] = {}
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, **images_kwargs)["pixel_values"]

        expanded, replacement_offsets = self._expand(texts, spans)
        want_offsets = bool(text_kwargs.get("return_offsets_mapping"))
        encoding = self.tokenizer(
            expanded,
            add_special_tokens=text_kwargs.get("add_special_tokens", True),
            return_offsets_mapping=want_offsets,
            return_attention_mask=False,
            padding=False,
            truncation=False,
        )
        input_ids = [list(ids) for ids in encoding["input_ids"]]
        offsets = [list(map(tuple, o)) for o in encoding["offset_mapping"]] if want_offsets else None
        for i, ids in enumerate(input_ids):
            self._check_image_spans(ids, len(spans[i]), i)

        input_ids, offsets = self._truncate(input_ids, offsets, text_kwargs)
        data.update(self._pad(input_ids, offsets, text_kwargs, return_tensors))
        if merged.get("return_text_replacement_offsets"):
            data["text_replacement_offsets"] = replacement_offsets
        if merged.get("return_mm_token_type_ids"):
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(data["input_ids"])
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])

    @staticmethod
    def _unmark(text: str) -> str:
        """Encode the control tokens marked by `sanitize_control_tokens=True` as text, and drop the markers."""
        text = _MARKED_RE.sub(lambda match: escape_special_tokens(match.group(1)), text)
        return text.replace(_MARK_START, "").replace(_MARK_END, "")

    def _pair_images(self, images: Any, spans: list[list[tuple[int, int]]]) -> list[Any]:
        counts = [len(sample_spans) for sample_spans in spans]
        if images is None:
            if any(counts):
                raise ValueError(
                    f"the text has {sum(counts)} image placeholder(s) {IMAGE_PLACEHOLDER} but no images were given"
                )
            return []
        if _is_per_sample(images, len(spans)):
            flat: list[Any] = []
            for i, (sample_images, count) in enumerate(zip(images, counts, strict=True)):
                sample_images = flatten_images(sample_images or [])
                if len(sample_images) != count:
                    raise ValueError(
                        f"text {i} has {count} image placeholder(s) {IMAGE_PLACEHOLDER} but {len(sample_images)} "
                        "image(s) were given for it"
                    )
                flat.extend(sample_images)
            return flat
        flat = flatten_images(images)
        if len(flat) != sum(counts):
            raise ValueError(
                f"the text has {sum(counts)} image placeholder(s) {IMAGE_PLACEHOLDER} (per text: {counts}) but "
                f"{len(flat)} image(s) were given"
            )
        return flat

    def _expand(
        self, texts: list[str], spans: list[list[tuple[int, int]]]
    ) -> tuple[list[str], list[list[dict[str, Any]]]]:
        """Replace each placeholder by the image span; the offsets use `ProcessorMixin`'s replacement format."""
        expanded, all_offsets = [], []
        for sample, sample_spans in zip(texts, spans, strict=True):
            pieces, offsets, last, shift = [], [], 0, 0
            for start, end in sample_spans:
                pieces.append(sample[last:start])
                new_start = start + shift
                pieces.append(self.image_span)
                offsets.append(
                    {
                        "type": "image",
                        "span": (start, end),
                        "new_span": (new_start, new_start + len(self.image_span)),
                        "text": sample[start:end],
                        "replacement": self.image_span,
                    }
                )
                shift += len(self.image_span) - (end - start)
                last = end
            pieces.append(sample[last:])
            expanded.append("".join(pieces))
            all_offsets.append(offsets)
        return expanded, all_offsets

    def _check_image_spans(self, ids: list[int], n_images: int, sample: int) -> None:
        starts = [p for p, token in enumerate(ids) if token == self.image_start_token_id]
        pads = sum(token == self.image_token_id for token in ids)
        ends = sum(token == self.image_end_token_id for token in ids)
        well_formed = len(starts) == n_images == ends and pads == n_images * self.num_image_tokens
        for start in starts:
            span = ids[start + 1 : start + 1 + self.num_image_tokens + 1]
            well_formed = well_formed and span == [self.image_token_id] * self.num_image_tokens + [
                self.image_end_token_id
            ]
        if not well_formed:
            raise ValueError(
                f"text {sample}: the tokenizer did not encode {IMAGE_START}, {IMAGE_PAD} and {IMAGE_END} as single "
                "tokens; use the Qwen-VL tokenizer"
            )

    def _image_token_ranges(self, ids: list[int]) -> list[tuple[int, int]]:
        length = self.num_image_tokens + 2
        return [(p, p + length) for p, token in enumerate(ids) if token == self.image_start_token_id]

    def _truncate(
        self, input_ids: list[list[int]], offsets: list[list[tuple[int, int]]] | None, text_kwargs: dict
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None]:
        truncation = text_kwargs.get("truncation")
        if (
            truncation in (None, False)
            or TruncationStrategy("longest_first" if truncation is True else truncation)
            == TruncationStrategy.DO_NOT_TRUNCATE
        ):
            return input_ids, offsets
        max_length = text_kwargs.get("max_length") or self.tokenizer.model_max_length
        left = self.tokenizer.truncation_side == "left"
        for i, ids in enumerate(input_ids):
            if len(ids) <= max_length:
                continue
            keep = (len(ids) - max_length, len(ids)) if left else (0, max_length)
            for k, (start, end) in enumerate(self._image_token_ranges(ids)):
                if start < keep[0] or end > keep[1]:
                    raise ValueError(
                        f"text {i}: truncating {len(ids)} tokens to max_length={max_length} would cut image {k} "
                        f"(tokens {start}..{end - 1}); image spans are never split. Raise max_length or remove "
                        "or shorten this sample"
                    )
            input_ids[i] = ids[keep[0] : keep[1]]
            if offsets is not None:
                offsets[i] = offsets[i][keep[0] : keep[1]]
        return input_ids, offsets

    def _pad(
        self,
        input_ids: list[list[int]],
        offsets: list[list[tuple[int, int]]] | None,
        text_kwargs: dict,
        return_tensors: str | None,
    ) -> dict[str, Any]:
        padding = text_kwargs.get("padding", False)
        strategy = (
            PaddingStrategy.LONGEST
            if padding is True
            else PaddingStrategy.DO_NOT_PAD
            if padding in (False, None)
            else PaddingStrategy(padding)
        )
        lengths = [len(ids) for ids in input_ids]
        if strategy == PaddingStrategy.DO_NOT_PAD:
            target = None
            if return_tensors is not None and len(set(lengths)) > 1:
                raise ValueError(
                    f"texts have different lengths {lengths}; pass padding=True to return tensors for this batch"
                )
        else:
            if strategy == PaddingStrategy.LONGEST:
                target = max(lengths)
            else:
                target = text_kwargs.get("max_length") or self.tokenizer.model_max_length
            multiple = text_kwargs.get("pad_to_multiple_of")
            if multiple:
                target = -(-target // multiple) * multiple
        side = text_kwargs.get("padding_side") or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad_id = self.tokenizer.pad_token_id
        if target is not None and pad_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token to pad")

        padded_ids, masks, padded_offsets = [], [], []
        for i, ids in enumerate(input_ids):
            missing = max(0, (target or 0) - len(ids))
            ids_pad, mask, mask_pad = [pad_id] * missing, [1] * len(ids), [0] * missing
            sample_offsets = offsets[i] if offsets is not None else None
            offsets_pad = [(0, 0)] * missing
            if side == "left":
                padded_ids.append(ids_pad + ids)
                masks.append(mask_pad + mask)
                if sample_offsets is not None:
                    padded_offsets.append(offsets_pad + sample_offsets)
            else:
                padded_ids.append(ids + ids_pad)
                masks.append(mask + mask_pad)
                if sample_offsets is not None:
                    padded_offsets.append(sample_offsets + offsets_pad)
        data: dict[str, Any] = {"input_ids": padded_ids}
        if text_kwargs.get("return_attention_mask", True) is not False:
            data["attention_mask"] = masks
        if offsets is not None:
            data["offset_mapping"] = (
                np.asarray(padded_offsets, dtype=np.int64).reshape(len(padded_offsets), -1, 2)
                if return_tensors is not None
                else padded_offsets
            )
        return data


QwenVLProcessor.register_for_auto_class("AutoProcessor")
