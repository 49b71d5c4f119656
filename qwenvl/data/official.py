"""The original Qwen-VL finetune JSON format, read into (and written from) chat messages + image paths.

The original format is a JSON list of rows
`{"id": str, "conversations": [{"from": "user" | "assistant", "value": str}, ...]}` in which a user value names its
images inline as `Picture k: <img>relative/path.png</img>\n` (k counts from 1 in each message). The loader turns a row
into `{"id", "messages", "images"}`:

* `messages`: `[{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": ...}]},
  {"role": "assistant", "content": [{"type": "text", "text": ...}]}, ...]`, the format of the chat template and of
  TRL (whose `prepare_multimodal_messages` fills the image blocks from `images`). The chat template writes each
  image block back as `Picture k: <img></img>\n`, so the rendered text is the original one without the paths.
* `images`: absolute paths of the image files, checked to exist and to lie under `image_root`. Nothing is opened:
  decode them where the data is consumed (`load_image`, or a `datasets` `Image()` column) so that a large dataset
  does not hold every picture in memory.

Paths resolve under `image_root` only: URLs, `..` escapes and absolute paths or symlinks leading outside are
rejected. Like the original `finetune.py`, a leading assistant turn is dropped and the system prompt is the fixed
default. Grounding tags (`<ref>`, `<box>`, `<quad>`) in user text are parsed only when the conversation is rendered
with `trusted_text=True` (assistant text always parses them); ChatML control tokens typed in the data stay text.
Every problem raises `ValueError` naming the file, the row index and the reason.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from ..image_processing_qwenvl import QwenVLImageProcessor, to_rgb_image
from .rows import read_json_rows


__all__ = ["load_official_finetune_json", "write_official_finetune_json", "load_image"]

_PICTURE_RE = re.compile(r"Picture (\d+): <img>(.*?)</img>\n", re.DOTALL)
_IMAGE_TAG_RE = re.compile(r"</?img>|<imgpad>")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class _RowError(ValueError):
    pass


def _resolve_image(raw: str, root: Path) -> str:
    if not raw or raw != raw.strip():
        raise _RowError(f"image path {raw!r} is empty or has surrounding spaces")
    if "\0" in raw:
        raise _RowError(f"image path {raw!r} contains a NUL byte")
    if _URL_RE.match(raw):
        raise _RowError(f"image {raw!r} is a URL; only files under image_root are read")
    candidate = Path(raw) if os.path.isabs(raw) else root / raw
    resolved = Path(os.path.realpath(candidate))
    if os.path.commonpath([resolved, root]) != str(root):
        raise _RowError(f"image path {raw!r} resolves to {resolved}, outside image_root {root}")
    if not resolved.is_file():
        raise _RowError(f"image file {raw!r} not found under image_root {root}")
    return str(resolved)


def _parse_user_value(value: str, root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    blocks: list[dict[str, Any]] = []
    images: list[str] = []
    last = 0
    for match in _PICTURE_RE.finditer(value):
        between = value[last : match.start()]
        if _IMAGE_TAG_RE.search(between):
            break  # reported below
        if between:
            blocks.append({"type": "text", "text": between})
        number = int(match.group(1))
        if number != len(images) + 1:
            raise _RowError(
                f"'Picture {number}:' where 'Picture {len(images) + 1}:' was expected; pictures are numbered from 1 "
                "in each user message (the chat template renders them that way)"
            )
        images.append(_resolve_image(match.group(2), root))
        blocks.append({"type": "image"})
        last = match.end()
    rest = value[last:]
    stray = _IMAGE_TAG_RE.search(rest)
    if stray:
        raise _RowError(
            f"image tag {stray.group()!r} at character {last + stray.start()} is not in the form "
            "'Picture k: <img>path</img>\\n'"
        )
    if rest:
        blocks.append({"type": "text", "text": rest})
    return blocks, images


def _convert_row(row: Any, root: Path) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise _RowError(f"expected an object with 'conversations', got {type(row).__name__}")
    conversations = row.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise _RowError("field 'conversations' must be a non-empty list")
    messages: list[dict[str, Any]] = []
    images: list[str] = []
    for turn_index, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise _RowError(f"conversations[{turn_index}] must be an object with 'from' and 'value'")
        role, value = turn.get("from"), turn.get("value")
        if role not in ("user", "assistant"):
            raise _RowError(f"conversations[{turn_index}].from must be 'user' or 'assistant', got {role!r}")
        if not isinstance(value, str):
            raise _RowError(f"conversations[{turn_index}].value must be a string, got {type(value).__name__}")
        if turn_index == 0 and role == "assistant":
            continue  # the original finetune.py drops a leading assistant turn
        try:
            if role == "user":
                blocks, turn_images = _parse_user_value(value, root)
                images.extend(turn_images)
            else:
                if _IMAGE_TAG_RE.search(value):
                    raise _RowError("images are only supported in user turns")
                blocks = [{"type": "text", "text": value}]
        except _RowError as error:
            raise _RowError(f"conversations[{turn_index}]: {error}") from None
        messages.append({"role": role, "content": blocks})
    if not messages:
        raise _RowError("no turns left after dropping the leading assistant turn")
    sample_id = row.get("id")
    return {"id": None if sample_id is None else str(sample_id), "messages": messages, "images": images}


def load_official_finetune_json(path: str | os.PathLike, image_root: str | os.PathLike) -> list[dict[str, Any]]:
    """Read an original Qwen-VL finetune JSON file into `{"id", "messages", "images"}` rows (see the module doc).

    `images` holds absolute paths of existing files under `image_root`; nothing is opened. Raises `ValueError`
    naming the file, the row index and the reason for the first bad row.
    """
    root = Path(os.path.realpath(image_root))
    if not root.is_dir():
        raise ValueError(f"image_root {image_root} is not a directory")
    rows = read_json_rows(path)
    samples = []
    for index, row in enumerate(rows):
        try:
            samples.append(_convert_row(row, root))
        except _RowError as error:
            raise ValueError(f"{path}: row {index}: {error}") from None
    return samples


def load_image(
    path: str | os.PathLike, max_image_pixels: int | None = QwenVLImageProcessor.max_image_pixels
) -> Image.Image:
    """Decode one image file to RGB with the image processor's checks (pixel limit before decoding, corrupt or
    truncated data). For paths returned by `load_official_finetune_json`, i.e. from a trusted dataset."""
    try:
        return to_rgb_image(Path(path).read_bytes(), max_pixels=max_image_pixels)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    to_rgb_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _message_text(message: Mapping[str, Any], images: list[str], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        blocks: Iterable[Mapping[str, Any]] = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        blocks = content
    else:
        raise ValueError(f"{where}: content must be a string or a list of blocks")
    parts, picture = [], 0
    for block in blocks:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "image":
            if message.get("role") != "user":
                raise ValueError(f"{where}: images are only supported in user messages")
            if len(images) == 0:
                raise ValueError(f"{where}: more image blocks than images")
            picture += 1
            parts.append(f"Picture {picture}: <img>{images.pop(0)}</img>\n")
        elif kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{where}: a text block needs a string 'text'")
            if _IMAGE_TAG_RE.search(text):
                raise ValueError(f"{where}: text contains an image tag, which the format cannot represent")
            parts.append(text)
        else:
            raise ValueError(f"{where}: unsupported block type {kind!r}")
    return "".join(parts)


def write_official_finetune_json(
    samples: Iterable[Mapping[str, Any]], path: str | os.PathLike, image_root: str | os.PathLike
) -> None:
    """Write `{"id"?, "messages", "images"}` samples as an original finetune JSON file.

    Images given as objects (PIL, array, tensor, bytes) are saved as PNG files `images/<row>_<k>.png` under
    `image_root`; images given as paths must already lie under `image_root` and are written relative to it.
    Messages are `user` / `assistant` turns whose content is a string or image / text blocks; image blocks become
    `Picture k: <img>path</img>\\n`. System messages are not part of the format and raise.
    """
    root = Path(os.path.realpath(image_root))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, sample in enumerate(samples):
        where = f"sample {index}"
        stored: list[str] = []
        for k, image in enumerate(sample.get("images") or []):
            if isinstance(image, (str, os.PathLike)):
                try:
                    resolved = _resolve_image(os.fspath(image), root)
                except _RowError as error:
                    raise ValueError(f"{where}: image {k}: {error}") from None
                stored.append(Path(resolved).relative_to(root).as_posix())
            else:
                relative = f"images/{index}_{k}.png"
                (root / "images").mkdir(exist_ok=True)
                (root / relative).write_bytes(_encode_png(image))
                stored.append(relative)
        conversations = []
        for turn, message in enumerate(sample.get("messages") or []):
            role = message.get("role") if isinstance(message, Mapping) else None
            if role not in ("user", "assistant"):
                raise ValueError(f"{where}: message {turn}: role must be 'user' or 'assistant', got {role!r}")
            conversations.append({"from": role, "value": _message_text(message, stored, f"{where}: message {turn}")})
        if stored:
            raise ValueError(f"{where}: {len(stored)} image(s) have no image block in the messages")
        if not conversations:
            raise ValueError(f"{where}: no messages")
        sample_id = sample.get("id")
        rows.append(
            {"id": f"identity_{index}" if sample_id is None else str(sample_id), "conversations": conversations}
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, ensure_ascii=False, indent=1)
