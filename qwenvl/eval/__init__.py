"""Evaluation: benchmark metrics (REC Acc@0.5, VQA accuracy, CIDEr-D, reward-model pairwise accuracy) and reports."""

from .metrics import (
    box_iou,
    cider_d,
    first_box,
    normalize_vqa_answer,
    pairwise_accuracy,
    rec_accuracy,
    strip_grounding,
    tokenize_caption,
    vqa_accuracy,
    vqa_score,
)
from .report import evaluate_predictions, load_jsonl, write_report


__all__ = [
    "box_iou",
    "cider_d",
    "first_box",
    "normalize_vqa_answer",
    "pairwise_accuracy",
    "rec_accuracy",
    "strip_grounding",
    "tokenize_caption",
    "vqa_accuracy",
    "vqa_score",
    "evaluate_predictions",
    "load_jsonl",
    "write_report",
]
