"""Specification of the reward functions in `qwenvl.rl.rewards` and of their TRL calling convention."""

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.grpo_trainer import GRPOTrainer

from qwenvl.rl.rewards import (
    RewardModelScorer,
    box_iou,
    completion_text,
    exact_match_reward,
    first_box,
    iou_reward,
    make_reward_model_reward,
    normalize_answer,
)


# Boxes are written in [0, 1000) of the image size. For a 1000 x 500 image, (100,200),(500,600) is about the pixel box
# (100, 100, 500, 300); conventions differ by at most half a normalised step, hence the tolerance below.
IMAGE = Image.new("RGB", (1000, 500))
TOL = 1e-2
PRED = "<ref>the dog</ref><box>(100,200),(500,600)</box>"
PRED_PIXELS = (100, 100, 500, 300)
HALF_OVERLAP = [300, 100, 700, 300]  # intersection 200 x 200, union 2 * 80000 - 40000 -> IoU 1/3


# The keywords GRPOTrainer adds to every reward call, besides prompts/completions/completion_ids and the data columns.
GRPO_EXTRA_KWARGS = {
    "trainer_state": SimpleNamespace(global_step=0),
    "log_extra": lambda *a: None,
    "log_metric": lambda *a: None,
}


# ---------------------------------------------------------------------------------------------------------------------
# IoU
# ---------------------------------------------------------------------------------------------------------------------


def test_box_iou_hand_values():
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((5, 5, 5, 9), (0, 0, 10, 10)) == 0.0  # no area


def test_first_box_reads_tagged_half_tagged_and_bare_boxes():
    for text in (PRED, "(100,200),(500,600)</box>", "<ref>dog</ref>(100,200),(500,600)", "( 100 , 200 ),(500,600) ."):
        box = first_box(text, IMAGE.size)
        assert box == pytest.approx(PRED_PIXELS, abs=1.0), text
    assert first_box("<box>(0,0),(10,10)</box><box>(100,200),(500,600)</box>", IMAGE.size)[2] < 20  # the first one
    assert first_box("no box at all", IMAGE.size) is None


def test_iou_reward_hand_values():
    completions = [PRED, PRED, "<box>(600,0),(999,999)</box>"]
    boxes = [list(PRED_PIXELS), HALF_OVERLAP, list(PRED_PIXELS)]
    rewards = iou_reward(completions, box=boxes, image=[IMAGE] * 3)
    assert rewards == [pytest.approx(1.0, abs=TOL), pytest.approx(1 / 3, abs=TOL), 0.0]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I cannot see a dog.",
        "<box>(100,200)</box>",
        "<box>(a,b),(c,d)</box>",
        "<box>(100,200),(500</box>",
        "<box>100,200,500,600</box>",
        "<box>(100,200),(100,600)</box>",  # zero width
        "<ref>the dog</ref>",
    ],
)
def test_iou_reward_of_malformed_output_is_zero(text):
    assert iou_reward([text], box=[list(PRED_PIXELS)], image=[IMAGE]) == [0.0]


def test_iou_reward_scales_by_the_image_size():
    wide, tall = Image.new("RGB", (2000, 100)), Image.new("RGB", (100, 2000))
    rewards = iou_reward([PRED, PRED], box=[[200, 20, 1000, 60], [10, 400, 50, 1200]], image=[wide, tall])
    assert rewards == [pytest.approx(1.0, abs=TOL), pytest.approx(1.0, abs=TOL)]


def test_iou_reward_takes_the_size_from_images_prompt_blocks_or_a_path(tmp_path):
    small = Image.new("RGB", (10, 10))
    # `images`: the box refers to the latest picture, as in the original model
    assert iou_reward([PRED], box=[list(PRED_PIXELS)], images=[[small, IMAGE]]) == [pytest.approx(1.0, abs=TOL)]
    prompt = prepare_multimodal_messages([{"role": "user", "content": "Where is the dog?"}], images=[IMAGE])
    assert iou_reward([PRED], box=[list(PRED_PIXELS)], prompts=[prompt]) == [pytest.approx(1.0, abs=TOL)]
    path = tmp_path / "dog.png"
    IMAGE.save(path)
    assert iou_reward([PRED], box=[list(PRED_PIXELS)], image=[str(path)]) == [pytest.approx(1.0, abs=TOL)]


def test_iou_reward_rows_without_reference_are_skipped_with_none():
    assert iou_reward([PRED, PRED], box=[None, list(PRED_PIXELS)], image=[IMAGE, IMAGE]) == [
        None,
        pytest.approx(1.0, abs=TOL),
    ]


@pytest.mark.parametrize("bad", [[1, 2, 3], [10, 10, 5, 20], ["a", "b", "c", "d"], [0, 0, math.inf, 1], "box"])
def test_iou_reward_rejects_a_bad_reference_box_naming_row_and_field(bad):
    with pytest.raises(ValueError, match=r"row 1: field 'box'"):
        iou_reward([PRED, PRED], box=[list(PRED_PIXELS), bad], image=[IMAGE, IMAGE])


def test_iou_reward_needs_an_image_and_matching_column_lengths():
    with pytest.raises(ValueError, match=r"row 0: iou_reward needs the image"):
        iou_reward([PRED], box=[list(PRED_PIXELS)])
    with pytest.raises(ValueError, match=r"row 0: cannot read image 'missing.png'"):
        iou_reward([PRED], box=[list(PRED_PIXELS)], image=["missing.png"])
    with pytest.raises(ValueError, match=r"column 'box' has 1 rows but there are 2 completions"):
        iou_reward([PRED, PRED], box=[list(PRED_PIXELS)], image=[IMAGE, IMAGE])


# ---------------------------------------------------------------------------------------------------------------------
# Exact match
# ---------------------------------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("  The Cat. ") == "cat"
    assert normalize_answer("An apple, a pear!") == "apple pear"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("1,000 people.") == "1,000 people"
    assert normalize_answer("ＹＥＳ！") == "yes"  # full-width letters and punctuation (NFKC)
    assert normalize_answer("红色。") == "红色"


def test_exact_match_reward():
    completions = ["The cat.", "a dog", "two", "Two", "blue"]
    answers = ["cat", "cat", ["2", "two"], None, "red"]
    assert exact_match_reward(completions, answer=answers) == [1.0, 0.0, 1.0, None, 0.0]


def test_exact_match_reward_rejects_bad_answers_naming_row_and_field():
    with pytest.raises(ValueError, match=r"row 0: field 'answer'"):
        exact_match_reward(["cat"], answer=[3])
    with pytest.raises(ValueError, match=r"row 0: field 'answer'"):
        exact_match_reward(["cat"], answer=[[]])


def test_completion_text_of_strings_and_messages():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    assert (
        completion_text(
            [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        )
        == "ab"
    )
    with pytest.raises(TypeError, match="a completion must be a string or a list of messages"):
        completion_text(42)


# ---------------------------------------------------------------------------------------------------------------------
# The TRL calling convention
# ---------------------------------------------------------------------------------------------------------------------


def test_rewards_accept_the_keywords_grpo_trainer_passes():
    prompts = [[{"role": "user", "content": "Where is the dog?"}]] * 2
    completions = [[{"role": "assistant", "content": PRED}], [{"role": "assistant", "content": "cat"}]]
    columns = {"image": [IMAGE, IMAGE], "box": [list(PRED_PIXELS), None], "answer": [None, "Cat"]}
    common = dict(prompts=prompts, completions=completions, completion_ids=[[1, 2], [3]], **GRPO_EXTRA_KWARGS)
    assert iou_reward(**common, **columns) == [pytest.approx(1.0, abs=TOL), None]
    assert exact_match_reward(**common, **columns) == [None, 1.0]


def run_grpo_reward_dispatch(reward_funcs, rows, prompts, completions):
    """Run TRL's own `GRPOTrainer._calculate_rewards` on a stand-in trainer (no model needed)."""
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=SimpleNamespace(report_to=[]),
        state=SimpleNamespace(global_step=0),
        reward_funcs=reward_funcs,
        reward_processing_classes=[None] * len(reward_funcs),
        reward_func_names=[getattr(f, "__name__", type(f).__name__) for f in reward_funcs],
        environments=None,
        _log_completion_extra=lambda *a, **k: None,
        _log_metric=lambda *a, **k: None,
    )
    completion_ids = [[0] * len(completion_text(c)) for c in completions]
    return GRPOTrainer._calculate_rewards(trainer, rows, prompts, completions, completion_ids)


# ---------------------------------------------------------------------------------------------------------------------
# Reward model wrapper
# ---------------------------------------------------------------------------------------------------------------------

IMG_ID, PAD_ID = 99, 0


class FakeProcessor:
    """Stands in for the Qwen-VL processor: ChatML rendering with `Picture k: <img></img>` blocks, characters as
    token ids, one `IMG_ID` token per image placeholder, and one (3, 2, 2) `pixel_values` row per image."""

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize=False):
        assert tokenize is False
        text = ""
        for message in messages:
            text += f"<|im_start|>{message['role']}\n"
            picture = 0
            for block in message["content"]:
                if block["type"] == "image":
                    picture += 1
                    text += f"Picture {picture}: <img></img>\n"
                else:
                    text += block["text"]
            text += "<|im_end|>\n"
        return text

    def __call__(self, text, images=None, padding=True, padding_side="right", return_tensors="pt"):
        self.calls.append({"text": text, "images": images, "padding_side": padding_side})
        rows = []
        for row_text in text:
            ids = []
            for k, piece in enumerate(row_text.split("<img></img>")):
                ids += ([IMG_ID] if k else []) + [ord(c) % 50 + 1 for c in piece]
            rows.append(ids)
        width = max(map(len, rows))
        input_ids = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for ids in rows])
        flat = [img for row in images for img in row] if images else []
        pixel_values = (
            torch.stack([torch.full((3, 2, 2), img.getpixel((0, 0))[0] / 255.0) for img in flat]) if flat else None
        )
        return {"input_ids": input_ids, "attention_mask": (input_ids != PAD_ID).long(), "pixel_values": pixel_values}


class FakeRewardModel(nn.Module):
    """Same call signature as `QwenVLForSequenceClassification`: the score of a row is the sum of the brightness of
    its images (taken in row-major order, one per image token, as the real model does) plus `bias`."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(0.5))
        self.n_calls = 0

    def forward(self, input_ids, attention_mask, pixel_values=None):
        self.n_calls += 1
        assert not self.training
        images_per_row = (input_ids == IMG_ID).sum(-1).tolist()
        brightness = pixel_values.mean(dim=(1, 2, 3)) if pixel_values is not None else torch.zeros(0)
        scores, k = [], 0
        for n in images_per_row:
            scores.append(brightness[k : k + n].sum() + self.bias)
            k += n
        assert k == len(brightness), "every image must have a placeholder"
        return SequenceClassifierOutput(logits=torch.stack(scores).unsqueeze(-1))


def gray(level):
    return Image.new("RGB", (4, 4), (level, level, level))


def test_reward_model_scorer_scores_conversations_with_their_images():
    processor, model = FakeProcessor(), FakeRewardModel().train()
    scorer = make_reward_model_reward(model, processor)
    assert isinstance(scorer, RewardModelScorer) and not isinstance(scorer, nn.Module)  # TRL must call it, with images
    prompts = [[{"role": "user", "content": "Describe."}], [{"role": "user", "content": "Compare."}]]
    completions = [[{"role": "assistant", "content": "Dark."}], [{"role": "assistant", "content": "Both."}]]
    scores = scorer(prompts=prompts, completions=completions, images=[[gray(51)], [gray(102), gray(255)]])
    assert scores == pytest.approx([0.2 + 0.5, 0.4 + 1.0 + 0.5])
    assert not model.training
    (call,) = processor.calls
    assert call["padding_side"] == "right"
    assert call["text"][1] == (
        "<|im_start|>user\nPicture 1: <img></img>\nPicture 2: <img></img>\nCompare.<|im_end|>\n"
        "<|im_start|>assistant\nBoth.<|im_end|>\n"
    )


def test_reward_model_scorer_uses_images_embedded_in_grpo_prompts_and_batches():
    processor, model = FakeProcessor(), FakeRewardModel()
    scorer = RewardModelScorer(model, processor, batch_size=2)
    levels = [0, 51, 102, 153, 204]
    prompts = [prepare_multimodal_messages([{"role": "user", "content": "Q"}], images=[gray(v)]) for v in levels]
    completions = [[{"role": "assistant", "content": "A"}]] * 5
    # GRPO also passes the `image` column: the images already in the prompt must not be counted twice
    scores = scorer(prompts=prompts, completions=completions, image=[gray(v) for v in levels])
    assert scores == pytest.approx([v / 255 + 0.5 for v in levels])
    assert model.n_calls == 3 and [len(c["text"]) for c in processor.calls] == [2, 2, 1]


def test_reward_model_scorer_plain_text_rows_and_rows_without_images():
    processor, model = FakeProcessor(), FakeRewardModel()
    scorer = RewardModelScorer(model, processor)
    scores = scorer(
        prompts=["<img></img>What is it?", "Hello"], completions=[" A cat.", " Hi."], images=[[gray(255)], []]
    )
    assert scores == pytest.approx([1.5, 0.5])
    assert processor.calls[0]["text"] == ["<img></img>What is it? A cat.", "Hello Hi."]
    assert scorer(prompts=["Hello"], completions=[" Hi."]) == pytest.approx([0.5])
    assert processor.calls[1]["images"] is None


def test_reward_model_scorer_rejects_a_non_scalar_head():
    class TwoLabels(FakeRewardModel):
        def forward(self, input_ids, attention_mask, pixel_values=None):
            return SequenceClassifierOutput(logits=torch.zeros(input_ids.size(0), 2))

    with pytest.raises(ValueError, match=r"logits of shape \(1, 1\), got \(1, 2\); load it with num_labels=1"):
        RewardModelScorer(TwoLabels(), FakeProcessor())(prompts=["x"], completions=["y"])


def test_grpo_trainer_reward_dispatch_calls_our_rewards_with_images():
    """The real `GRPOTrainer._calculate_rewards` drives all three rewards on a vision batch."""
    # Tiny 4 x 4 images: the box text (100,200),(500,600) is about the pixel box (0.4, 0.8, 2.0, 2.4).
    rows = [
        {
            "prompt": [{"role": "user", "content": "Where?"}],
            "image": gray(51),
            "box": [0.4, 0.8, 2, 2.4],
            "answer": None,
        },
        {"prompt": [{"role": "user", "content": "What animal?"}], "image": gray(204), "box": None, "answer": "dog"},
    ]
    # As GRPOTrainer builds them: images injected into the prompts, completions decoded as assistant messages (here
    # with the <box> tags dropped by `skip_special_tokens=True`).
    prompts = [prepare_multimodal_messages(row["prompt"], images=[row["image"]]) for row in rows]
    completions = [
        [{"role": "assistant", "content": "(100,200),(500,600)"}],
        [{"role": "assistant", "content": "Dog."}],
    ]
    scorer = RewardModelScorer(FakeRewardModel(), FakeProcessor())
    rewards = run_grpo_reward_dispatch([iou_reward, exact_match_reward, scorer], rows, prompts, completions)
    assert rewards.shape == (2, 3)
    assert rewards[0, 0].item() == pytest.approx(1.0, abs=0.05)
    assert math.isnan(rewards[1, 0].item()) and math.isnan(rewards[0, 1].item())  # None -> NaN, ignored by TRL
    assert rewards[1, 1].item() == 1.0
    assert rewards[:, 2].tolist() == pytest.approx([0.2 + 0.5, 0.8 + 0.5])
