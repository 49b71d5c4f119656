"""Inference helpers around `model.chat`: boxes in the user's pixel space, explicit image loading, model loading."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from PIL import Image
from transformers import CompileConfig

from .grounding import parse_boxes

Box = tuple[float, float, float, float]


def _image_size(image: Any) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.size  # (width, height)
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) in (2, 3):
        channels_first = len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4)
        height, width = (shape[1], shape[2]) if channels_first else (shape[0], shape[1])
        return int(width), int(height)
    if isinstance(image, Sequence) and len(image) == 2 and all(isinstance(v, (int, float)) for v in image):
        return int(image[0]), int(image[1])
    raise TypeError(f"cannot tell the size of {type(image).__name__}: pass a PIL image, an array or (width, height)")


def response_boxes(response: str, image: Any, scale: int = 1000) -> list[tuple[str | None, Box]]:
    """The `(ref, (x1, y1, x2, y2))` boxes of a model response, in pixels of the image the user passed.

    The model reasons in [0, 1000) of width and height whatever the image's size or aspect ratio (the processor
    stretches images to a square); this maps the numbers back with `qwenvl.grounding`'s documented convention.
    """
    return parse_boxes(response, _image_size(image), scale=scale)


class ImageFileError(ValueError):
    """An image file given on the command line is missing or cannot be decoded."""


def load_image_file(path: str | os.PathLike, max_pixels: int = 64_000_000) -> Image.Image:
    """Open a local image named explicitly by the user (never a path found in model input), fully decoded, RGB."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageFileError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageFileError(f"{path}: {width}x{height} pixels exceeds the limit of {max_pixels}")
            image.load()
            return image.convert("RGB")
    except ImageFileError:
        raise
    except Exception as err:  # PIL raises several types for unreadable files
        raise ImageFileError(f"cannot read image {path}: {err}") from err


def compiled_decode_config(**kwargs: Any) -> CompileConfig:
    """A `CompileConfig` that makes `generate` compile its decode steps on any device, the CPU included.

    Use with a static cache:
    `model.generate(..., cache_implementation="static", compile_config=compiled_decode_config())`.
    `generate` then runs the prefill eagerly and each one-token step through `torch.compile` (one compile per
    maximum length, ~30 s), which fuses the step's small kernels (norms, rotary, cache writes, attention) and, at
    batch 1 on a CPU, turns each projection into a weight-streaming reduction (`QwenVLLinear`): on a 2-vCPU CPU the
    benchmarks' 102 M model decodes at 15.0 ms per token instead of ~31 (fp32). transformers only does this
    on accelerators unless told otherwise; CUDA graphs (`mode="reduce-overhead"`) are for GPUs, so the default here is
    inductor's plain mode. `kwargs` override `CompileConfig`'s fields.
    """
    config = CompileConfig(**{"fullgraph": False, "dynamic": False, "mode": "default", **kwargs})
    config._compile_all_devices = True  # transformers' own switch for compiling off accelerators
    return config
