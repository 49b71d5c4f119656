"""PPO-ptx with images (`qwenvl.rl.PPOTrainer`), on tiny models: trainer-level behaviour.

The loss pieces themselves (GAE, clipped losses, KL estimators) are checked against hand-computed values in
`test_rl_core.py`; here: rollouts keep every image with its prompt, the reward goes up on a toy task that can only be
solved by looking at the image, the pre-training term reaches the gradient, the reference stays frozen, and the
saved policy reloads.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from qwenvl.rl import PPOConfig, PPOTrainer, compute_gae, masked_whiten, per_token_values, vision_tower
from qwenvl.testing import build_tiny_model_and_processor

from conftest import EXAMPLES, load_example


REPO = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 35), "blue": (30, 75, 220)}



def colour_rows(n: int) -> list[dict]:
    """Prompts about a solid red or blue picture (alternating), with the colour as a reward column."""
    names = list(COLORS)
    return [
        {"prompt": "What colour is the picture?", "images": [Image.new("RGB", (28, 28), COLORS[names[i % 2]])],
         "color": names[i % 2]}
        for i in range(n)
    ]


def make_half_vocab_reward(processor):
    """Fraction of text tokens in the lower half of the BPE ids for red pictures, in the upper half for blue ones.

    A random policy scores 0.5; only a policy that reads the image can do better.
    """
    n_text = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")  # specials follow the BPE ranks

    def half_vocab_reward(completion_ids, color, **kwargs):
        scores = []
        for ids, colour in zip(completion_ids, color):
            text = [t for t in ids if t < n_text] or [n_text]
            wanted = [(t < n_text // 2) if colour == "red" else (n_text // 2 <= t < n_text) for t in text]
            scores.append(sum(wanted) / len(wanted))
        return scores

    return half_vocab_reward


def tiny_config(tmp_path, **overrides) -> PPOConfig:
    kwargs = dict(output_dir=str(tmp_path / "ppo"), learning_rate=1e-2, per_device_train_batch_size=8,
                  gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=2, response_length=4,
                  temperature=1.0, kl_coef=0.01, total_episodes=16 * 2, seed=0)
    kwargs.update(overrides)
    return PPOConfig(**kwargs)


def sft_rows(n: int) -> list[dict]:
    return [
        {"images": row["images"], "messages": [{"role": "user", "content": row["prompt"]},
                                               {"role": "assistant", "content": row["color"]}]}
        for row in colour_rows(n)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------------------


def test_ppo_raises_the_reward_of_a_task_that_needs_the_image(tmp_path):
    policy, processor = build_tiny_model_and_processor(seed=0)
    # 25 updates of 32 rollouts; this setting learns the task for every seed tried (0-4).
    config = tiny_config(tmp_path, num_mini_batches=4, total_episodes=32 * 25)
    trainer = PPOTrainer(config, processor, policy, reward_fn=make_half_vocab_reward(processor),
                         train_dataset=colour_rows(64))
    reference = copy.deepcopy(trainer.ref_policy.state_dict())
    initial_policy = copy.deepcopy(policy.state_dict())

    history = trainer.train()

    assert len(history) == trainer.num_updates == 25
    scores = [entry["objective/scores"] for entry in history]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert 0.35 < first < 0.65  # chance level
    assert last > 0.75 and last > first + 0.2
    for entry in history:
        for key in ("objective/kl", "objective/entropy", "policy/entropy_avg", "policy/clipfrac_avg",
                    "policy/approxkl_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg"):
            assert math.isfinite(entry[key]), key
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert history[-1]["objective/kl"] > 0.1
    assert all(torch.equal(reference[k], v) for k, v in trainer.ref_policy.state_dict().items())
    assert any(not torch.equal(initial_policy[k], v) for k, v in policy.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts keep images aligned with their prompts
# ---------------------------------------------------------------------------------------------------------------------


def mixed_rows() -> list[dict]:
    """Rows with 1, 0 and 2 images and different prompt lengths (so the batch is left-padded)."""
    red, blue = (Image.new("RGB", (28, 28), COLORS[c]) for c in ("red", "blue"))
    return [
        {"prompt": "What colour?", "images": [red]},
        {"prompt": "How many objects are there in the image on the left?", "images": []},
        {"prompt": [{"role": "user", "content": "Which is red?"}], "images": [blue, red]},
        {"prompt": "Describe the image in English:", "images": [blue]},
    ]


def row_alone(trainer, processor, rollout, row: dict, i: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Row `i` of a rollout processed on its own: prompt + sampled response ids, its pixel values, the response."""
    messages, images = trainer._prompt_messages(row, i)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    alone = processor(text=[text], images=[images] if images else None, return_tensors="pt")
    response = rollout.responses[i][rollout.response_mask[i].bool()]
    ids = torch.cat([alone["input_ids"][0], response]).unsqueeze(0)
    return ids, ({"pixel_values": alone["pixel_values"]} if images else {}), response


def test_rollout_scores_each_row_with_its_own_images(tmp_path):
    policy, processor = build_tiny_model_and_processor(seed=1)
    reward_model, _ = build_tiny_model_and_processor(seed=2, reward_model=True)
    vision_tower(policy).requires_grad_(False)
    config = tiny_config(tmp_path, per_device_train_batch_size=2, num_mini_batches=2, response_length=6,
                         local_rollout_forward_batch_size=3, missing_eos_penalty=1.5)
    trainer = PPOTrainer(config, processor, policy, reward_model=reward_model, train_dataset=mixed_rows())
    # The frozen policy tower serves the reference too; the critic (a copy of the reward model, whose tower has other
    # weights) serves the reward model: two encodings per rollout.
    assert trainer._feature_source == {"policy": "policy", "value": "value", "ref": "policy", "reward": "value"}

    towers = {"policy": policy, "ref": trainer.ref_policy, "value": trainer.value_model, "reward": reward_model}
    calls = dict.fromkeys(towers, 0)
    for name, model in towers.items():
        vision_tower(model).register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))

    rows = mixed_rows()
    rollout = trainer.generate_rollout(rows)
    trainer.compute_loss(rollout, torch.arange(2))[0].backward()

    assert calls == {"policy": 1, "ref": 0, "value": 1, "reward": 0}  # generation and PPO epochs reuse them too
    value_model = trainer.value_model
    image_tags = processor.tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<imgpad>"])
    for i, row in enumerate(rows):
        ids, extra, response = row_alone(trainer, processor, rollout, row, i)
        with torch.no_grad():
            logits = policy(input_ids=ids, **extra).logits[0, -len(response) - 1 : -1] / config.temperature
            logits[:, image_tags] = -torch.inf  # the sampling distribution never emits image tags
            expected_logprobs = torch.log_softmax(logits, -1).gather(-1, response[:, None]).squeeze(-1)
            expected_score = reward_model(input_ids=ids, **extra).logits[0, 0]
            expected_values = per_token_values(value_model, input_ids=ids, **extra)[0, -len(response) - 1 : -1]
        n = len(response)
        torch.testing.assert_close(rollout.logprobs[i, :n], expected_logprobs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rollout.ref_logprobs[i, :n], expected_logprobs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rollout.values[i, :n], expected_values, atol=1e-4, rtol=1e-4)
        penalty = 0.0 if rollout.has_stop[i] else 1.5
        torch.testing.assert_close(rollout.scores[i], expected_score - penalty, atol=1e-4, rtol=1e-4)
    # The reward (score minus KL, here 0) sits on the last response token of each row.
    last = rollout.response_mask.sum(1) - 1
    torch.testing.assert_close(rollout.rewards[torch.arange(4), last], rollout.scores)
    assert not bool((rollout.responses == processor.tokenizer.convert_tokens_to_ids("<imgpad>")).any())


def policy_and_likelihood_reward_model(tmp_path) -> tuple:
    """A tiny policy, its processor, and a likelihood reward model loaded from the policy's saved weights."""
    from qwenvl import QwenVLForLikelihoodReward

    policy, processor = build_tiny_model_and_processor(seed=1)
    policy.save_pretrained(tmp_path / "sft")
    reward_model = QwenVLForLikelihoodReward.from_pretrained(
        tmp_path / "sft", reward_scale=0.5, reply_start_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_start|>"))
    return policy, processor, reward_model


def scores_row_by_row(trainer, processor, reward_model, rollout, rows) -> torch.Tensor:
    """The reward model's score of each rollout row (prompt + sampled response) processed on its own."""
    scores = []
    for i, row in enumerate(rows):
        ids, extra, _ = row_alone(trainer, processor, rollout, row, i)
        with torch.no_grad():
            scores.append(reward_model(input_ids=ids, **extra).logits[0, 0])
    return torch.stack(scores)


def test_a_likelihood_reward_model_scores_rollouts_and_the_critic_comes_from_the_policy(tmp_path):
    policy, processor, reward_model = policy_and_likelihood_reward_model(tmp_path)
    trainer = PPOTrainer(tiny_config(tmp_path, per_device_train_batch_size=2, response_length=6), processor, policy,
                         reward_model=reward_model, train_dataset=mixed_rows())

    assert not trainer.value_model.score.weight.any()  # a new zero-initialised head on a copy of the policy
    rows = mixed_rows()
    rollout = trainer.generate_rollout(rows)
    expected = scores_row_by_row(trainer, processor, reward_model, rollout, rows)
    torch.testing.assert_close(rollout.scores, expected, atol=1e-4, rtol=1e-4)


def test_dense_rewards_put_each_tokens_share_of_the_score_on_that_token(tmp_path):
    policy, processor, reward_model = policy_and_likelihood_reward_model(tmp_path)
    config = tiny_config(tmp_path, per_device_train_batch_size=2, response_length=6, dense_rewards=True,
                         normalize_scores=True)
    trainer = PPOTrainer(config, processor, policy, reward_model=reward_model, train_dataset=mixed_rows())
    rows = mixed_rows()
    trainer.generate_rollout(rows)  # the running moments see a first batch
    rollout = trainer.generate_rollout(rows)
    std = trainer.score_moments.std  # of both batches' scores, as this rollout's rewards used

    kl_part = -config.kl_coef * rollout.kl
    score_part = (rollout.rewards - kl_part).double()
    # The return is unchanged: the standardised score.
    torch.testing.assert_close(score_part.sum(1), trainer.score_moments.normalize(rollout.scores).double(),
                               atol=1e-4, rtol=1e-4)
    for i, row in enumerate(rows):  # every token but the last carries its own scaled log-likelihood
        ids, extra, response = row_alone(trainer, processor, rollout, row, i)
        with torch.no_grad():
            logits = trainer.ref_policy(input_ids=ids, **extra).logits[0, -len(response) - 1 : -1]
        shares = 0.5 * torch.log_softmax(logits.float(), -1).gather(-1, response[:, None]).squeeze(-1) / std
        torch.testing.assert_close(score_part[i, : len(response) - 1], shares[:-1].double(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="dense_rewards=True spreads a reward model's score"):
        PPOTrainer(config, processor, policy, reward_fn=lambda completions, **kw: [0.0] * len(completions),
                   train_dataset=mixed_rows())
    score_head, _ = build_tiny_model_and_processor(seed=2, reward_model=True)  # one score, no per-token shares
    with pytest.raises(ValueError, match="needs token_rewards from the reward model; QwenVLForSequenceClassification"):
        PPOTrainer(config, processor, policy, reward_model=score_head, train_dataset=mixed_rows()).generate_rollout(rows)


def test_a_reward_model_and_weighted_reward_callables_add_up_to_the_score(tmp_path):
    policy, processor, reward_model = policy_and_likelihood_reward_model(tmp_path)

    def first_row_only(completions, **kwargs):  # "no opinion" on the other rows: the reward model still scores them
        return [1.0] + [None] * (len(completions) - 1)

    def length(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    config = tiny_config(tmp_path, per_device_train_batch_size=2, response_length=6, reward_weights=[2.0, -0.5])
    trainer = PPOTrainer(config, processor, policy, reward_model=reward_model, reward_fn=[first_row_only, length],
                         train_dataset=mixed_rows())
    rows = mixed_rows()
    rollout = trainer.generate_rollout(rows)
    expected = scores_row_by_row(trainer, processor, reward_model, rollout, rows)
    expected += torch.tensor([2.0, 0.0, 0.0, 0.0]) - 0.5 * torch.tensor([float(len(c)) for c in rollout.completions])
    torch.testing.assert_close(rollout.scores, expected, atol=1e-4, rtol=1e-4)


def test_normalized_scores_become_unit_scale_rewards_and_the_logs_keep_the_raw_scores(tmp_path):
    policy, processor = build_tiny_model_and_processor(seed=1)
    config = tiny_config(tmp_path, per_device_train_batch_size=2, num_mini_batches=2, normalize_scores=True)
    trainer = PPOTrainer(config, processor, policy, train_dataset=colour_rows(8),
                         reward_fn=lambda completions, **kwargs: [-20.0 - 3.0 * i for i in range(len(completions))])
    first = trainer.generate_rollout(colour_rows(4))
    second = trainer.generate_rollout(colour_rows(4))

    raw = torch.tensor([-20.0, -23.0, -26.0, -29.0])
    torch.testing.assert_close(second.scores, raw)  # what the history reports
    seen = torch.cat([raw, raw])
    expected = (raw - seen.mean()) / seen.std(unbiased=False)
    last = second.response_mask.sum(1) - 1
    kl_part = (-config.kl_coef * second.kl)[torch.arange(4), last]
    torch.testing.assert_close(second.rewards[torch.arange(4), last], expected + kl_part)
    assert trainer.score_moments.count == 8
    assert first.rewards[torch.arange(4), first.response_mask.sum(1) - 1].abs().max() < 2.0


def test_several_responses_per_prompt_are_scored_against_their_siblings(tmp_path):
    policy, processor = build_tiny_model_and_processor(seed=1)
    config = tiny_config(tmp_path, per_device_train_batch_size=4, num_mini_batches=2, num_generations=4,
                         total_episodes=16)

    def length_plus_colour_bonus(completions, color, **kwargs):  # the bonus is the prompt's, not the answer's
        return [len(c[0]["content"]) + (10.0 if name == "red" else 0.0) for c, name in zip(completions, color)]

    trainer = PPOTrainer(config, processor, policy, reward_fn=length_plus_colour_bonus, train_dataset=colour_rows(2))
    encoded = []  # images per vision-tower call
    hooks = [vision_tower(model).register_forward_hook(lambda module, args, output: encoded.append(len(args[0])))
             for model in (trainer.policy, trainer.ref_policy, trainer.value_model)]
    rollout = trainer.generate_rollout(colour_rows(2))
    for hook in hooks:
        hook.remove()

    assert encoded and set(encoded) == {2}  # each prompt's image is encoded once, not once per response
    assert len(rollout) == 8  # 2 prompts x 4 responses, each prompt's responses consecutive with its image
    prompts = rollout.query_responses[:, : rollout.context_length]
    assert all(torch.equal(prompts[i], prompts[4 * (i // 4)]) for i in range(8))
    assert all(torch.equal(rollout.pixel_values[i], rollout.pixel_values[4 * (i // 4)]) for i in range(8))
    assert not torch.equal(rollout.pixel_values[0], rollout.pixel_values[4])
    lengths = torch.tensor([float(len(c)) for c in rollout.completions])
    torch.testing.assert_close(rollout.scores, lengths + torch.tensor([10.0] * 4 + [0.0] * 4))  # logged raw
    groups = lengths.view(2, 4)
    centred = (groups - (groups.sum(1, keepdim=True) - groups) / 3).flatten()
    assert centred.abs().sum() > 0  # the sampled answers differ in length
    last = rollout.response_mask.sum(1) - 1
    kl_part = (-config.kl_coef * rollout.kl)[torch.arange(8), last]
    torch.testing.assert_close(rollout.rewards[torch.arange(8), last], centred + kl_part)

    history = trainer.train()  # 16 responses = 2 updates of 2 prompts x 4 responses
    assert trainer.num_updates == 2 and [entry["episode"] for entry in history] == [8, 16]


@pytest.mark.parametrize("whiten", [True, False])
def test_advantages_are_gae_of_the_rewards_whitened_unless_switched_off(tmp_path, whiten):
    policy, processor = build_tiny_model_and_processor(seed=1)
    config = tiny_config(tmp_path, per_device_train_batch_size=2, num_mini_batches=2, whiten_advantages=whiten)
    trainer = PPOTrainer(config, processor, policy, reward_fn=make_half_vocab_reward(processor),
                         train_dataset=colour_rows(4))
    rollout = trainer.generate_rollout(colour_rows(4))

    gae, returns = compute_gae(rollout.rewards, rollout.values, rollout.response_mask, config.gamma, config.lam)
    expected = masked_whiten(gae, rollout.response_mask) if whiten else gae
    torch.testing.assert_close(rollout.advantages, expected)
    torch.testing.assert_close(rollout.returns, returns)


# ---------------------------------------------------------------------------------------------------------------------
# Pre-training term (PPO-ptx)
# ---------------------------------------------------------------------------------------------------------------------


def test_ptx_loss_is_added_to_the_gradient_with_its_coefficient(tmp_path):
    policy, processor = build_tiny_model_and_processor(seed=3)
    config = tiny_config(tmp_path, ptx_coef=0.5, ptx_batch_size=4, total_episodes=32)
    trainer = PPOTrainer(config, processor, policy, reward_fn=make_half_vocab_reward(processor),
                         train_dataset=colour_rows(16), ptx_dataset=sft_rows(8))
    rows = colour_rows(8)
    rollout = trainer.generate_rollout(rows)
    micro_batch = torch.arange(4)
    ptx_batch = trainer.next_ptx_batch()
    assert set(ptx_batch) == {"input_ids", "attention_mask", "pixel_values", "labels"}

    def policy_grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        trainer.model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    rl_loss, rl_stats = trainer.compute_loss(rollout, micro_batch)
    without = policy_grads(rl_loss)
    total_loss, stats = trainer.compute_loss(rollout, micro_batch, ptx_batch)
    with_ptx = policy_grads(total_loss)
    lm_loss = policy(**ptx_batch).loss
    lm = policy_grads(lm_loss)

    assert "loss/ptx_avg" not in rl_stats
    assert stats["loss/ptx_avg"] == pytest.approx(lm_loss.item())
    assert total_loss.item() == pytest.approx(rl_loss.item() + 0.5 * lm_loss.item(), rel=1e-5)
    assert set(with_ptx) == set(lm)
    for name, grad in with_ptx.items():
        torch.testing.assert_close(grad, without.get(name, torch.zeros_like(grad)) + 0.5 * lm[name],
                                   atol=1e-5, rtol=1e-4)

    history = trainer.train()
    assert all(entry["loss/ptx_avg"] > 0 for entry in history)


def test_ptx_coef_needs_pretraining_data(tmp_path):
    policy, processor = build_tiny_model_and_processor()
    with pytest.raises(ValueError, match="ptx_coef=0.1 needs a ptx_dataset"):
        PPOTrainer(tiny_config(tmp_path, ptx_coef=0.1), processor, policy, reward_fn=lambda **kw: [0.0],
                   train_dataset=colour_rows(16))


# ---------------------------------------------------------------------------------------------------------------------
# PEFT policy, adaptive KL, saving
# ---------------------------------------------------------------------------------------------------------------------


def test_lora_policy_uses_the_base_model_as_reference_and_saves_adapters(tmp_path):
    from peft import LoraConfig

    policy, processor = build_tiny_model_and_processor(seed=4)
    base = copy.deepcopy(policy.state_dict())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.w1|mlp\.w2)")
    config = tiny_config(tmp_path, adaptive_kl=True, kl_target=0.01, kl_horizon=100, kl_coef=0.1, total_episodes=16 * 3)
    trainer = PPOTrainer(config, processor, policy, reward_fn=make_half_vocab_reward(processor),
                         train_dataset=colour_rows(32), peft_config=lora)
    assert trainer.ref_policy is None
    assert trainer._feature_source["ref"] == "policy"  # adapters are only in the LLM: same image features

    history = trainer.train()

    peft_policy = trainer.policy
    merged_names = {n.replace("base_layer.", "") for n, _ in peft_policy.get_base_model().named_parameters()}
    with peft_policy.disable_adapter():
        state = {k.replace("base_layer.", ""): v for k, v in peft_policy.get_base_model().state_dict().items()
                 if "lora_" not in k}
    assert all(torch.equal(base[k], state[k]) for k in base if k in merged_names)  # base weights untouched
    lora_b = [p for n, p in peft_policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # adapters trained (lora_B starts at 0)
    # Adaptive KL (Ziegler et al.): after each update of 16 episodes,
    # beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * 16 / horizon.
    assert history[0]["kl_coef"] == pytest.approx(0.1)
    for before, after in zip(history, history[1:]):
        error = min(max(before["objective/kl"] / 0.01 - 1, -0.2), 0.2)
        assert after["kl_coef"] == pytest.approx(before["kl_coef"] * (1 + error * 16 / 100))
    # No KL at first (the adapters start as a no-op), then KL above the target.
    assert history[0]["kl_coef"] > history[1]["kl_coef"] < history[2]["kl_coef"]

    trainer.save_model(str(tmp_path / "adapter"))
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json"} <= saved


def test_saved_policy_reloads_with_auto_class(tmp_path):
    policy, processor = build_tiny_model_and_processor(seed=5)
    config = tiny_config(tmp_path, total_episodes=16)
    trainer = PPOTrainer(config, processor, policy, reward_fn=make_half_vocab_reward(processor),
                         train_dataset=colour_rows(16))
    trainer.train()
    trainer.save_model()

    reloaded = AutoModelForCausalLM.from_pretrained(config.output_dir, trust_remote_code=True)
    batch = processor(text=["Picture 1: <img></img>\nWhat colour?"], images=[[Image.new("RGB", (28, 28))]],
                      return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, policy.eval()(**batch).logits)
    assert reloaded.generation_config.eos_token_id == policy.generation_config.eos_token_id


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="temperature"):
        PPOConfig(temperature=0)
    with pytest.raises(ValueError, match="num_mini_batches"):
        PPOConfig(num_mini_batches=0)
    with pytest.raises(ValueError, match="reward_weights must be finite"):
        PPOConfig(reward_weights=[1.0, float("nan")])
    config = PPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=4, num_mini_batches=2,
                       total_episodes=100)
    assert config.local_batch_size == 16 and config.batch_size(world_size=2) == 32
    assert config.num_updates(dataset_size=10, world_size=2) == 4
    grouped = PPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=4, num_mini_batches=2,
                        num_generations=4)
    assert grouped.local_prompt_batch_size == 4 and grouped.local_batch_size == 16
    assert grouped.num_updates(dataset_size=10) == 3  # 10 prompts x 4 responses in updates of 16
    with pytest.raises(ValueError, match="num_generations=3 must divide the 4 responses"):
        PPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=1, num_mini_batches=2, num_generations=3)


def test_trainer_names_the_bad_row_and_field(tmp_path):
    policy, processor = build_tiny_model_and_processor()
    reward = make_half_vocab_reward(processor)
    config = tiny_config(tmp_path, per_device_train_batch_size=2, num_mini_batches=1)
    with pytest.raises(ValueError, match="pass a reward_model"):
        PPOTrainer(config, processor, policy, train_dataset=colour_rows(4))
    with pytest.raises(ValueError, match="2 weights for 1 reward callables"):
        PPOTrainer(tiny_config(tmp_path, per_device_train_batch_size=2, num_mini_batches=1, reward_weights=[1, 2]),
                   processor, policy, reward_fn=reward, train_dataset=colour_rows(4))
    with pytest.raises(ValueError, match="fewer than the 16 prompts"):
        PPOTrainer(tiny_config(tmp_path), processor, policy, reward_fn=reward, train_dataset=colour_rows(4))
    trainer = PPOTrainer(config, processor, policy, reward_fn=reward, train_dataset=colour_rows(4))
    with pytest.raises(ValueError, match="row 1: missing field 'prompt'"):
        trainer.generate_rollout([colour_rows(1)[0], {"images": []}])
    with pytest.raises(ValueError, match="row 0: field 'images' holds a str"):
        trainer.generate_rollout([{"prompt": "Hi", "images": ["cat.png"]}])
    with pytest.raises(ValueError, match="no reward function scored rows"):
        PPOTrainer(config, processor, policy, reward_fn=lambda completions, **kw: [None] * len(completions),
                   train_dataset=colour_rows(4)).generate_rollout(colour_rows(2))


# ---------------------------------------------------------------------------------------------------------------------
# examples/ppo.py
# ---------------------------------------------------------------------------------------------------------------------



def test_ppo_example_with_a_reward_model_task_rewards_and_ptx_writes_a_reloadable_policy(tmp_path):
    reward_model, processor = build_tiny_model_and_processor(seed=6, reward_model=True)
    reward_model.save_pretrained(tmp_path / "rm")
    processor.save_pretrained(tmp_path / "rm")
    out = tmp_path / "ppo"

    trainer = load_example("ppo").main(["--tiny", "--output_dir", str(out), "--reward_model_path", str(tmp_path / "rm"),
                                        "--task_rewards", "--reward_weights", "2", "0.5",
                                        "--ptx_coef", "0.5", "--total_episodes", "16", "--response_length", "6"])

    assert trainer.reward_model is not None
    assert [fn.__name__ for fn in trainer.reward_fns] == ["iou_reward", "exact_match_reward"]
    assert trainer.reward_weights == [2.0, 0.5]

    history = trainer.history
    assert len(history) == 2 and all(entry["loss/ptx_avg"] > 0 for entry in history)
    assert all(math.isfinite(entry["objective/kl"]) for entry in history)
    assert (out / "ppo_history.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    for name, tensor in trainer.policy.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)
    assert {"processor_config.json", "chat_template.jinja", "modeling_qwenvl.py"} <= {p.name for p in out.iterdir()}


@pytest.mark.slow
def test_ppo_example_runs_on_two_processes(tmp_path):
    """`accelerate launch` on two CPU processes (DDP over gloo): each rolls out its share of the 16 prompts of an
    update, statistics are reduced over both, and only the main process writes the policy."""
    out = tmp_path / "ppo"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(EXAMPLES / "accelerate_configs" / "ddp_cpu.yaml"), str(EXAMPLES / "ppo.py"), "--tiny", "--use_cpu",
               "--output_dir", str(out), "--ptx_coef", "0.5", "--total_episodes", "32", "--response_length", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]

    history = json.loads((out / "ppo_history.json").read_text())
    assert [entry["episode"] for entry in history] == [16, 32]  # 2 processes x 4 per-device x 2 mini-batches
    assert all(entry["loss/ptx_avg"] > 0 for entry in history)
    assert proc.stdout.count("update 2:") == 1  # the summary is printed by the main process only
    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
