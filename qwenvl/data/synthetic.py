"""Synthetic scenes for the demo: shapes and handwritten digits with exact ground truth, and the tasks built on them.

Every scene is a small PIL image with 1-4 non-overlapping objects. An object is a geometric shape (circle, square,
triangle, diamond, cross) or a real handwritten digit from scikit-learn's bundled `load_digits` (8x8, upscaled),
painted in one of five clearly distinct colours on a plain or lightly textured light background. Everything (object
count, kinds, colours, sizes, positions, background, questions) is a function of one integer scene seed, so a scene
can be rebuilt from its seed alone and the written files are byte-identical across runs.

Within a scene, no two objects share both colour and noun ("red circle", "blue digit 7"), so the expression
"the <color> <noun>" always names exactly one object. Boxes are tight pixel boxes `[x1, y1, x2, y2]` around the
painted pixels (`x2`/`y2` exclusive, so width = x2 - x1) in the image's own pixel grid.

Tasks (one chat sample each: user text after the image, assistant answer), prompts in the style of Qwen-VL:

- `caption`: "Describe the image in English:" -> "Two objects on a plain background: a red circle and a blue digit 7."
  (objects listed left to right).
- `vqa`: one short-answer question per scene, type drawn among those that are unambiguous for the scene:
  `color` ("What color is the circle? Answer:" -> "red"), `shape` ("What shape is the red object? Answer:" ->
  "circle"), `count` ("How many squares are there? Answer:" -> "0"; answers are digits), `digit` ("Which digit is
  written in blue? Answer:" -> "7") and `position` ("Is the red circle to the left or to the right of the blue digit
  7? Answer:" -> "left"; or "above"/"below").
- `rec` (referring-expression comprehension): the user text is the expression alone in ref tags, as in the original
  grounding evaluation, `<ref>the red circle</ref>`, and the answer repeats it with the box:
  `<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>` (coordinates by `qwenvl.grounding.format_box`).
  Train and evaluation use this same prompt. Optionally (`minimal_rec_share`, training split only) a share of the
  REC samples name their object by the shortest unique phrase instead, "the circle" or "the red object"
  (`minimal_expression`).
- `grounded_caption`: "Generate the caption in English with grounding:" -> the caption with every object phrase as
  `<ref>a red circle</ref><box>(..),(..)</box>`.

Splits come from disjoint scene-seed ranges. For a dataset seed `s` (0 <= s), scene `i` of a split has the seed
`s * 3_000_000 + offset + i` with offset 0 for train, 1_000_000 for val and 2_000_000 for test, so a split holds at
most 1,000,000 scenes and no scene seed is shared between splits or between dataset seeds. The split of a scene seed
is therefore `(seed // 1_000_000) % 3`, and it also picks the pool of handwritten digits: train scenes draw from
`load_digits` images 0-1399, val from 1400-1599 and test from 1600-1796 (each pool holds every digit class), so the
val/test handwriting is never seen in training.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..eval.metrics import box_iou
from ..grounding import format_box


SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (25, 150, 45),
    "blue": (30, 75, 220),
    "yellow": (235, 195, 0),
    "purple": (135, 45, 175),
}
TASKS: tuple[str, ...] = ("caption", "vqa", "rec", "grounded_caption")
VQA_TYPES: tuple[str, ...] = ("color", "shape", "count", "digit", "position")
DRILL_TASKS: dict[str, str] = {f"{qtype}_drill": qtype for qtype in VQA_TYPES}
"""Training-only tasks (`generate_dataset(drill=...)`), each with its VQA type: conversations asking questions of that
type only."""
SPLITS: tuple[str, ...] = ("train", "val", "test")

CAPTION_PROMPT = "Describe the image in English:"
GROUNDED_CAPTION_PROMPT = "Generate the caption in English with grounding:"
REC_PROMPT = "<ref>{expression}</ref>"
VQA_PROMPT = "{question} Answer:"

SCENES_PER_SPLIT = 1_000_000
"""Size of each split's scene-seed range; see the module docstring."""
DIGIT_POOLS: dict[str, tuple[int, int]] = {"train": (0, 1400), "val": (1400, 1600), "test": (1600, 1797)}
"""Half-open index ranges into `sklearn.datasets.load_digits()` used by each split."""

MIN_IMAGE_SIZE = 32
_MAX_OBJECTS = 4
_NUMBER_WORDS = ("zero", "one", "two", "three", "four")
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, so edges are anti-aliased
_INK_THRESHOLD = 0.25  # a pixel belongs to an object's box when at least this much of it is painted


@dataclass(frozen=True)
class SceneObject:
    """One painted object: a shape, or a handwritten `digit` (then `kind == "digit"`), with its tight pixel box.

    `digit_index` is the digit's row in `sklearn.datasets.load_digits()`, for provenance.
    """

    kind: str
    color: str
    box: tuple[int, int, int, int]
    digit: int | None = None
    digit_index: int | None = None

    @property
    def noun(self) -> str:
        return f"digit {self.digit}" if self.kind == "digit" else self.kind

    @property
    def expression(self) -> str:
        """Referring expression, unique within its scene."""
        return f"the {self.color} {self.noun}"

    @property
    def description(self) -> str:
        """Indefinite description used in captions."""
        return f"{_article(self.color)} {self.color} {self.noun}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "color": self.color,
            "digit": self.digit,
            "digit_index": self.digit_index,
            "box": list(self.box),
        }


@dataclass
class Scene:
    """A rendered scene and its ground truth; `image_size` is `(width, height)` as PIL's `.size`."""

    seed: int
    split: str
    image: Image.Image
    objects: list[SceneObject]
    background: str

    @property
    def image_size(self) -> tuple[int, int]:
        return self.image.size

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "split": self.split,
            "image_size": list(self.image_size),
            "background": self.background,
            "objects": [obj.to_dict() for obj in self.objects],
        }


@dataclass
class Sample:
    """One chat sample about one scene. `prompt` is the user text that follows the image, `answer` the assistant's
    reply; `follow_ups` are further (question, answer) turns about the same image (multi-question VQA and REC
    conversations for training, `make_samples(vqa_questions=..., rec_questions=...)`).

    Structured ground truth for scoring the first turn: `short_answer` for VQA, `box` (pixels) for REC, `boxes` (one
    per object, caption order) for grounded captions.
    """

    id: str
    task: str
    prompt: str
    answer: str
    qtype: str | None = None
    short_answer: str | None = None
    box: tuple[int, int, int, int] | None = None
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    follow_ups: list[tuple[str, str]] = field(default_factory=list)

    def to_official(self, image_path: str) -> dict[str, Any]:
        """The sample in the original Qwen-VL fine-tuning format, the image referenced by `image_path`."""
        conversations = [
            {"from": "user", "value": f"Picture 1: <img>{image_path}</img>\n{self.prompt}"},
            {"from": "assistant", "value": self.answer},
        ]
        for prompt, answer in self.follow_ups:
            conversations += [{"from": "user", "value": prompt}, {"from": "assistant", "value": answer}]
        return {"id": self.id, "conversations": conversations}


@dataclass
class PreferencePair:
    """A reward-model pair: `chosen` is correct for the scene, `rejected` is a plausible wrong answer."""

    id: str
    task: str
    prompt: str
    chosen: str
    rejected: str


# ---------------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------------


def split_of_seed(seed: int) -> str:
    """The split a scene seed belongs to (see the module docstring for the seed ranges)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"scene seed must be a non-negative integer, got {seed!r}")
    return SPLITS[(int(seed) // SCENES_PER_SPLIT) % len(SPLITS)]


def scene_seed(split: str, index: int, dataset_seed: int = 0) -> int:
    """Seed of scene `index` of `split` in the dataset built with `dataset_seed`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < SCENES_PER_SPLIT:
        raise ValueError(f"scene index must be in [0, {SCENES_PER_SPLIT}), got {index}")
    if dataset_seed < 0:
        raise ValueError(f"dataset seed must be non-negative, got {dataset_seed}")
    return dataset_seed * len(SPLITS) * SCENES_PER_SPLIT + SPLITS.index(split) * SCENES_PER_SPLIT + index


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """`load_digits` images scaled to [0, 1] and their labels (bundled with scikit-learn: no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - scikit-learn is a demo/test dependency
        raise ImportError("synthetic scenes need scikit-learn for its bundled handwritten digits") from error
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _shape_mask(kind: str, size: int) -> np.ndarray:
    """Coverage in [0, 1] of a shape filling a `size` x `size` cell (anti-aliased by supersampling)."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    lo, hi = 0, big - 1
    mid = big / 2
    if kind == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=255)
    elif kind == "square":
        inset = round(big * 0.08)
        draw.rectangle((lo + inset, lo + inset, hi - inset, hi - inset), fill=255)
    elif kind == "triangle":
        draw.polygon([(mid, lo), (hi, hi), (lo, hi)], fill=255)
    elif kind == "diamond":
        draw.polygon([(mid, lo), (hi, mid), (mid, hi), (lo, mid)], fill=255)
    elif kind == "cross":
        bar = big / 3
        draw.rectangle((lo, bar, hi, 2 * bar), fill=255)
        draw.rectangle((bar, lo, 2 * bar, hi), fill=255)
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _digit_mask(digit_image: np.ndarray, size: int) -> np.ndarray:
    """Coverage of an 8x8 handwritten digit upscaled to `size` x `size`, with the strokes' contrast boosted."""
    small = Image.fromarray((digit_image * 255).astype(np.uint8), mode="L")
    big = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return np.clip((big - 0.15) * 1.6, 0.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    base = rng.integers(215, 246, size=3).astype(np.float32)
    pixels = np.broadcast_to(base, (size, size, 3)).copy()
    if rng.random() < 0.5:
        return pixels, "plain"
    # Light texture: low-amplitude noise plus a gentle gradient, far below the objects' contrast.
    noise = rng.normal(0.0, 5.0, size=(size, size, 1))
    ramp = np.linspace(-8.0, 8.0, size, dtype=np.float32)
    gradient = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    return pixels + noise + gradient, "textured"


def _size_range(image_size: int, n_objects: int) -> tuple[int, int]:
    """Cell side range in pixels: large enough to stay legible when the image is downscaled to 56 px."""
    largest = {1: 0.5, 2: 0.42, 3: 0.36, 4: 0.32}[n_objects]
    return max(8, round(0.2 * image_size)), max(9, round(largest * image_size))


def _place(rng: np.random.Generator, image_size: int, kinds: list[str]) -> list[tuple[int, int, int]]:
    """Random non-overlapping square cells `(x, y, side)`, separated by a gap; shrinks cells if placement stalls.

    Digits get larger cells than shapes: their strokes fill only part of the 8x8 grid.
    """
    low, high = _size_range(image_size, len(kinds))
    gap = max(2, round(0.03 * image_size))
    cells: list[tuple[int, int, int]] = []
    attempts = 0
    while len(cells) < len(kinds):
        floor = max(low, min(high, round(0.28 * image_size))) if kinds[len(cells)] == "digit" else low
        side = int(rng.integers(floor, high + 1))
        x = int(rng.integers(1, image_size - side))
        y = int(rng.integers(1, image_size - side))
        clear = all(
            x + side + gap <= cx or cx + cs + gap <= x or y + side + gap <= cy or cy + cs + gap <= y
            for cx, cy, cs in cells
        )
        if clear:
            cells.append((x, y, side))
            continue
        attempts += 1
        if attempts % 50 == 0:
            high = max(low, int(high * 0.9))  # digits then fall back to the shapes' minimum
            if attempts >= 500:  # start over; any 4 cells of the minimum side fit comfortably
                cells, attempts = [], 0
    return cells


def make_scene(seed: int, image_size: int = 112, n_objects: int | None = None) -> Scene:
    """Render the scene of `seed` at `image_size` x `image_size` pixels.

    The split (and so the pool of handwritten digits) follows from the seed, see `split_of_seed`. `n_objects`
    (1-4) overrides the random object count; the rest of the scene still depends only on the seed.
    """
    split = split_of_seed(seed)
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be an integer >= {MIN_IMAGE_SIZE} so objects stay legible, got {image_size!r}"
        )
    rng = np.random.default_rng([int(seed), 0])
    count = int(rng.integers(1, _MAX_OBJECTS + 1))
    if n_objects is not None:
        if not 1 <= n_objects <= _MAX_OBJECTS:
            raise ValueError(f"n_objects must be between 1 and {_MAX_OBJECTS}, got {n_objects}")
        count = n_objects

    digit_images, digit_labels = _digits()
    pool_start, pool_stop = DIGIT_POOLS[split]
    color_names = list(COLORS)
    identities: list[tuple[str, str, int | None, int | None]] = []  # kind, color, digit, digit image index
    while len(identities) < count:
        color = color_names[int(rng.integers(len(color_names)))]
        if rng.random() < 0.4:
            index = int(rng.integers(pool_start, pool_stop))
            kind, digit = "digit", int(digit_labels[index])
        else:
            index, kind, digit = None, SHAPES[int(rng.integers(len(SHAPES)))], None
        if any((k, c, d) == (kind, color, digit) for k, c, d, _ in identities):
            continue  # keep "the <color> <noun>" unique
        identities.append((kind, color, digit, index))

    pixels, background = _background(rng, image_size)
    cells = _place(rng, image_size, [kind for kind, *_ in identities])
    objects = []
    for (kind, color, digit, index), (x, y, side) in zip(identities, cells):
        mask = _digit_mask(digit_images[index], side) if kind == "digit" else _shape_mask(kind, side)
        region = pixels[y : y + side, x : x + side]
        alpha = mask[..., None]
        region[...] = region * (1.0 - alpha) + np.asarray(COLORS[color], dtype=np.float32) * alpha
        rows = np.flatnonzero((mask >= _INK_THRESHOLD).any(axis=1))
        cols = np.flatnonzero((mask >= _INK_THRESHOLD).any(axis=0))
        box = (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1)
        objects.append(SceneObject(kind=kind, color=color, box=box, digit=digit, digit_index=index))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    return Scene(seed=int(seed), split=split, image=image, objects=objects, background=background)


# ---------------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------------


def _left_to_right(objects: list[SceneObject]) -> list[SceneObject]:
    return sorted(objects, key=lambda o: ((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2))


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, grounded: bool = False) -> str:
    """Templated caption: object count, background, then the objects left to right (with boxes if `grounded`)."""
    ordered = _left_to_right(scene.objects)
    n = len(ordered)
    head = f"{_NUMBER_WORDS[n].capitalize()} object{'s' if n > 1 else ''} on a {scene.background} background: "
    if grounded:
        parts = [f"<ref>{o.description}</ref>{format_box(o.box, scene.image_size)}" for o in ordered]
    else:
        parts = [o.description for o in ordered]
    return head + _join(parts) + "."


def _unique(values: list[Any], value: Any) -> bool:
    return values.count(value) == 1


def _vqa_candidates(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every unambiguous (question, answer) pair of each VQA type for the scene (zero counts under "count_zero")."""
    objs = scene.objects
    nouns = [o.noun for o in objs]
    colors = [o.color for o in objs]
    digit_colors = [o.color for o in objs if o.kind == "digit"]
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in (*VQA_TYPES, "count_zero")}
    for o in objs:
        if _unique(nouns, o.noun):
            out["color"].append((f"What color is the {o.noun}?", o.color))
        if o.kind != "digit" and _unique(colors, o.color):
            out["shape"].append((f"What shape is the {o.color} object?", o.kind))
        if o.kind == "digit" and _unique(digit_colors, o.color):
            out["digit"].append((f"Which digit is written in {o.color}?", str(o.digit)))
    counted = [("objects", len(objs)), ("digits", sum(o.kind == "digit" for o in objs))]
    counted += [(SHAPE_PLURALS[shape], sum(o.kind == shape for o in objs)) for shape in SHAPES]
    counted += [(f"{color} objects", colors.count(color)) for color in COLORS]
    for what, n in counted:
        # Absent categories (answer "0") go to their own list so that they do not swamp the count questions.
        out["count" if n else "count_zero"].append((f"How many {what} are there?", str(n)))
    for a in objs:
        for b in objs:
            if a is b:
                continue
            if a.box[2] <= b.box[0] or b.box[2] <= a.box[0]:
                side = "left" if a.box[2] <= b.box[0] else "right"
                out["position"].append((f"Is {a.expression} to the left or to the right of {b.expression}?", side))
            if a.box[3] <= b.box[1] or b.box[3] <= a.box[1]:
                side = "above" if a.box[3] <= b.box[1] else "below"
                out["position"].append((f"Is {a.expression} above or below {b.expression}?", side))
    return {t: pairs for t, pairs in out.items() if pairs}


def minimal_expression(scene: Scene, target: SceneObject) -> str:
    """The shortest phrase that names `target` alone in `scene`: "the <noun>" when no other object shares its noun,
    else "the <color> object" when none shares its colour, else the full "the <color> <noun>".

    Trained only on full expressions, a model can place a box from the colour word alone wherever the colour is
    unique, and never learns to find an object by its noun; these phrases make each word carry the lookup alone.
    """
    if _unique([o.noun for o in scene.objects], target.noun):
        return f"the {target.noun}"
    if _unique([o.color for o in scene.objects], target.color):
        return f"the {target.color} object"
    return target.expression


def _pick(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _draw_vqa(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(qtype, question, answer): a type uniformly among the applicable ones, then a question of that type.

    Count questions are 30% "How many objects are there?", 20% about a category absent from the scene (answer
    "0") and 50% about a present category, which keeps the answers from collapsing onto "1".
    """
    candidates = _vqa_candidates(scene)
    applicable = [t for t in VQA_TYPES if t in candidates]
    qtype = _pick(rng, applicable)
    pool = candidates[qtype]
    if qtype == "count":
        draw = rng.random()
        if draw < 0.3:
            pool = pool[:1]  # the total, listed first
        elif draw < 0.5:
            pool = candidates["count_zero"]  # never empty: 4 objects cannot cover 5 shapes and 5 colours
        else:
            pool = pool[1:] or pool
    question, answer = _pick(rng, pool)
    return qtype, question, answer



def _follow_up_questions(scene: Scene, first_question: str, n: int) -> list[tuple[str, str]]:
    """Up to `n` more (prompt, answer) VQA turns, drawn as `_draw_vqa` draws, none repeating an earlier question (a
    scene with few objects may have fewer distinct questions)."""
    rng = np.random.default_rng([scene.seed, 2])  # a stream of its own: the first turn stays what it was
    asked, turns = {first_question}, []
    for _ in range(8 * n):  # enough draws to find n distinct questions whenever a scene has them
        if len(turns) == n:
            break
        _, question, answer = _draw_vqa(scene, rng)
        if question not in asked:
            asked.add(question)
            turns.append((VQA_PROMPT.format(question=question), answer))
    return turns


def _follow_up_referrals(scene: Scene, first_target: SceneObject, n: int) -> list[tuple[str, str]]:
    """Up to `n` more REC turns, one per other object of the scene, in an order drawn from a stream of their own."""
    if n <= 0:
        return []
    others = [o for o in scene.objects if o is not first_target]
    order = np.random.default_rng([scene.seed, 4]).permutation(len(others))
    turns = []
    for index in order[:n]:
        ref = REC_PROMPT.format(expression=others[index].expression)
        turns.append((ref, ref + format_box(others[index].box, scene.image_size)))
    return turns


def _check_count(n: int, name: str) -> None:
    """A count argument: `vqa_questions` and `rec_questions` (turns per training conversation), `workers`."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")


def _check_minimal_rec_share(share: float) -> None:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ValueError(f"minimal_rec_share must be a number in [0, 1], got {share!r}")


def check_tasks(tasks: Sequence[str], where: str = "tasks", allowed: Sequence[str] = TASKS) -> None:
    """Raise a ValueError naming `where` (e.g. a recipe field) when `tasks` holds a name outside `allowed`."""
    unknown = [t for t in tasks if t not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown task(s) {unknown}; expected a subset of {tuple(allowed)}")


def _check_drill(drill: Sequence[str]) -> tuple[str, ...]:
    if isinstance(drill, str) or not all(isinstance(qtype, str) for qtype in drill):
        raise ValueError(f"drill must be a sequence of VQA types from {VQA_TYPES}, got {drill!r}")
    unknown = [qtype for qtype in drill if qtype not in VQA_TYPES]
    if unknown or len(set(drill)) != len(drill):
        raise ValueError(f"drill: {list(drill)} must name distinct VQA types from {VQA_TYPES}")
    return tuple(drill)


def drill_sample(scene: Scene, qtype: str, questions: int, id_prefix: str | None = None) -> Sample | None:
    """A conversation of up to `questions` distinct `qtype` questions about `scene` (task `f"{qtype}_drill"`), or None
    where the scene has no such question (a one-object scene has no position question). A count conversation of
    several turns asks about one absent category (answer "0") among them, at a random turn.

    Mixed among the other types a kind of question can stay unlearnt: position questions are ~19 % of the demo's
    training VQA turns, and every stage-2 model answered them at chance until a phase on them alone (docs/findings.md,
    "Phases on VQA rows and on position questions"); these rows are that phase's data.
    """
    candidates = _vqa_candidates(scene)
    pool = list(candidates.get(qtype, []))
    if not pool:
        return None
    rng = np.random.default_rng([scene.seed, 5, VQA_TYPES.index(qtype)])
    chosen = [pool[i] for i in rng.permutation(len(pool))[:questions]]
    if qtype == "count" and questions > 1:
        # Drilled on present categories only, run 40's model still answered "1" for 18 of 29 absent ones.
        absent = candidates["count_zero"]
        chosen = chosen[: questions - 1]
        chosen.insert(int(rng.integers(len(chosen) + 1)), absent[int(rng.integers(len(absent)))])
    turns = [(VQA_PROMPT.format(question=question), answer) for question, answer in chosen]
    (prompt, answer), follow_ups = turns[0], turns[1:]
    prefix = id_prefix if id_prefix is not None else f"scene{scene.seed}"
    return Sample(f"{prefix}_{qtype}_drill", f"{qtype}_drill", prompt, answer, qtype=qtype, short_answer=answer,
                  follow_ups=follow_ups)


def make_samples(scene: Scene, tasks: tuple[str, ...] = TASKS, id_prefix: str | None = None,
                 vqa_questions: int = 1, minimal_rec_share: float = 0.0, rec_questions: int = 1) -> list[Sample]:
    """One sample per task for `scene` (VQA question type and REC target drawn from the scene seed).

    `vqa_questions` > 1 makes the VQA sample a conversation of that many distinct questions about the image: the
    first is the one a single-question sample asks, the rest follow as further turns. A VQA answer is a token or two
    after the ~70 tokens of image and template, so each extra question adds supervision at a fraction of a row's
    cost (the demo's training split; evaluation asks one question per image).

    `rec_questions` > 1 does the same for REC: after the first target, up to `rec_questions - 1` other objects of
    the scene (in an order drawn from its seed; a scene of k objects has k - 1 others), each named by its full
    expression. A box answer is ~15 tokens after the same ~90 of image and template.

    `minimal_rec_share`: the probability (drawn per scene from its seed) that the REC sample names its target by
    `minimal_expression` instead of the full expression; the target and box stay the same. 0 (the default) and
    evaluation splits keep the full expression the protocol scores.
    """
    check_tasks(tasks)
    _check_count(vqa_questions, "vqa_questions")
    _check_count(rec_questions, "rec_questions")
    _check_minimal_rec_share(minimal_rec_share)
    rng = np.random.default_rng([scene.seed, 1])
    # Draw both choices up front so that the subset of tasks does not change either of them.
    qtype, question, short = _draw_vqa(scene, rng)
    target = _pick(rng, scene.objects)
    # A stream of its own, so that the share changes no other draw (and a share of 0 draws nothing).
    minimal = minimal_rec_share > 0 and np.random.default_rng([scene.seed, 3]).random() < minimal_rec_share
    expression = minimal_expression(scene, target) if minimal else target.expression
    prefix = id_prefix if id_prefix is not None else f"scene{scene.seed}"
    samples = []
    for task in tasks:
        sid = f"{prefix}_{task}"
        if task == "caption":
            samples.append(Sample(sid, task, CAPTION_PROMPT, caption(scene)))
        elif task == "grounded_caption":
            boxes = [o.box for o in _left_to_right(scene.objects)]
            samples.append(Sample(sid, task, GROUNDED_CAPTION_PROMPT, caption(scene, grounded=True), boxes=boxes))
        elif task == "vqa":
            prompt = VQA_PROMPT.format(question=question)
            follow_ups = _follow_up_questions(scene, question, vqa_questions - 1)
            samples.append(Sample(sid, task, prompt, short, qtype=qtype, short_answer=short, follow_ups=follow_ups))
        else:
            ref = REC_PROMPT.format(expression=expression)
            answer = ref + format_box(target.box, scene.image_size)
            follow_ups = _follow_up_referrals(scene, target, rec_questions - 1)
            samples.append(Sample(sid, task, ref, answer, box=target.box, follow_ups=follow_ups))
    return samples


# ---------------------------------------------------------------------------------------------------------------------
# Dense patch targets (the demo's vision-encoder pre-training)
# ---------------------------------------------------------------------------------------------------------------------

PATCH_CLASSES: tuple[str, ...] = tuple(
    f"{color} {noun}" for color in COLORS for noun in (*SHAPES, *(f"digit {d}" for d in range(10)))
)
"""Object classes of `patch_targets`; the background is class `len(PATCH_CLASSES)`."""


def patch_targets(scene: Mapping[str, Any], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense targets for a `grid` x `grid` patch grid over a scene (a `Scene.to_dict()` / `<split>_scenes.jsonl` row).

    Returns `classes` (grid², int64): the `PATCH_CLASSES` index of the object whose box holds the patch centre, else
    the background index; and `boxes` (grid², 4, float32): for object patches, that object's box (x1, y1, x2, y2) as
    fractions of the image side (0 for background patches). They stand in for the supervision a real vision encoder
    gets in its own pre-training: what is where, to the pixel. The box is absolute, not relative to the patch, so an
    image token holds the coordinates the LLM writes in `<box>` (relative edges: REC 0.12 vs 0.22; docs/findings.md).
    """
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    width, height = scene["image_size"]
    classes = np.full(grid * grid, len(PATCH_CLASSES), dtype=np.int64)
    boxes = np.zeros((grid * grid, 4), dtype=np.float32)
    centres = (np.arange(grid, dtype=np.float32) + 0.5) / grid
    for obj in scene["objects"]:
        x1, y1, x2, y2 = obj["box"]
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
        noun = f"digit {obj['digit']}" if obj["kind"] == "digit" else obj["kind"]
        label = PATCH_CLASSES.index(f"{obj['color']} {noun}")
        for gy in np.flatnonzero((centres >= y1) & (centres < y2)):
            for gx in np.flatnonzero((centres >= x1) & (centres < x2)):
                classes[gy * grid + gx] = label
                boxes[gy * grid + gx] = (x1, y1, x2, y2)
    return classes, boxes


# ---------------------------------------------------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------------------------------------------------


_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _wrong_answer(scene: Scene, qtype: str, answer: str, rng: np.random.Generator) -> str:
    """A plausible wrong short answer, preferring values that occur in the scene (other colours, shapes ...)."""
    if qtype == "position":
        return _OPPOSITE[answer]
    if qtype == "count":
        n = int(answer)
        return str(n + 1) if n == 0 or rng.random() < 0.5 else str(n - 1)
    if qtype == "color":
        present = sorted({o.color for o in scene.objects} - {answer})
        return _pick(rng, present or [c for c in COLORS if c != answer])
    if qtype == "shape":
        present = sorted({o.kind for o in scene.objects if o.kind != "digit"} - {answer})
        return _pick(rng, present or [s for s in SHAPES if s != answer])
    if qtype == "digit":
        return str((int(answer) + int(rng.integers(1, 10))) % 10)
    raise ValueError(f"unknown VQA type {qtype!r}")


def _bad_box(scene: Scene, target: SceneObject, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box with IoU < 0.5 to the target's: another object's box, the box shifted by 60%, or a quarter of it."""
    size = scene.image_size[0]
    x1, y1, x2, y2 = target.box
    w, h = x2 - x1, y2 - y1
    options: list[tuple[int, int, int, int]] = [o.box for o in scene.objects if o is not target]
    for dx, dy in (
        (math.ceil(0.6 * w), 0),
        (-math.ceil(0.6 * w), 0),
        (0, math.ceil(0.6 * h)),
        (0, -math.ceil(0.6 * h)),
    ):
        moved = (x1 + dx, y1 + dy, x2 + dx, y2 + dy)
        if min(moved) >= 0 and max(moved) <= size:
            options.append(moved)
    corner_x, corner_y = (x1, x1 + w // 2)[int(rng.integers(2))], (y1, y1 + h // 2)[int(rng.integers(2))]
    options.append((corner_x, corner_y, corner_x + max(1, w // 2), corner_y + max(1, h // 2)))
    return _pick(rng, options)


def make_preference_pairs(scene: Scene, id_prefix: str | None = None) -> list[PreferencePair]:
    """Two reward-model pairs: a VQA answer (correct vs plausible wrong) and a REC box (true vs IoU < 0.5)."""
    rng = np.random.default_rng([scene.seed, 2])
    prefix = id_prefix if id_prefix is not None else f"scene{scene.seed}"
    qtype, question, answer = _draw_vqa(scene, rng)
    pairs = [
        PreferencePair(
            f"{prefix}_vqa_{qtype}",
            "vqa",
            VQA_PROMPT.format(question=question),
            answer,
            _wrong_answer(scene, qtype, answer, rng),
        )
    ]
    target = _pick(rng, scene.objects)
    bad = _bad_box(scene, target, rng)
    ref = REC_PROMPT.format(expression=target.expression)
    if box_iou(bad, target.box) >= 0.5:  # guaranteed by construction; kept as an invariant check
        raise RuntimeError(f"scene {scene.seed}: rejected box {bad} overlaps the true box {target.box}")
    pairs.append(
        PreferencePair(
            f"{prefix}_rec",
            "rec",
            ref,
            ref + format_box(target.box, scene.image_size),
            ref + format_box(bad, scene.image_size),
        )
    )
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _write_scene(
    index: int, out: Path, split: str, seed: int, image_size: int, vqa_questions: int, rec_questions: int,
    minimal_rec_share: float, drill: tuple[str, ...] = (),
) -> tuple[list[dict], list[dict], list[dict], list[dict], dict]:
    """Draw scene `index` of `split`, save its PNG, and return its rows: (official, samples, preference, ppo, scene)."""
    scene = make_scene(scene_seed(split, index, seed), image_size)
    name = f"{split}_{index:06d}"
    image_path = f"images/{name}.png"
    scene.image.save(out / image_path, format="PNG", optimize=False)
    size = list(scene.image_size)
    official, samples_rows, ppo_rows = [], [], []
    samples = make_samples(scene, id_prefix=name, vqa_questions=vqa_questions, minimal_rec_share=minimal_rec_share,
                           rec_questions=rec_questions)
    drills = (drill_sample(scene, qtype, vqa_questions, id_prefix=name) for qtype in drill)
    for sample in [*samples, *(sample for sample in drills if sample is not None)]:
        official.append(sample.to_official(image_path))
        samples_rows.append(
            {
                "id": sample.id,
                "task": sample.task,
                "qtype": sample.qtype,
                "image": image_path,
                "image_size": size,
                "prompt": sample.prompt,
                "answer": sample.answer,
                "short_answer": sample.short_answer,
                "box": list(sample.box) if sample.box else None,
                "boxes": [list(b) for b in sample.boxes] or None,
                "follow_ups": [list(turn) for turn in sample.follow_ups] or None,
            }
        )
        if sample.task in ("vqa", "rec"):
            ppo_rows.append(
                {
                    "id": sample.id,
                    "task": sample.task,
                    "image": image_path,
                    "image_size": size,
                    "prompt": sample.prompt,
                    "reference": sample.answer,
                    "answer": sample.short_answer,
                    "box": list(sample.box) if sample.box else None,
                }
            )
    preference_rows = [
        {"id": pair.id, "task": pair.task, "image": image_path, "prompt": pair.prompt, "chosen": pair.chosen,
         "rejected": pair.rejected}
        for pair in make_preference_pairs(scene, id_prefix=name)
    ]
    return official, samples_rows, preference_rows, ppo_rows, {"image": image_path, **scene.to_dict()}


@contextlib.contextmanager
def _scene_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Worker processes for `generate_dataset` (None: draw in this process). Forked where the platform can, since a
    spawned worker would first import torch and transformers (seconds) to draw scenes of ~3 ms each."""
    if workers == 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield pool


def generate_dataset(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int = 112,
    seed: int = 0,
    vqa_questions: int = 1,
    minimal_rec_share: float = 0.0,
    rec_questions: int = 1,
    workers: int = 1,
    drill: Sequence[str] = (),
) -> dict[str, Path]:
    """Write the synthetic dataset under `out_dir`; `n_*` count scenes (images), each giving one sample per task.

    `vqa_questions`, `rec_questions` and `minimal_rec_share` shape the training split only (`make_samples`);
    validation and test samples always ask one question and name REC targets by the full expression, the protocol
    their evaluation scores. `drill` (VQA types, e.g. `("position",)`) adds to each training scene that has such
    questions a conversation of up to `vqa_questions` of them (`drill_sample`, task `"<type>_drill"`), after its
    other samples; the other rows do not change.

    Files (image paths inside them are relative to `out_dir`):

    - `images/<split>_<index>.png`
    - `<split>.json`: the original Qwen-VL fine-tuning format (list of `{"id", "conversations"}`, the image as
      `Picture 1: <img>images/...png</img>\\n` in the user value), usable as is by the original `finetune.py`.
    - `<split>_samples.jsonl`: every sample with its structured ground truth, for evaluation: `id`, `task`, `qtype`,
      `image`, `image_size` ([w, h]), `prompt`, `answer` (full assistant text), `short_answer` (VQA), `box` (REC,
      pixels), `boxes` (grounded captions, pixels), `follow_ups` (later `[prompt, answer]` turns, or null).
    - `<split>_preference.jsonl`: `id`, `task`, `image`, `prompt`, `chosen`, `rejected` (two pairs per scene).
    - `<split>_ppo.jsonl`: the VQA and REC prompts with what a programmatic reward needs: `id`, `task`, `image`,
      `image_size`, `prompt`, `reference` (full expected reply), `answer` (VQA short answer, else null) and `box` (REC
      pixel box, else null), the column convention of `qwenvl.rl.rewards`.
    - `<split>_scenes.jsonl`: each scene's ground truth (objects, boxes, background, seed).
    - `dataset_info.json`: sizes, seed ranges, digit pools, prompts.

    `workers` processes draw the scenes (the demo's 10,150 take ~28 s in one); the files do not depend on it. Same
    arguments give byte-identical files. Returns the paths keyed `"<split>"`, `"<split>_samples"`,
    `"<split>_preference"`, `"<split>_ppo"`, `"<split>_scenes"`, `"images"` and `"info"`.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= SCENES_PER_SPLIT:
            raise ValueError(f"n_{split} must be an integer in [0, {SCENES_PER_SPLIT}], got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    _check_count(vqa_questions, "vqa_questions")
    _check_count(rec_questions, "rec_questions")
    _check_minimal_rec_share(minimal_rec_share)
    _check_count(workers, "workers")
    drill = _check_drill(drill)

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"images": out / "images", "info": out / "dataset_info.json"}
    info_splits = {}
    with _scene_pool(workers) as pool:
        for split, n in counts.items():
            train = split == "train"
            write = partial(
                _write_scene, out=out, split=split, seed=seed, image_size=image_size,
                vqa_questions=vqa_questions if train else 1, rec_questions=rec_questions if train else 1,
                minimal_rec_share=minimal_rec_share if train else 0.0, drill=drill if train else (),
            )
            # Scenes are independent (each from its own seed), so workers return the same rows in the same order.
            records = pool.map(write, range(n), chunksize=max(1, n // (8 * workers))) if pool else map(write, range(n))
            official, samples_rows, preference_rows, ppo_rows, scene_rows = [], [], [], [], []
            for scene_official, scene_samples, scene_preferences, scene_ppo, scene_row in records:
                official += scene_official
                samples_rows += scene_samples
                preference_rows += scene_preferences
                ppo_rows += scene_ppo
                scene_rows.append(scene_row)
            paths[split] = out / f"{split}.json"
            _write_json(paths[split], official)
            for kind, rows in (
                ("samples", samples_rows),
                ("preference", preference_rows),
                ("ppo", ppo_rows),
                ("scenes", scene_rows),
            ):
                paths[f"{split}_{kind}"] = out / f"{split}_{kind}.jsonl"
                _write_jsonl(paths[f"{split}_{kind}"], rows)
            first = scene_seed(split, 0, seed)
            info_splits[split] = {
                "n_scenes": n,
                "n_samples": len(official),
                "scene_seeds": [first, first + n],
                "digit_pool": list(DIGIT_POOLS[split]),
            }
    _write_json(
        paths["info"],
        {
            "generator": "qwenvl.data.synthetic",
            "seed": seed,
            "image_size": image_size,
            "vqa_questions": {"train": vqa_questions, "val": 1, "test": 1},
            "rec_questions": {"train": rec_questions, "val": 1, "test": 1},
            "minimal_rec_share": {"train": minimal_rec_share, "val": 0.0, "test": 0.0},
            **({"drill": {"train": list(drill), "val": [], "test": []}} if drill else {}),
            "splits": info_splits,
            "tasks": list(TASKS),
            "vqa_types": list(VQA_TYPES),
            "prompts": {
                "caption": CAPTION_PROMPT,
                "grounded_caption": GROUNDED_CAPTION_PROMPT,
                "rec": REC_PROMPT,
                "vqa": VQA_PROMPT,
            },
            "ranges": "scene_seeds and digit_pool are half-open [start, stop)",
            "box_format": "<box>(x1,y1),(x2,y2)</box>, integers in [0, 1000) by qwenvl.grounding.format_box; "
            "pixel boxes are [x1, y1, x2, y2] with exclusive x2/y2",
        },
    )
    return paths


__all__ = [
    "COLORS",
    "SHAPES",
    "TASKS",
    "VQA_TYPES",
    "DRILL_TASKS",
    "SPLITS",
    "DIGIT_POOLS",
    "SCENES_PER_SPLIT",
    "CAPTION_PROMPT",
    "GROUNDED_CAPTION_PROMPT",
    "REC_PROMPT",
    "VQA_PROMPT",
    "SceneObject",
    "Scene",
    "Sample",
    "PreferencePair",
    "split_of_seed",
    "scene_seed",
    "make_scene",
    "caption",
    "check_tasks",
    "minimal_expression",
    "make_samples",
    "drill_sample",
    "make_preference_pairs",
    "PATCH_CLASSES",
    "patch_targets",
    "generate_dataset",
]
