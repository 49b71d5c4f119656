"""Qwen-VL image processor: the original preprocessing, fed with image objects only.

The original model opened `<img>path</img>` itself, then: `convert("RGB")`, PIL bicubic resize to exactly
448 x 448 (no aspect ratio, no crop), scale to [0, 1], CLIP mean/std. This processor does the same on the PIL backend
(same PIL resampling, so the pixels match), but takes PIL images, numpy arrays, torch tensors or encoded bytes, and
never a path or URL. Encoded bytes are decoded here with a pixel limit checked from the header before decoding
(decompression bombs) and corrupt or truncated data is rejected; every error names the image index.

Modes: everything goes through PIL's `convert("RGB")` like the original (alpha is dropped, palette and CMYK are
mapped), except 16-bit images (`I;16*`, and `I` with values above 255), which are scaled to 8 bits instead of being
clipped to white.

This file is remote code: it must work copied flat next to a checkpoint.
"""

import io
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.processing_utils import ImagesKwargs


__all__ = ["QwenVLImageProcessor", "flatten_images"]


class QwenVLImageProcessorKwargs(ImagesKwargs, total=False):
    """`max_image_pixels`: reject images with more pixels (width x height) than this, before decoding them."""

    max_image_pixels: int | None


_ENCODED_TYPES = (bytes, bytearray, memoryview)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _is_single_image(value: Any) -> bool:
    if isinstance(value, (Image.Image, *_ENCODED_TYPES)):
        return True
    if isinstance(value, np.ndarray) or _is_tensor(value):
        return value.ndim in (2, 3)
    return False


def _unsupported(value: Any, index: int) -> ValueError:
    if isinstance(value, (str, os.PathLike)):
        return ValueError(
            f"image {index} is a path or URL ({str(value)[:80]!r}): image paths and URLs are never read; "
            "open the image yourself and pass the PIL image, array, tensor or encoded bytes"
        )
    return ValueError(
        f"image {index} has unsupported type {type(value).__name__}: expected a PIL image, a numpy array, a torch "
        "tensor or encoded image bytes"
    )


def flatten_images(images: Any) -> list[Any]:
    """A flat list of single images from one image, a list, a list of lists (one per sample) or a 4-D batch.

    Paths and URLs (`str` / `os.PathLike`) are refused: they are never opened here.
    """
    flat: list[Any] = []

    def visit(value: Any) -> None:
        if _is_single_image(value):
            flat.append(value)
        elif (isinstance(value, np.ndarray) or _is_tensor(value)) and value.ndim == 4:
            flat.extend(value[i] for i in range(value.shape[0]))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        else:
            raise _unsupported(value, len(flat))

    visit(images)
    return flat


def _check_pixels(width: int, height: int, max_pixels: int | None, index: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image {index} is empty ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"image {index} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(max_image_pixels); refusing a possible decompression bomb"
        )


def _decode_bytes(data: bytes, max_pixels: int | None, index: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # `max_pixels` below is the limit that applies; PIL still refuses twice its own threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as error:
        raise ValueError(f"image {index}: {error}; refusing a possible decompression bomb") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"image {index}: the bytes are not a readable image ({error})") from None
    _check_pixels(image.width, image.height, max_pixels, index)
    return image


def _pil_to_rgb(image: Image.Image, max_pixels: int | None, index: int) -> Image.Image:
    _check_pixels(image.width, image.height, max_pixels, index)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"image {index}: corrupt or truncated image data ({error})") from None
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and np.asarray(image).max(initial=0) > 255):
        wide = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"image {index}: cannot convert mode {image.mode} to RGB ({error})") from None


def _array_to_pil(array: np.ndarray, channels_first: bool, index: int) -> Image.Image:
    """uint8/uint16/bool/integer/float(0..1) arrays, (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4 -> PIL."""
    if array.ndim == 3:
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if not (first or last):
            raise ValueError(f"image {index}: array of shape {array.shape} has no channel axis of size 1, 3 or 4")
        if (channels_first and first) or not last:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
    if array.size == 0:
        raise ValueError(f"image {index} is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        pixels = np.rint(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"image {index}: integer pixels must be in [0, 255], got [{array.min()}, {array.max()}]")
        pixels = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"image {index}: float pixels must be finite and in [0, 1]")
        pixels = np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    else:
        raise ValueError(f"image {index}: unsupported pixel dtype {array.dtype}")
    mode = {2: "L"}.get(pixels.ndim) or {3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode)


def to_rgb_image(image: Any, index: int = 0, max_pixels: int | None = None) -> Image.Image:
    """One image object as a decoded RGB PIL image; `ValueError` naming `index` for anything unusable."""
    if isinstance(image, _ENCODED_TYPES):
        image = _decode_bytes(image, max_pixels, index)
    elif _is_tensor(image):
        image = _array_to_pil(image.detach().cpu().numpy(), channels_first=True, index=index)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, channels_first=False, index=index)
    elif not isinstance(image, Image.Image):
        raise _unsupported(image, index)
    return _pil_to_rgb(image, max_pixels, index)


class QwenVLImageProcessor(PilBackend):
    """Bicubic resize to `size` (square, no crop), rescale to [0, 1], CLIP mean/std -> `pixel_values` (N, 3, S, S)."""

    valid_kwargs = QwenVLImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 448, "width": 448}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    # PIL's default warning threshold (~89 MP, about 0.27 GB as RGB); PIL itself refuses twice that.
    max_image_pixels = 89_478_485

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Images are never fetched: paths and URLs are refused (see `flatten_images`)."""
        flatten_images(image_url_or_urls)
        return image_url_or_urls

    def _prepare_image_like_inputs(
        self, images: Any, *args, expected_ndims: int = 3, max_image_pixels: int | None = None, **kwargs
    ) -> list[np.ndarray]:
        prepared = []
        for index, image in enumerate(flatten_images(images)):
            rgb = to_rgb_image(image, index=index, max_pixels=max_image_pixels)
            prepared.append(np.moveaxis(np.asarray(rgb), -1, 0))
        return prepared

    def _preprocess(self, images: list[np.ndarray], **kwargs):
        batch = super()._preprocess(images, **kwargs)
        # One (N, 3, S, S) float32 array whatever `return_tensors`, so the batch layout never depends on it.
        if kwargs.get("return_tensors") is None and batch["pixel_values"]:
            batch["pixel_values"] = np.stack(batch["pixel_values"]).astype(np.float32)
        return batch


QwenVLImageProcessor.register_for_auto_class("AutoImageProcessor")
