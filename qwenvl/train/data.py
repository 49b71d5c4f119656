"""Training data: load rows from the supported sources and report bad rows before training starts.

Sources (`load_rows`):

* an original Qwen-VL finetune JSON file (a list of `{"id", "conversations"}`), read with
  `qwenvl.data.load_official_finetune_json` (image paths resolved under `image_root`);
* a `.json` / `.jsonl` file of rows already in the collator's format (`images` + `messages`, or `images` +
  `prompt`/`completion`), image paths relative to `image_root`;
* a folder written by `datasets.Dataset.save_to_disk`, or a Hub dataset name (via `datasets.load_dataset`).

`validate_rows` encodes every row exactly as the collator will (text only: images are checked, not decoded) and
returns the bad ones as `(index, reason)`; `prepare_dataset` turns the good rows into a `datasets.Dataset` with a
`length` column for `train_sampling_strategy="group_by_length"`.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from ..data.official import load_official_finetune_json
from ..data.rows import read_json_rows
from .collator import QwenVLDataCollator

__all__ = [
    "ValidationReport",
    "caption_to_prompt_completion",
    "decode_image_columns",
    "load_rows",
    "prepare_dataset",
    "validate_rows",
]

logger = logging.getLogger(__name__)


@dataclass
class ValidationReport:
    """`ok`: indices of usable rows; `errors`: `(index, reason)` of the others; `lengths`: token count per ok row."""

    ok: list[int] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0

    def __str__(self) -> str:
        total = len(self.ok) + len(self.errors)
        lines = [f"{len(self.ok)} of {total} rows usable, {len(self.errors)} bad, {self.truncated} truncated"]
        lines += [f"  row {index}: {reason}" for index, reason in self.errors[:20]]
        if len(self.errors) > 20:
            lines.append(f"  ... and {len(self.errors) - 20} more")
        return "\n".join(lines)

    def raise_if_errors(self) -> None:
        if self.errors:
            raise ValueError(f"bad training rows (fix them or drop them with drop_bad_rows=True):\n{self}")


def _resolve_paths(row: dict[str, Any], root: Path, index: int) -> dict[str, Any]:
    """Image paths (`images` list or single `image`) resolved under `root`: no URL, no escape from `root`."""
    from ..data.official import _resolve_image, _RowError

    def resolve(image: Any) -> Any:
        if not isinstance(image, str):
            return image
        try:
            return _resolve_image(image, Path(os.path.realpath(root)))
        except _RowError as error:
            raise ValueError(f"row {index}: {error}") from None

    row = dict(row)
    if isinstance(row.get("images"), list):
        row["images"] = [resolve(image) for image in row["images"]]
    if "image" in row:
        row["image"] = resolve(row["image"])
    return row


def load_rows(data_path: str | os.PathLike, image_root: str | os.PathLike | None = None, split: str = "train") -> Any:
    """Rows from a finetune JSON, a JSON/JSONL file of rows, a saved dataset folder or a Hub dataset (see module doc).

    `image_root` defaults to the JSON file's folder. Returns a list of dicts or a `datasets.Dataset`.
    """
    path = Path(data_path)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        root = Path(image_root) if image_root is not None else path.parent
        rows = read_json_rows(path)
        if rows and isinstance(rows[0], Mapping) and "conversations" in rows[0]:
            return load_official_finetune_json(path, root)
        return [_resolve_paths(row, root, i) if isinstance(row, dict) else row for i, row in enumerate(rows)]
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if path.exists():
        raise ValueError(f"{data_path}: expected a .json/.jsonl file, a saved dataset folder or a Hub dataset name")
    return datasets.load_dataset(str(data_path), split=split)


def caption_to_prompt_completion(row: Mapping[str, Any], prompt: str = "<img></img>") -> dict[str, Any]:
    """An image–caption row (`image` or `images`, and `caption` or `text`) as a plain prompt/completion sample:
    the image span, then the caption followed by `<|endoftext|>` (stage-1 pre-training, base-model format)."""
    if "prompt" in row or "messages" in row:
        return dict(row)
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    caption = row.get("caption", row.get("text"))
    if not isinstance(caption, str) or not images:
        raise ValueError("a caption row needs 'image' (or 'images') and a string 'caption' (or 'text')")
    return {"images": list(images), "prompt": prompt, "completion": caption}


def _check_image(image: Any) -> str | None:
    """Why `image` cannot be used, checked cheaply (paths exist, encoded bytes have a readable header)."""
    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            image = image["bytes"]
        elif image.get("path"):
            image = image["path"]
        else:
            return "an image dict needs 'bytes' or 'path'"
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            return f"image file {os.fspath(image)!r} not found"
        try:
            with PILImage.open(image) as opened:
                opened.size  # noqa: B018 - reads the header only
        except (OSError, ValueError, SyntaxError) as error:
            return f"image file {os.fspath(image)!r} is not a readable image ({error})"
        return None
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with PILImage.open(io.BytesIO(bytes(image))):
                pass
        except (OSError, ValueError, SyntaxError) as error:
            return f"image bytes are not a readable image ({error})"
        return None
    if image is None:
        return "an image is None"
    return None


def _undecoded(rows: Any) -> Any:
    """A `datasets.Dataset` view whose image columns are not decoded (validation only needs the headers)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return rows
    if not isinstance(rows, datasets.Dataset):
        return rows
    for name, feature in rows.features.items():
        if isinstance(feature, datasets.Image):
            rows = rows.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            rows = rows.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return rows


def validate_rows(rows: Iterable[Mapping[str, Any]], collator: QwenVLDataCollator) -> ValidationReport:
    """Encode each row as `collator` would and collect `(index, reason)` for every row that would fail or teach
    nothing: malformed messages, image/placeholder count mismatches, unreadable images, no supervised token, or a
    `max_length` that would cut an image span."""
    report = ValidationReport()
    for index, row in enumerate(_undecoded(rows)):
        try:
            sample = collator.encode(row, where=f"row {index}")
        except ValueError as error:
            report.errors.append((index, str(error).removeprefix(f"row {index}: ")))
            continue
        problems = [reason for reason in map(_check_image, sample.images) if reason]
        if sample.images_dropped:
            problems.append(
                f"{sample.truncated_from} tokens: max_length={collator.max_length} would cut image span(s) "
                f"({sample.images_dropped} image(s) would be dropped)"
            )
        if sample.num_supervised == 0:
            problems.append("no supervised token (no assistant answer / completion, or all of it truncated)")
        if problems:
            report.errors.append((index, "; ".join(problems)))
            continue
        report.truncated += sample.truncated_from is not None
        report.ok.append(index)
        report.lengths.append(len(sample.input_ids))
    return report


def _blocks_only(row: Mapping[str, Any]) -> dict[str, Any]:
    """String message contents as one text block, so that Arrow sees one content type in every row."""
    row = dict(row)
    for key in ("messages", "prompt", "completion"):
        if isinstance(row.get(key), list):
            row[key] = [
                {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
                for m in row[key]
            ]
    return row


def prepare_dataset(
    rows: Sequence[Mapping[str, Any]] | Any, collator: QwenVLDataCollator, drop_bad_rows: bool = False
) -> tuple[Any, ValidationReport]:
    """Validate `rows` and return `(datasets.Dataset of the good rows with a "length" column, report)`.

    Raises `ValueError` listing the bad rows unless `drop_bad_rows`, in which case they are logged and left out.
    """
    import datasets

    report = validate_rows(rows, collator)
    if report.errors:
        if not drop_bad_rows:
            report.raise_if_errors()
        logger.warning("dropping bad training rows:\n%s", report)
    if isinstance(rows, datasets.Dataset):
        dataset = rows.select(report.ok) if report.errors else rows
        if "length" in dataset.column_names:
            dataset = dataset.remove_columns("length")
        dataset = dataset.add_column("length", report.lengths)
    else:
        dataset = datasets.Dataset.from_list(
            [{**_blocks_only(rows[i]), "length": n} for i, n in zip(report.ok, report.lengths)]
        )
    if len(dataset) == 0:
        raise ValueError(f"no usable training rows:\n{report}")
    return dataset, report


def decode_image_columns(dataset: Any) -> Any:
    """Cast `images` / `image` columns of file paths to `datasets.Image` features, so that rows carry decoded PIL
    images (decoded lazily, on access in the DataLoader workers). Needed by collators that take image objects only,
    such as TRL's."""
    import datasets

    for name in ("images", "image"):
        if name not in dataset.column_names:
            continue
        feature = dataset.features[name]
        if feature == datasets.Value("string"):
            dataset = dataset.cast_column(name, datasets.Image())
        elif getattr(feature, "feature", None) == datasets.Value("string"):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image()))
    return dataset


def load_dataset_with_columns(path: str | os.PathLike, required: Iterable[str]) -> Any:
    """`load_rows(path)` as a `datasets.Dataset` (images not decoded yet), checking the columns a script needs."""
    import datasets

    rows = load_rows(path)
    dataset = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)
    missing = set(required) - set(dataset.column_names)
    if missing:
        raise ValueError(f"{path}: rows need the fields {sorted(missing)}")
    return dataset
