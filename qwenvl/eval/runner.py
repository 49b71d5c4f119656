"""Run a model over an evaluation file and score it: `qwenvl eval --model DIR --data FILE`.

Generation evaluation reads a `<split>_samples.jsonl` file (`qwenvl.data.synthetic`); reward-model evaluation reads a
`<split>_preference.jsonl` file. Image paths in those files are relative to the file's folder and must stay inside it.
Prompts are dataset text, so grounding tags in them are parsed (`trusted_text=True`), as in training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .metrics import pairwise_accuracy
from .report import evaluate_predictions, load_jsonl


def resolve_image(root: Path, relative: str, where: str) -> Path:
    """`root / relative`, refusing absolute paths, URLs and `..` escapes."""
    if "://" in relative:
        raise ValueError(f"{where}: image {relative!r} is a URL; only files under {root} are read")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{where}: image {relative!r} leaves the data folder {root}")
    if not path.is_file():
        raise ValueError(f"{where}: image file not found: {path}")
    return path


def _load_images(rows: Sequence[Mapping[str, Any]], root: Path, source: str,
                 numbers: Sequence[int] | None = None) -> list[Image.Image]:
    """The rows' images as RGB; `numbers`: the rows' indices in `source`, for error messages (default 0, 1, ...)."""
    images = []
    for index, row in zip(numbers if numbers is not None else range(len(rows)), rows):
        path = resolve_image(root, row["image"], f"{source} row {index} (id {row.get('id')!r})")
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


@torch.no_grad()
def generate_answers(
    model,
    processor,
    rows: Sequence[Mapping[str, Any]],
    image_root: str | Path,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    source: str = "data",
) -> list[str]:
    """Greedy answers to each row's `prompt` about its `image`, in the rows' order.

    Batches are formed from rows of one task (then of like prompt lengths): a batch decodes until its longest answer
    ends, so a one-word VQA answer batched with a caption waits for the caption (the demo's test file interleaves the
    tasks per scene; 400 rows took 12.6 s so and 6.6 s grouped). Greedy answers do not depend on the batch.
    """
    root = Path(image_root)
    order = sorted(range(len(rows)), key=lambda i: (str(rows[i].get("task", "")), len(rows[i]["prompt"])))
    answers: list[str] = [""] * len(rows)
    for start in range(0, len(rows), batch_size):
        indices = order[start : start + batch_size]
        chunk = [rows[i] for i in indices]
        images = _load_images(chunk, root, source, indices)
        responses, _ = model.batch_chat(processor, [row["prompt"] for row in chunk], images=[[img] for img in images],
                                        trusted_text=True, max_new_tokens=max_new_tokens, do_sample=False)
        for i, response in zip(indices, responses):
            answers[i] = response
    return answers


def evaluate_model(model, processor, samples_path: str | Path, batch_size: int = 16, max_new_tokens: int = 48,
                   limit: int | None = None) -> dict[str, Any]:
    """Metrics per task for a `<split>_samples.jsonl` file, with the predictions (id → answer)."""
    path = Path(samples_path)
    rows = load_jsonl(path)[:limit]
    answers = generate_answers(model, processor, rows, path.parent, batch_size, max_new_tokens, source=str(path))
    metrics = evaluate_predictions(rows, answers)
    metrics["answer_nll"] = {"mean": answer_loss(model, processor, rows, path.parent, batch_size, str(path)),
                             "n": len(rows)}
    return {"metrics": metrics, "n": len(rows), "predictions": {row["id"]: a for row, a in zip(rows, answers)}}


@torch.no_grad()
def score_conversations(reward_model, processor, prompts: Sequence[str], answers: Sequence[str],
                        images: Sequence[Image.Image], batch_size: int = 16) -> list[float]:
    """Reward-model scores of `answer` given `prompt` and `image`, rendered with the chat template."""
    scores: list[float] = []
    device = next(reward_model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
                 {"role": "assistant", "content": answer}],
                tokenize=False, trusted_text=True,
            )
            for prompt, answer in zip(prompts[start : start + batch_size], answers[start : start + batch_size])
        ]
        batch = processor(text=texts, images=[[img] for img in images[start : start + batch_size]], padding=True,
                          return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        scores.extend(reward_model(**batch).logits[:, 0].float().tolist())
    return scores


def evaluate_reward_model(reward_model, processor, preference_path: str | Path, batch_size: int = 16,
                          limit: int | None = None) -> dict[str, Any]:
    """Pairwise accuracy of a reward model on a `<split>_preference.jsonl` file (ties count as wrong)."""
    path = Path(preference_path)
    rows = load_jsonl(path)[:limit]
    images = _load_images(rows, path.parent, str(path))
    prompts = [row["prompt"] for row in rows]
    chosen = score_conversations(reward_model, processor, prompts, [r["chosen"] for r in rows], images, batch_size)
    rejected = score_conversations(reward_model, processor, prompts, [r["rejected"] for r in rows], images, batch_size)
    return {"metrics": {"reward": pairwise_accuracy(chosen, rejected)}, "n": len(rows)}


@torch.no_grad()
def answer_loss(model, processor, rows: Sequence[Mapping[str, Any]], image_root: str | Path, batch_size: int = 16,
                source: str = "data") -> float:
    """Mean per-token cross-entropy of the reference answers (teacher forcing): a sensitive measure of learning."""
    from ..train import QwenVLDataCollator

    collator = QwenVLDataCollator(processor)
    root = Path(image_root)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = _load_images(chunk, root, source, range(start, start + len(chunk)))
        batch = collator([
            {"images": [image], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"]}]},
                {"role": "assistant", "content": row["answer"]}]}
            for row, image in zip(chunk, images)
        ])
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
        total += float(loss) * n_tokens
        count += n_tokens
    return total / max(count, 1)
