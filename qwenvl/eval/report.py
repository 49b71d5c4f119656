"""Scoring a model's answers on the synthetic tasks, and writing the results as a JSON report."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.rows import load_jsonl
from ..grounding import parse_boxes
from .metrics import box_iou, cider_d, rec_accuracy, strip_grounding, vqa_accuracy


_REQUIRED = {
    "caption": ("answer",),
    "grounded_caption": ("answer", "boxes", "image_size"),
    "vqa": ("short_answer",),
    "rec": ("box", "image_size"),
}


def _match_boxes(predicted: list[tuple[float, ...]], gold: list[Sequence[float]], threshold: float) -> int:
    """Greedy one-to-one matching by decreasing IoU; the number of gold boxes matched at IoU >= threshold."""
    pairs = sorted(
        ((box_iou(p, g), i, j) for i, p in enumerate(predicted) for j, g in enumerate(gold)),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    used_pred: set[int] = set()
    used_gold: set[int] = set()
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i not in used_pred and j not in used_gold:
            used_pred.add(i)
            used_gold.add(j)
    return len(used_gold)


def evaluate_predictions(
    rows: Sequence[Mapping[str, Any]], predictions: Mapping[str, str] | Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Score answers to the rows of a `<split>_samples.jsonl` file (see `qwenvl.data.synthetic.generate_dataset`).

    `predictions` maps each row's `id` to the model's answer (or is a list aligned with `rows`). Every row must have
    an answer: a missing one raises, since silently skipping samples inflates scores. Per task:

    - `caption`: CIDEr-D against the reference caption (`cider_d`, IDF from this set's references);
    - `grounded_caption`: CIDEr-D of the text with boxes stripped, plus `box_recall` / `box_precision`: predicted
      boxes matched one-to-one to the true object boxes at IoU >= 0.5, over all true / all predicted boxes;
    - `vqa`: VQA accuracy (`vqa_accuracy`) overall and per question type (`by_type`);
    - `rec`: Acc@0.5 with the original protocol (`rec_accuracy`).
    Tasks without rows are left out.
    """
    if isinstance(predictions, Mapping):
        missing = [row.get("id") for row in rows if row.get("id") not in predictions]
        if missing:
            raise ValueError(f"no prediction for {len(missing)} sample(s), e.g. {missing[:5]}")
        answers = [predictions[row["id"]] for row in rows]
    else:
        if len(predictions) != len(rows):
            raise ValueError(f"got {len(predictions)} predictions for {len(rows)} rows")
        answers = list(predictions)

    by_task: dict[str, list[tuple[Mapping[str, Any], str]]] = {}
    for index, (row, answer) in enumerate(zip(rows, answers)):
        task = row.get("task")
        if task not in _REQUIRED:
            raise ValueError(
                f"row {index} (id {row.get('id')!r}): unknown task {task!r}; expected one of {list(_REQUIRED)}"
            )
        absent = [key for key in _REQUIRED[task] if row.get(key) is None]
        if absent:
            raise ValueError(f"row {index} (id {row.get('id')!r}): task {task!r} needs field(s) {absent}")
        if not isinstance(answer, str):
            raise ValueError(f"prediction for row {index} (id {row.get('id')!r}) is not a string: {answer!r}")
        by_task.setdefault(task, []).append((row, answer))

    results: dict[str, dict[str, Any]] = {}
    if "caption" in by_task:
        items = by_task["caption"]
        cider = cider_d([a for _, a in items], [[r["answer"]] for r, _ in items])
        results["caption"] = {"cider_d": cider["score"], "n": cider["n"]}
    if "grounded_caption" in by_task:
        items = by_task["grounded_caption"]
        cider = cider_d([strip_grounding(a) for _, a in items], [[strip_grounding(r["answer"])] for r, _ in items])
        matched = n_gold = n_predicted = 0
        for row, answer in items:
            predicted = [box for _, box in parse_boxes(answer, row["image_size"])]
            matched += _match_boxes(predicted, row["boxes"], 0.5)
            n_gold += len(row["boxes"])
            n_predicted += len(predicted)
        results["grounded_caption"] = {
            "cider_d": cider["score"],
            "box_recall": matched / n_gold if n_gold else 0.0,
            "box_precision": matched / n_predicted if n_predicted else 0.0,
            "n": cider["n"],
        }
    if "vqa" in by_task:
        items = by_task["vqa"]
        overall = vqa_accuracy([a for _, a in items], [r["short_answer"] for r, _ in items])
        by_type = {}
        for qtype in sorted({str(r.get("qtype")) for r, _ in items}):
            subset = [(r, a) for r, a in items if str(r.get("qtype")) == qtype]
            by_type[qtype] = vqa_accuracy([a for _, a in subset], [r["short_answer"] for r, _ in subset])
        results["vqa"] = {**overall, "by_type": by_type}
    if "rec" in by_task:
        items = by_task["rec"]
        results["rec"] = rec_accuracy(
            [a for _, a in items], [r["box"] for r, _ in items], [r["image_size"] for r, _ in items]
        )
    return results


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON types: numpy/torch scalars via `.item()`, tuples to lists, paths to strings; NaN/inf rejected."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            raise ValueError(f"{where}: only scalars can be written, got {type(value).__name__}") from None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} cannot be written to JSON")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(f"{where}: cannot write a {type(value).__name__} to JSON")


def write_report(path: str | Path, metrics: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `{"metrics": ..., "metadata": ...}` as indented JSON with sorted keys (so reruns diff cleanly).

    `metadata` is for what produced the numbers (checkpoint, split, decoding settings ...). Parent folders are
    created. Values that JSON cannot hold faithfully (NaN, infinities, arbitrary objects) raise `ValueError`
    naming the key.
    """
    report = {"metrics": _jsonable(metrics, "metrics"), "metadata": _jsonable(metadata or {}, "metadata")}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    return target


__all__ = ["load_jsonl", "evaluate_predictions", "write_report"]
