"""Reinforcement learning for Qwen-VL: PPO math (`core`) and reward functions (`rewards`)."""

from .core import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    first_true_indices,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    truncate_after_eos,
    value_loss,
)
from .rewards import (
    RewardModelScorer,
    box_iou,
    exact_match_reward,
    iou_reward,
    make_reward_model_reward,
)


__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RewardModelScorer",
    "box_iou",
    "compute_gae",
    "compute_rewards",
    "entropy_from_logits",
    "exact_match_reward",
    "first_true_indices",
    "iou_reward",
    "kl_penalty",
    "logprobs_from_logits",
    "make_reward_model_reward",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "truncate_after_eos",
    "value_loss",
]
