"""Configuration of [`PPOTrainer`]: the field names of TRL's former `PPOConfig` (removed in TRL 1.13), plus PPO-ptx."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .core import KL_ESTIMATORS


@dataclass
class PPOConfig:
    """Hyper-parameters of PPO with a KL penalty and an optional pre-training loss (InstructGPT's PPO-ptx).

    Batch sizes follow TRL's former PPO: one *update* samples `local_batch_size = per_device_train_batch_size *
    gradient_accumulation_steps * num_mini_batches` responses per process (`batch_size` over all processes): that
    many prompts, or `1 / num_generations` as many with `num_generations` responses each; then it runs
    `num_ppo_epochs` passes over them, each split into `num_mini_batches` optimiser steps of
    `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` responses.

    The PPO defaults (`kl_coef`, `cliprange`, `cliprange_value`, `vf_coef`, `gamma`, `lam`, `num_ppo_epochs`,
    `response_length`, `temperature`) are those of TRL's former `PPOConfig`.
    """

    output_dir: str = "ppo-output"
    seed: int = 0

    # Optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    """Passed to `accelerate.Accelerator`: "no", "fp16" or "bf16"."""
    use_cpu: bool = False
    """Run on CPU even if an accelerator is present; with several processes this is DDP over gloo."""
    gradient_checkpointing: bool = False

    # Batches and length of training
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 8
    num_mini_batches: int = 1
    num_ppo_epochs: int = 4
    local_rollout_forward_batch_size: int = 16
    """Rows per generation / no-grad forward while collecting rollouts (bounds rollout memory)."""
    total_episodes: int | None = None
    """Responses sampled over the whole run; `None` means `num_train_epochs` passes over the prompt dataset (with
    `num_generations` responses per prompt)."""
    num_train_epochs: float = 1.0

    # Sampling
    response_length: int = 53
    """Maximum number of new tokens per response (`max_new_tokens`)."""
    temperature: float = 0.7
    num_generations: int = 1
    """Responses sampled per prompt in a rollout. With more than one, each response's score has the mean score of
    the prompt's other responses subtracted before anything else (leave-one-out baseline, `core.
    leave_one_out_baseline`): the advantage then compares answers to the same prompt instead of prompts, which a
    critic trained for a few updates cannot tell apart. Must divide the per-process batch size."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra chat-template variables for rendering prompts, e.g. `{"trusted_text": True}` when prompts carry grounding
    tags that the SFT data parsed (`<ref>the cat</ref>`)."""
    stop_token_ids: list[int] | None = None
    """Tokens that end a response; `None` uses the policy's `generation_config.eos_token_id` (`<|im_end|>` and
    `<|endoftext|>` for Qwen-VL-Chat)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of every response that hits `response_length` without a stop token."""

    # Rewards and KL
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    """Per-token KL estimate folded into the rewards: "k1" (`logp - ref_logp`) or "k3" (always >= 0)."""
    adaptive_kl: bool = False
    """Adapt `kl_coef` towards `kl_target` nats per response (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    kl_horizon: int = 10000
    whiten_rewards: bool = False
    dense_rewards: bool = False
    """Credit each response token with its own share of the reward model's score instead of putting the whole score on
    the last token. Needs a reward model that returns `token_rewards` (`QwenVLForLikelihoodReward`: `reward_scale x`
    the token's log-likelihood). A response's return is unchanged (the rest of its score, reward callables' and
    penalties included, stays on the last token); what changes is that GAE credits a token mostly for its own
    likelihood rather than for its whole answer's, e.g. one unlikely box digit rather than the other nineteen."""
    whiten_advantages: bool = True
    """Standardise the advantages of each rollout (TRL's former PPO always did). Whitening gives every rollout unit-
    scale advantages however little its rewards say: with `num_generations` > 1 and `normalize_scores` the advantages
    are on a unit scale already, and `False` leaves a prompt whose answers all scored alike with (almost) no push."""
    reward_weights: list[float] | None = None
    """Weight of each reward callable (`PPOTrainer(reward_fn=[...])`, in order) in the score; `None` weighs each 1. A
    reward model's score, when there is one too, is added with weight 1 (its scale is its own `reward_scale`)."""
    normalize_scores: bool = False
    """Standardise the reward model's scores with their running mean and std (over every rollout so far) before the
    KL penalty is added: returns then sit on a unit scale, where a critic starting at 0 begins close (scores of about
    -22 gave a value loss of ~135 that the critic did not reduce in the demo's 8 updates). The logged
    `objective/scores` stay raw."""

    # PPO losses
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95

    # Pre-training loss (PPO-ptx)
    ptx_coef: float = 0.0
    """Weight of the language-modelling loss of one pre-training / SFT batch added to every policy loss."""
    ptx_batch_size: int | None = None
    """Rows per pre-training batch; `None` uses `per_device_train_batch_size`."""

    # Logging and saving
    logging_steps: int = 1
    """Append the averaged statistics to `trainer.history` every this many updates."""
    report_to: list[str] = field(default_factory=list)
    """Accelerate trackers ("tensorboard", "wandb", ...) that also receive the statistics."""
    run_name: str = "ppo"
    save_steps: int | None = None
    """Save the policy to `output_dir/checkpoint-<update>` every this many updates; `None` never does."""

    def __post_init__(self) -> None:
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches",
                    "num_ppo_epochs", "local_rollout_forward_batch_size", "response_length", "logging_steps",
                    "num_generations")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be a positive integer, got {value!r}")
        if self.local_batch_size % self.num_generations:
            raise ValueError(f"PPOConfig.num_generations={self.num_generations} must divide the {self.local_batch_size} "
                             "responses of one update per process (per_device_train_batch_size x "
                             "gradient_accumulation_steps x num_mini_batches)")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"PPOConfig.kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r} "
                             f"(core.kl_penalty also knows {KL_ESTIMATORS})")
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0 (PPO samples its responses), got {self.temperature}")
        for name in ("kl_coef", "ptx_coef", "vf_coef", "cliprange", "cliprange_value"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"PPOConfig.gamma and lam must be in [0, 1], got {self.gamma} and {self.lam}")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0):
            raise ValueError("PPOConfig.kl_target and kl_horizon must be positive with adaptive_kl=True")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ValueError(f"PPOConfig.total_episodes must be positive, got {self.total_episodes}")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"PPOConfig.save_steps must be positive or None, got {self.save_steps}")
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
            if not all(math.isfinite(w) for w in self.reward_weights):
                raise ValueError(f"PPOConfig.reward_weights must be finite numbers, got {self.reward_weights}")
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]

    @property
    def local_mini_batch_size(self) -> int:
        """Rows per optimiser step on one process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def local_batch_size(self) -> int:
        """Responses rolled out per update on one process."""
        return self.local_mini_batch_size * self.num_mini_batches

    @property
    def local_prompt_batch_size(self) -> int:
        """Prompts rolled out per update on one process (each sampled `num_generations` times)."""
        return self.local_batch_size // self.num_generations

    def batch_size(self, world_size: int = 1) -> int:
        """Responses rolled out per update over all processes."""
        return self.local_batch_size * world_size

    def num_updates(self, dataset_size: int, world_size: int = 1) -> int:
        """PPO updates of the run: `total_episodes` (or the epochs over the dataset's prompts, `num_generations`
        responses each) divided by the batch size."""
        episodes = self.total_episodes or int(self.num_train_epochs * dataset_size) * self.num_generations
        return max(1, math.ceil(episodes / self.batch_size(world_size)))


__all__ = ["PPOConfig"]
