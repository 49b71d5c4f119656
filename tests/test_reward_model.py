"""Vision-language reward models on TRL's RewardTrainer (`qwenvl.rl.QwenVLRewardTrainer`), on tiny models.

A preference pair is one prompt with its images and two replies; the reward model scores both at their last token,
and the loss is `-log sigmoid(r_chosen - r_rejected - margin)`.
"""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from PIL import Image
from torch.nn.functional import logsigmoid
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig
from trl.data_utils import prepare_multimodal_messages

from qwenvl import QwenVLForLikelihoodReward
from qwenvl.rl import (
    QwenVLPreferenceCollator,
    QwenVLRewardTrainer,
    RewardModelScorer,
    sequence_classifier_from_causal_lm,
)
from qwenvl.testing import build_tiny_model_and_processor

from conftest import load_example


COLORS = {"red": (220, 30, 35), "blue": (30, 75, 220)}



def colour_pairs(n: int, seed: int) -> list[dict]:
    """'What colour is the picture?' about solid red or blue pictures (shade jittered): the right colour is chosen.

    Both colours are chosen equally often, so the text alone cannot tell the replies apart: only the image can.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour, other = ("red", "blue") if i % 2 == 0 else ("blue", "red")
        shade = tuple(min(255, max(0, v + rng.randint(-30, 30))) for v in COLORS[colour])
        rows.append({"images": [Image.new("RGB", (28, 28), shade)], "prompt": "What colour is the picture?",
                     "chosen": colour, "rejected": other})
    return rows


def reward_config(tmp_path, **overrides) -> RewardConfig:
    kwargs = dict(output_dir=str(tmp_path / "rm"), per_device_train_batch_size=8, learning_rate=2e-3, use_cpu=True,
                  report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return RewardConfig(**kwargs)


def chat(processor, prompt: str, reply: str, images: list) -> str:
    messages = prepare_multimodal_messages([{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": reply}], images=images)
    return processor.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------------


def test_collator_renders_chosen_then_rejected_with_the_prompt_images_once():
    _, processor = build_tiny_model_and_processor()
    red, blue = (Image.new("RGB", (28, 28), COLORS[c]) for c in ("red", "blue"))
    rows = [
        {"images": [red], "prompt": "What colour?", "chosen": "red", "rejected": "blue", "margin": 1.0},
        {"images": [blue, red], "prompt": [{"role": "user", "content": "Which is red?"}],
         "chosen": [{"role": "assistant", "content": "Picture 2"}], "rejected": "Picture 1", "margin": 0.5},
    ]
    batch = QwenVLPreferenceCollator(processor)(rows)

    texts = [chat(processor, "What colour?", "red", [red]), chat(processor, "Which is red?", "Picture 2", [blue, red]),
             chat(processor, "What colour?", "blue", [red]), chat(processor, "Which is red?", "Picture 1", [blue, red])]
    expected = processor(text=texts, images=[[red], [blue, red]] * 2, padding=True, padding_side="right",
                         return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    # Each row's images once, in row order; the trainer gives their features to both halves.
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"][:3])
    assert batch["margin"].tolist() == [1.0, 0.5]
    assert texts[0].endswith("<|im_start|>assistant\nred<|im_end|>")


def test_collator_errors_name_the_row_and_field():
    _, processor = build_tiny_model_and_processor()
    collator = QwenVLPreferenceCollator(processor)
    image = Image.new("RGB", (28, 28))
    good = {"images": [image], "prompt": "Q", "chosen": "a", "rejected": "b"}
    with pytest.raises(ValueError, match="preference row 1: missing field 'rejected'"):
        collator([good, {"images": [image], "prompt": "Q", "chosen": "a"}])
    with pytest.raises(ValueError, match="preference row 0: field 'images' holds a str"):
        collator([{**good, "images": ["picture.png"]}])
    with pytest.raises(ValueError, match=r"preference rows \[1\] \(of this batch\) have no 'margin'"):
        collator([{**good, "margin": 1.0}, good])
    with pytest.raises(ValueError, match="preference row 0: field 'chosen' must be a string or a non-empty list"):
        collator([{**good, "chosen": 3}])
    with pytest.raises(ValueError, match="longer than max_length=10"):
        QwenVLPreferenceCollator(processor, max_length=10)([good])


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------


def test_loss_is_the_pairwise_ranking_loss_with_margin_and_centring(tmp_path):
    model, processor = build_tiny_model_and_processor(seed=1, reward_model=True)
    rows = colour_pairs(4, seed=0)
    for row, margin in zip(rows, (0.0, 0.5, 1.0, 2.0)):
        row["margin"] = margin
    trainer = QwenVLRewardTrainer(model=model, args=reward_config(tmp_path, center_rewards_coefficient=0.1),
                                  train_dataset=Dataset.from_list(rows), processing_class=processor)
    batch = QwenVLPreferenceCollator(processor)(rows)

    loss = trainer.compute_loss(model, dict(batch))

    # Reference: encode every sequence's images separately (no sharing), then the formula by hand.
    with torch.no_grad():
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=torch.cat([batch["pixel_values"]] * 2)).logits.squeeze(-1)
    chosen, rejected = rewards[:4], rewards[4:]
    expected = -logsigmoid(chosen - rejected - batch["margin"]).mean() + 0.1 * ((chosen + rejected) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Learning a preference that needs the image
# ---------------------------------------------------------------------------------------------------------------------


def test_reward_model_learns_a_preference_that_needs_the_image(tmp_path):
    sft, processor = build_tiny_model_and_processor(seed=0)
    model = sequence_classifier_from_causal_lm(sft)  # the SFT backbone, a new score head
    trainer = QwenVLRewardTrainer(model=model, args=reward_config(tmp_path, num_train_epochs=10),
                                  train_dataset=Dataset.from_list(colour_pairs(64, seed=0)),
                                  eval_dataset=Dataset.from_list(colour_pairs(32, seed=1)), processing_class=processor)
    before = trainer.evaluate()["eval_accuracy"]

    trainer.train()
    after = trainer.evaluate()

    assert before <= 0.75
    assert after["eval_accuracy"] >= 0.9  # pairwise accuracy on held-out pictures
    assert after["eval_margin"] > 0

    # The trained model scores through RewardModelScorer (GRPO / PPO reward callable) exactly as during training.
    model.eval()
    row = colour_pairs(2, seed=2)[1]
    scorer = RewardModelScorer(model, processor)
    scores = scorer(prompts=[[{"role": "user", "content": row["prompt"]}]] * 2,
                    completions=[[{"role": "assistant", "content": row["chosen"]}],
                                 [{"role": "assistant", "content": row["rejected"]}]],
                    images=[row["images"]] * 2)
    batch = QwenVLPreferenceCollator(processor)([row])
    with torch.no_grad():
        direct = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=torch.cat([batch["pixel_values"]] * 2)).logits.squeeze(-1)
    assert scores == pytest.approx(direct.tolist(), abs=1e-5)
    assert scores[0] > scores[1]


# ---------------------------------------------------------------------------------------------------------------------
# Likelihood reward model: the SFT model's log-likelihood of the reply
# ---------------------------------------------------------------------------------------------------------------------


def likelihood_reward_model(tmp_path, sft, processor, scale: float = 0.5) -> QwenVLForLikelihoodReward:
    sft.save_pretrained(tmp_path / "sft")
    return QwenVLForLikelihoodReward.from_pretrained(
        tmp_path / "sft", reward_scale=scale,
        reply_start_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_start|>"))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_likelihood_reward_is_the_scaled_log_likelihood_of_the_last_turn(tmp_path, padding_side):
    sft, processor = build_tiny_model_and_processor(seed=3)
    model = likelihood_reward_model(tmp_path, sft, processor).eval()
    rows = colour_pairs(2, seed=0)
    texts = [chat(processor, r["prompt"], reply, r["images"]) for r in rows for reply in (r["chosen"], "a longer reply")]
    images = [r["images"] for r in rows for _ in range(2)]
    batch = processor(text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="pt")
    with torch.no_grad():
        output = model(**batch)
    rewards = output.logits

    assert rewards.shape == (4, 1)
    # Each scored token's share sits at its position, nothing anywhere else, and the shares add up to the reward.
    assert output.token_rewards.shape == batch["input_ids"].shape
    torch.testing.assert_close(output.token_rewards.sum(-1), rewards[:, 0], atol=1e-4, rtol=1e-5)
    assert not output.token_rewards[~model.reply_mask(batch["input_ids"], batch["attention_mask"])].any()
    start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    for i, (text, image) in enumerate(zip(texts, images)):
        alone = processor(text=[text], images=[image], return_tensors="pt")
        ids = alone["input_ids"][0]
        first = int((ids == start).nonzero().max()) + 1  # the reply's turn: role line, reply and <|im_end|>
        with torch.no_grad():
            logps = torch.log_softmax(sft(**alone).logits[0, :-1], -1).gather(-1, ids[1:, None]).squeeze(-1)
        torch.testing.assert_close(rewards[i, 0], 0.5 * logps[first - 1 :].sum(), atol=1e-4, rtol=1e-4)
        scored = output.token_rewards[i][batch["attention_mask"][i].bool()][first:]
        torch.testing.assert_close(scored, 0.5 * logps[first - 1 :], atol=1e-4, rtol=1e-4)


def test_likelihood_reward_model_needs_the_reply_start_token(tmp_path):
    sft, _ = build_tiny_model_and_processor(seed=3)
    sft.save_pretrained(tmp_path / "sft")
    with pytest.raises(ValueError, match="reply_start_token_id"):
        QwenVLForLikelihoodReward.from_pretrained(tmp_path / "sft")


def test_likelihood_reward_model_learns_with_the_reward_trainer_and_reloads(tmp_path):
    sft, processor = build_tiny_model_and_processor(seed=0)
    model = likelihood_reward_model(tmp_path, sft, processor)
    trainer = QwenVLRewardTrainer(model=model, args=reward_config(tmp_path, num_train_epochs=10, learning_rate=5e-3),
                                  train_dataset=Dataset.from_list(colour_pairs(64, seed=0)),
                                  eval_dataset=Dataset.from_list(colour_pairs(32, seed=1)), processing_class=processor)
    before = trainer.evaluate()["eval_accuracy"]

    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]

    assert before <= 0.75 and after >= 0.9
    trainer.save_model(str(tmp_path / "rm"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", trust_remote_code=True).eval()
    assert type(reloaded).__name__ == "QwenVLForLikelihoodReward"
    assert reloaded.config.reward_scale == 0.5 and reloaded.config.num_labels == 1
    held_out = colour_pairs(32, seed=1)
    batch = QwenVLPreferenceCollator(processor)(held_out)
    with torch.no_grad():
        rewards = reloaded(**{**batch, "pixel_values": torch.cat([batch["pixel_values"]] * 2)}).logits.squeeze(-1)
    assert (rewards[:32] > rewards[32:]).float().mean() >= 0.9  # the trained preference came back with the folder
    # A causal-LM folder still loads as the score-head classifier.
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sft", num_labels=1)
    assert type(classifier).__name__ == "QwenVLForSequenceClassification"


# ---------------------------------------------------------------------------------------------------------------------
# examples/reward.py
# ---------------------------------------------------------------------------------------------------------------------



def test_reward_example_saves_a_hub_ready_reward_model(tmp_path):
    out = tmp_path / "rm"
    metrics = load_example("reward").main([
        "--tiny", "--tiny_scenes", "4", "--output_dir", str(out), "--use_cpu", "--report_to", "none",
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--save_strategy", "no", "--disable_tqdm", "true",
    ])

    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    saved = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_qwenvl.py", "processor_config.json",
            "tokenizer.json", "chat_template.jinja"} <= saved
    reloaded = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    assert reloaded.config.num_labels == 1
    processor = build_tiny_model_and_processor()[1]
    row = colour_pairs(1, seed=0)[0]
    batch = QwenVLPreferenceCollator(processor)([row])
    with torch.no_grad():
        logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=torch.cat([batch["pixel_values"]] * 2)).logits
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()
