"""Grounding helpers: pixel boxes <-> Qwen-VL's `<ref>…</ref><box>(x1,y1),(x2,y2)</box>` text, and drawing.

Qwen-VL writes box corners as integers normalised to `[0, 1000)` of the image width (x) and height (y). The released
code is not consistent about the inverse: its drawing helper divides by 1000, its RefCOCO evaluation by 999. This
module uses one convention everywhere, chosen so that a pixel box survives `format_box` -> `parse_boxes` within half
a normalised step (at most one pixel for images up to 2000 px):

* encode (`scale=1000`, default): `v_norm = clip(floor(v / W * 1000), 0, 999)`
* decode (`scale=1000`, default): `v = (v_norm + 0.5) / 1000 * W` (the centre of the normalised cell)

`scale=999` reproduces the original evaluation instead: decode `v = v_norm / 999 * W`, encode
`v_norm = clip(round(v / W * 999), 0, 999)`. Use it to compare with the published RefCOCO numbers.

Parsing never raises on model output: anything that is not a well-formed box is skipped. Only a bad `image_size`
(a caller error) raises `ValueError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont


__all__ = ["format_box", "format_quad", "format_ref_boxes", "parse_boxes", "parse_quads", "draw_boxes"]

Box = tuple[float, float, float, float]
Quad = tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]

_SCALES = (1000, 999)
_INT = r"\s*([0-9]{1,6})\s*"
_POINT = rf"\({_INT},{_INT}\)"
# A box needs at least one of its tags: the RefCOCO prompt ends in "<box>", so a completion decoded alone starts
# with the bare coordinates and ends in "</box>".
_BOX_RE = re.compile(rf"(<box>)?\s*{_POINT}\s*,\s*{_POINT}\s*(</box>)?")
_QUAD_RE = re.compile(rf"(<quad>)?\s*{_POINT}\s*,\s*{_POINT}\s*,\s*{_POINT}\s*,\s*{_POINT}\s*(</quad>)?")
_REF_RE = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)
_TAG_RE = re.compile(r"</?(?:ref|box|quad)>")


def _check_size(image_size: Sequence[float]) -> tuple[float, float]:
    try:
        width, height = (float(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from None
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise ValueError(f"image_size must be two positive numbers (width, height), got {image_size!r}")
    return width, height


def _check_scale(scale: int) -> None:
    if scale not in _SCALES:
        raise ValueError(f"scale must be 1000 (this library's convention) or 999 (original evaluation), got {scale!r}")


def _encode(value: float, extent: float, scale: int) -> int:
    ratio = value / extent
    norm = math.floor(ratio * 1000) if scale == 1000 else round(ratio * 999)
    return min(max(norm, 0), 999)


def _decode(value: int, extent: float, scale: int) -> float:
    if scale == 1000:
        return (min(value, 999) + 0.5) * extent / 1000
    return min(value, 999) * extent / 999


def _points(values: Iterable[float], n: int, what: str) -> list[float]:
    try:
        coords = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be {n} numbers, got {values!r}") from None
    if len(coords) != n or not all(math.isfinite(v) for v in coords):
        raise ValueError(f"{what} must be {n} finite numbers, got {values!r}")
    return coords


def format_box(box_xyxy: Sequence[float], image_size: Sequence[float], scale: int = 1000) -> str:
    """`<box>(x1,y1),(x2,y2)</box>` for a pixel box `(x1, y1, x2, y2)` in an image of `image_size` = (width, height).

    Coordinates outside the image are clipped. Raises `ValueError` for a malformed box (not 4 finite numbers, or
    x1 > x2 or y1 > y2), since a training target must never be silently wrong.
    """
    _check_scale(scale)
    width, height = _check_size(image_size)
    x1, y1, x2, y2 = _points(box_xyxy, 4, "box_xyxy")
    if x1 > x2 or y1 > y2:
        raise ValueError(f"box_xyxy must satisfy x1 <= x2 and y1 <= y2, got {tuple(box_xyxy)!r}")
    n = [_encode(x1, width, scale), _encode(y1, height, scale), _encode(x2, width, scale), _encode(y2, height, scale)]
    return f"<box>({n[0]},{n[1]}),({n[2]},{n[3]})</box>"


def format_quad(points: Sequence[Sequence[float]], image_size: Sequence[float], scale: int = 1000) -> str:
    """`<quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>` for four pixel corner points (OCR text regions)."""
    _check_scale(scale)
    width, height = _check_size(image_size)
    try:
        flat = [v for point in points for v in point]
    except TypeError:
        raise ValueError(f"points must be four (x, y) pairs, got {points!r}") from None
    if len(points) != 4:
        raise ValueError(f"points must be four (x, y) pairs, got {points!r}")
    coords = _points(flat, 8, "points")
    pairs = [f"({_encode(coords[i], width, scale)},{_encode(coords[i + 1], height, scale)})" for i in range(0, 8, 2)]
    return f"<quad>{','.join(pairs)}</quad>"


def format_ref_boxes(
    ref: str | None, boxes: Iterable[Sequence[float]], image_size: Sequence[float], scale: int = 1000
) -> str:
    """`<ref>ref</ref><box>…</box><box>…</box>`: one phrase followed by the boxes it refers to (no ref if `None`)."""
    text = "" if ref is None else f"<ref>{ref}</ref>"
    return text + "".join(format_box(box, image_size, scale) for box in boxes)


def _iter_refs_and_matches(text: str, pattern: re.Pattern[str], open_tag: str, close_tag: str, close_group: int):
    """Yield `(ref, match)` for every well-formed shape in `text`.

    A shape belongs to the `<ref>` that precedes it when only other shapes and whitespace stand between them, so
    `<ref>a</ref><box>…</box><box>…</box>` gives two boxes for "a". Any other text in between ends the ref.
    """
    refs = [(m.start(), m.end(), m.group(1).strip()) for m in _REF_RE.finditer(text)]
    ref_index = 0
    current: str | None = None
    last_end = 0
    for match in pattern.finditer(text):
        if match.group(1) is None and match.group(close_group) is None:
            continue
        # The ref in force: the last one that ends before this shape, if nothing but shapes/space follows it.
        while ref_index < len(refs) and refs[ref_index][1] <= match.start():
            current = refs[ref_index][2]
            last_end = refs[ref_index][1]
            ref_index += 1
        gap = text[last_end : match.start()]
        gap = gap.replace(open_tag, "").replace(close_tag, "")
        if gap.strip():
            current = None
        yield current, match
        last_end = match.end()


def parse_boxes(text: str, image_size: Sequence[float], scale: int = 1000) -> list[tuple[str | None, Box]]:
    """The `(ref, (x1, y1, x2, y2))` boxes of a response, in pixels of an image of `image_size` = (width, height).

    `ref` is the text of the `<ref>` the box belongs to, or `None`. Tolerant of model output: spaces inside the
    coordinates, a missing `<box>` or `</box>` (but not both), swapped corners (sorted) and values above 999 (clipped)
    are accepted; anything else is skipped without raising. `<quad>` regions are returned by `parse_quads`.
    """
    _check_scale(scale)
    width, height = _check_size(image_size)
    if not isinstance(text, str):
        return []
    result: list[tuple[str | None, Box]] = []
    for ref, match in _iter_refs_and_matches(text, _BOX_RE, "<box>", "</box>", 6):
        x1, y1, x2, y2 = (int(match.group(i)) for i in range(2, 6))
        px = sorted((_decode(x1, width, scale), _decode(x2, width, scale)))
        py = sorted((_decode(y1, height, scale), _decode(y2, height, scale)))
        result.append((ref, (px[0], py[0], px[1], py[1])))
    return result


def parse_quads(text: str, image_size: Sequence[float], scale: int = 1000) -> list[tuple[str | None, Quad]]:
    """The `(ref, ((x1, y1), …, (x4, y4)))` quadrilaterals of `<quad>` spans, in pixels; same tolerance as
    `parse_boxes`."""
    _check_scale(scale)
    width, height = _check_size(image_size)
    if not isinstance(text, str):
        return []
    result: list[tuple[str | None, Quad]] = []
    for ref, match in _iter_refs_and_matches(text, _QUAD_RE, "<quad>", "</quad>", 10):
        values = [int(match.group(i)) for i in range(2, 10)]
        quad = tuple((_decode(values[i], width, scale), _decode(values[i + 1], height, scale)) for i in range(0, 8, 2))
        result.append((ref, quad))
    return result


# Tableau 10, a palette with distinguishable colours; picked in order so drawings are deterministic.
_COLORS = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)

# A response to parse, or pixel boxes `(x1, y1, x2, y2)` / `(ref, (x1, y1, x2, y2))`.
BoxesLike = str | Iterable[Sequence[float] | tuple[str | None, Sequence[float]]]


def _normalise_shapes(
    text_or_boxes: BoxesLike, image_size: tuple[int, int], scale: int
) -> list[tuple[str | None, list]]:
    if isinstance(text_or_boxes, str):
        shapes: list[tuple[str | None, list]] = []
        for ref, (x1, y1, x2, y2) in parse_boxes(text_or_boxes, image_size, scale):
            shapes.append((ref, [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]))
        for ref, quad in parse_quads(text_or_boxes, image_size, scale):
            shapes.append((ref, list(quad)))
        return shapes
    shapes = []
    for item in text_or_boxes:
        ref: str | None = None
        box = item
        if len(item) == 2 and (item[0] is None or isinstance(item[0], str)):
            ref, box = item
        x1, y1, x2, y2 = _points(box, 4, "box")
        shapes.append((ref, [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]))
    return shapes


def draw_boxes(image: Image.Image, text_or_boxes: BoxesLike, scale: int = 1000) -> Image.Image:
    """A copy of `image` with the boxes (and quads) drawn and labelled by their ref.

    `text_or_boxes` is a model response (parsed with `parse_boxes` / `parse_quads`) or pixel boxes, each either
    `(x1, y1, x2, y2)` or `(ref, (x1, y1, x2, y2))`. Uses PIL's built-in default font: no font file is downloaded.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    canvas = image.convert("RGB")
    shapes = _normalise_shapes(text_or_boxes, canvas.size, scale)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line_width = max(1, round(min(canvas.size) / 200))
    for index, (ref, corners) in enumerate(shapes):
        color = _COLORS[index % len(_COLORS)]
        draw.polygon(corners, outline=color, width=line_width)
        if ref:
            left = min(x for x, _ in corners)
            top = min(y for _, y in corners)
            x0, y0, x1, y1 = draw.textbbox((left, top), ref, font=font)
            # Put the label above the box when there is room, inside it otherwise.
            shift = (y1 - y0) + 2 * line_width if top - (y1 - y0) - 2 * line_width >= 0 else 0
            background = (x0 - line_width, y0 - shift - line_width, x1 + line_width, y1 - shift + line_width)
            draw.rectangle(background, fill=color)
            draw.text((left, top - shift), ref, fill="white", font=font)
    return canvas
