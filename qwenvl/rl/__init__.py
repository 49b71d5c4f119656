"""Reinforcement learning for Qwen-VL: PPO math (`core`), reward functions (`rewards`), reward-model training on TRL
(`reward`), value heads (`value`) and the PPO-ptx trainer (`ppo_trainer`)."""

from .core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    first_true_indices,
    kl_penalty,
    leave_one_out_baseline,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    truncate_after_eos,
    value_loss,
)
from .ppo_config import PPOConfig
from .ppo_trainer import PolicyAndValueModel, PPOTrainer, Rollout
from .rewards import (
    RewardModelScorer,
    box_iou,
    exact_match_reward,
    iou_reward,
    make_reward_model_reward,
)
from .value import per_token_values, sequence_classifier_from_causal_lm, vision_tower


# The reward-model trainer subclasses TRL's RewardTrainer; importing TRL takes seconds, so it loads on first use.
_LAZY = {"QwenVLPreferenceCollator": ".reward", "QwenVLRewardTrainer": ".reward"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "PolicyAndValueModel",
    "PPOConfig",
    "PPOTrainer",
    "QwenVLPreferenceCollator",
    "QwenVLRewardTrainer",
    "RewardModelScorer",
    "Rollout",
    "box_iou",
    "compute_gae",
    "compute_rewards",
    "entropy_from_logits",
    "exact_match_reward",
    "first_true_indices",
    "iou_reward",
    "kl_penalty",
    "leave_one_out_baseline",
    "logprobs_from_logits",
    "make_reward_model_reward",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_values",
    "policy_loss",
    "sequence_classifier_from_causal_lm",
    "truncate_after_eos",
    "value_loss",
    "vision_tower",
]
