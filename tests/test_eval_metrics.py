"""Specification of the evaluation metrics (`qwenvl.eval`), against values computed by hand."""

import json
import math

import numpy as np
import pytest

from qwenvl.data.synthetic import generate_dataset
from qwenvl.eval import (
    box_iou,
    cider_d,
    evaluate_predictions,
    first_box,
    load_jsonl,
    normalize_vqa_answer,
    pairwise_accuracy,
    rec_accuracy,
    strip_grounding,
    tokenize_caption,
    vqa_accuracy,
    vqa_score,
    write_report,
)
from qwenvl.grounding import format_box


# ---------------------------------------------------------------------------------------------------------------------
# Boxes and referring expressions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges do not overlap
        ((0, 0, 2, 2), (1, 0, 3, 2), 2 / 6),
        ((0, 0, 4, 4), (0, 0, 2, 2), 4 / 16),
        ((0, 0, 0, 5), (0, 0, 0, 5), 0.0),  # no area
    ],
)
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


def test_first_box_reads_the_first_box_with_or_without_tags():
    # Image 1000 x 1000 px: normalised value v decodes to pixel v + 0.5 (centre of its 1/1000 cell).
    size = (1000, 1000)
    assert first_box("<ref>x</ref><box>(10,20),(30,40)</box><box>(0,0),(5,5)</box>", size) == (10.5, 20.5, 30.5, 40.5)
    assert first_box("(10,20),(30,40)</box>", size) == (10.5, 20.5, 30.5, 40.5)  # prompt ended with "<box>"
    assert first_box("it is at (10,20),(30,40)", size) == (10.5, 20.5, 30.5, 40.5)  # tags dropped by decoding
    assert first_box("<ref>the dog (left)</ref><box>(10,20),(30,40)</box>", size) == (10.5, 20.5, 30.5, 40.5)
    assert first_box("(1,1),(2,2) or <box>(10,20),(30,40)</box>", size) == (1.5, 1.5, 2.5, 2.5)
    assert first_box("I cannot see it.", size) is None


def test_rec_accuracy_scores_every_sample_with_the_first_box():
    size = (200, 100)
    target = (20, 10, 120, 60)
    predictions = [
        "<ref>the dog</ref>" + format_box(target, size),  # hit
        "<box>(600,100),(999,600)</box>",  # x 120.1..199.9: disjoint -> miss
        "no idea",  # unparseable -> miss
        "<box>(0,0),(10,10)</box><box>(100,100),(600,600)</box>",  # only the first box counts -> miss
    ]
    result = rec_accuracy(predictions, [target] * 4, [size] * 4)
    assert result["n"] == 4 and result["n_correct"] == 1 and result["n_unparsed"] == 1
    assert result["accuracy"] == 0.25


def test_rec_accuracy_counts_iou_of_exactly_one_half_as_correct():
    # On a 1000 px image "(0,0),(99,99)" is the pixel box (0.5, 0.5, 99.5, 99.5): area 99*99, and the target below
    # contains it and is twice as tall, so IoU is exactly 0.5.
    result = rec_accuracy(["<box>(0,0),(99,99)</box>"], [(0.5, 0.5, 99.5, 198.5)], [(1000, 1000)])
    assert result["mean_iou"] == 0.5 and result["accuracy"] == 1.0


def test_rec_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        rec_accuracy(["a"], [], [])
    with pytest.raises(ValueError, match="zero samples"):
        rec_accuracy([], [], [])
    with pytest.raises(ValueError, match="target 1"):
        rec_accuracy(["a", "b"], [(0, 0, 1, 1), (5, 5, 1, 1)], [(10, 10)] * 2)
    with pytest.raises(ValueError, match="image_size"):
        rec_accuracy(["<box>(1,1),(2,2)</box>"], [(0, 0, 1, 1)], [(0, 10)])


# ---------------------------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two", "2"),
        ("none", "0"),
        ("The dog.", "dog"),
        ("An apple!", "apple"),
        ("dont", "don't"),
        ("Isnt it", "isn't it"),
        ("well", "well"),  # an ordinary word, not "we'll"
        ("T-shirt", "t shirt"),  # punctuation not touching a space becomes a space
        ("t-shirt - red", "tshirt red"),  # ... but is deleted everywhere once it touches a space
        ("1,000 t-shirts", "1000 tshirts"),  # a digit,digit comma deletes all punctuation
        ("3.5", "3.5"),  # decimal point kept
        ("yes.", "yes"),
        ("  Red\n", "red"),
        ("left/right", "left right"),
    ],
)
def test_normalize_vqa_answer(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_score_single_answer_is_exact_match_after_normalisation():
    assert vqa_score("Two.", "2") == 1.0
    assert vqa_score("the red", ["red"]) == 1.0
    assert vqa_score("3", "2") == 0.0


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_score_with_ten_answers_is_the_official_consensus(matches, expected):
    # Averaged over the 10 leave-one-out subsets: m matches give (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10.
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_score("Yes", answers) == pytest.approx(expected)


def test_vqa_accuracy_averages_and_rejects_bad_input():
    assert vqa_accuracy(["red", "2", "left"], ["red", "two", "right"]) == {"accuracy": pytest.approx(2 / 3), "n": 3}
    with pytest.raises(ValueError, match="question 1"):
        vqa_accuracy(["a", "b"], ["a", []])
    with pytest.raises(ValueError, match="same length"):
        vqa_accuracy(["a"], ["a", "b"])


# ---------------------------------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------------------------------


def test_tokenize_caption_and_strip_grounding():
    tokens = tokenize_caption("A dog's T-shirt, don't (really) 1,000 3.5 items...")
    assert tokens == "a dog 's t-shirt do n't really 1,000 3.5 items".split()
    grounded = "Two: <ref>a red circle</ref><box>(1,2),(3,4)</box> and <ref>a cat</ref><box>(5,6),(7,8)</box>."
    assert strip_grounding(grounded) == "Two: a red circle and a cat."


def test_cider_d_hand_computed_exact_match_and_miss():
    # Two images, so IDF = log(2) - log(df). Image 0: candidate equals its reference "a b": cosine 1 for n = 1, 2
    # and 0 for n = 3, 4 (no trigrams), so 10 * (1 + 1 + 0 + 0) / 4 = 5. Image 1 shares no n-gram: 0.
    result = cider_d(["a b", "x y"], [["a b"], ["c d"]])
    assert result["scores"] == pytest.approx([5.0, 0.0])
    assert result["score"] == pytest.approx(2.5)
    assert result["n"] == 2


def test_cider_d_hand_computed_clipping_and_length_penalty():
    # L = log 2. Candidate "a b a b" vs reference "a b" (image 1 has "c d"):
    #  unigrams: cand a=2L, b=2L (norm 2*sqrt(2)L); ref a=L, b=L (norm sqrt(2)L); clipped dot 2*L*L -> 1/2
    #  bigrams: cand (a b)=2L, (b a)=L (norm sqrt(5)L); ref (a b)=L (norm L); clipped dot L*L -> 1/sqrt(5)
    #  n = 3, 4: the reference has none -> 0.   Lengths (bigram counts) 3 vs 1 -> penalty exp(-2^2 / (2 * 6^2)).
    expected = 10 * (0.5 + 1 / math.sqrt(5)) / 4 * math.exp(-4 / 72)
    result = cider_d(["a b a b", "c d"], [["a b"], ["c d"]])
    assert result["scores"] == pytest.approx([expected, 5.0])


def test_cider_d_averages_over_references_and_ignores_case_and_punctuation():
    # Image 0's candidate matches the first of its two references only: (5 + 0) / 2.
    result = cider_d(["A B.", "c d"], [["a b", "e f"], ["c d"]])
    assert result["scores"] == pytest.approx([2.5, 5.0])


def test_cider_d_is_ten_for_perfect_distinct_captions_and_zero_for_one_image():
    captions = ["one red circle on gray", "two blue squares near top", "a green digit seven here"]
    assert cider_d(captions, [[c] for c in captions])["scores"] == pytest.approx([10.0] * 3)
    assert cider_d(["a b c d"], [["a b c d"]])["score"] == 0.0  # IDF = log(1) = 0


def test_cider_d_rejects_bad_input():
    with pytest.raises(ValueError, match="references 1"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="references 0"):
        cider_d(["a"], ["a"])  # a bare string instead of a list of references
    with pytest.raises(ValueError, match="same length"):
        cider_d(["a"], [["a"], ["b"]])


# ---------------------------------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------------------------------


def test_pairwise_accuracy_counts_ties_as_errors():
    result = pairwise_accuracy([1.0, 2.0, 3.0, 0.5], np.array([0.0, 2.0, 4.0, -0.5]))
    assert result == {"accuracy": 0.5, "n": 4, "n_ties": 1, "mean_margin": pytest.approx(0.25)}
    with pytest.raises(ValueError, match="pair 0"):
        pairwise_accuracy([float("nan")], [0.0])


# ---------------------------------------------------------------------------------------------------------------------
# Task evaluation and reports
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_rows(tmp_path_factory):
    paths = generate_dataset(tmp_path_factory.mktemp("eval"), n_train=0, n_val=0, n_test=12, image_size=64, seed=0)
    return load_jsonl(paths["test_samples"])


def test_evaluate_predictions_perfect_answers(test_rows):
    results = evaluate_predictions(test_rows, {row["id"]: row["answer"] for row in test_rows})
    assert results["vqa"]["accuracy"] == 1.0 and results["vqa"]["n"] == 12
    assert all(v["accuracy"] == 1.0 for v in results["vqa"]["by_type"].values())
    assert results["rec"]["accuracy"] == 1.0 and results["rec"]["n_unparsed"] == 0
    assert results["grounded_caption"]["box_recall"] == 1.0 and results["grounded_caption"]["box_precision"] == 1.0
    captions = [row["answer"] for row in test_rows if row["task"] == "caption"]
    assert results["caption"]["cider_d"] == pytest.approx(cider_d(captions, [[c] for c in captions])["score"])


def test_evaluate_predictions_wrong_answers(test_rows):
    wrong = {}
    for row in test_rows:
        if row["task"] == "grounded_caption":
            wrong[row["id"]] = strip_grounding(row["answer"])  # right words, no boxes
        elif row["task"] == "rec":
            wrong[row["id"]] = "<box>(0,0),(1,1)</box>"
        else:
            wrong[row["id"]] = "zebra elephant"
    results = evaluate_predictions(test_rows, wrong)
    assert results["vqa"]["accuracy"] == 0.0 and results["rec"]["accuracy"] == 0.0
    assert results["grounded_caption"]["box_recall"] == 0.0
    assert results["grounded_caption"]["cider_d"] > 5  # text still right
    assert results["caption"]["cider_d"] == 0.0


def test_evaluate_predictions_requires_every_answer(test_rows):
    predictions = {row["id"]: row["answer"] for row in test_rows[1:]}
    with pytest.raises(ValueError, match=test_rows[0]["id"]):
        evaluate_predictions(test_rows, predictions)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_predictions([{"id": "x", "task": "ocr"}], ["text"])


def test_load_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\n{"id": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows.jsonl, line 2"):
        load_jsonl(path)


def test_write_report_is_plain_sorted_json(tmp_path):
    path = write_report(
        tmp_path / "out" / "report.json",
        {"rec": {"accuracy": np.float32(0.5), "n": np.int64(4)}, "boxes": (1, 2)},
        metadata={"checkpoint": tmp_path, "split": "test"},
    )
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {
        "metrics": {"boxes": [1, 2], "rec": {"accuracy": 0.5, "n": 4}},
        "metadata": {"checkpoint": str(tmp_path), "split": "test"},
    }
    assert text.index('"boxes"') < text.index('"rec"')
    with pytest.raises(ValueError, match=r"metrics\.vqa\.accuracy"):
        write_report(tmp_path / "bad.json", {"vqa": {"accuracy": float("nan")}})
