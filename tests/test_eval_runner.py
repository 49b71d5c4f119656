"""Generation evaluation: `qwenvl.eval.runner.generate_answers` batches rows of one task together and still returns
each row's own greedy answer, in the rows' order."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwenvl.eval.runner import generate_answers
from qwenvl.testing import build_tiny_model_and_processor

TASK_PROMPTS = {"caption": "Describe the image in English:", "vqa": "What color is the circle? Answer:",
                "rec": "<ref>the red square</ref>"}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model_and_processor(seed=5)


@pytest.fixture
def interleaved_rows(tmp_path):
    """Rows as the demo's test file lists them: the tasks of one scene after another."""
    rows = []
    for scene in range(3):
        rng = np.random.default_rng(scene)
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / f"scene{scene}.png")
        for task, prompt in TASK_PROMPTS.items():
            rows.append({"id": f"{scene}_{task}", "task": task, "image": f"scene{scene}.png",
                         "prompt": prompt + " " * scene})
    return rows


def test_answers_come_back_in_the_rows_order_and_equal_unbatched_ones(tiny, interleaved_rows, tmp_path):
    model, processor = tiny
    batched = generate_answers(model, processor, interleaved_rows, tmp_path, batch_size=4, max_new_tokens=8)
    alone = [generate_answers(model, processor, [row], tmp_path, batch_size=1, max_new_tokens=8)[0]
             for row in interleaved_rows]
    assert batched == alone
    assert len(set(batched)) > 1  # the rows do differ, so a reordering would show


def test_batches_hold_rows_of_one_task(tiny, interleaved_rows, tmp_path, monkeypatch):
    model, processor = tiny
    seen = []
    original = type(model).batch_chat

    def recording_batch_chat(self, processor, queries, **kwargs):
        seen.append(queries)
        return original(self, processor, queries, **kwargs)

    monkeypatch.setattr(type(model), "batch_chat", recording_batch_chat)
    generate_answers(model, processor, interleaved_rows, tmp_path, batch_size=3, max_new_tokens=2)
    tasks_of = {row["prompt"]: row["task"] for row in interleaved_rows}
    assert [len({tasks_of[q] for q in queries}) for queries in seen] == [1, 1, 1]


def test_a_missing_image_is_named_by_its_row_in_the_file(tiny, interleaved_rows, tmp_path):
    model, processor = tiny
    interleaved_rows[7]["image"] = "missing.png"
    with pytest.raises(ValueError, match=r"test\.jsonl row 7 \(id '2_vqa'\): image file not found"):
        generate_answers(model, processor, interleaved_rows, tmp_path, batch_size=4, max_new_tokens=2,
                         source="test.jsonl")
