"""PPO with images for Qwen-VL: KL-penalised rewards, GAE, clipped losses and InstructGPT's pre-training term.

TRL removed its `PPOTrainer` in 1.13 and never gave it images or a pre-training loss; this trainer keeps the shape of
that API (`PPOConfig`, `PPOTrainer(...).train()`, `save_model`) and adds both. One update:

1. *Rollout* (no gradients). A batch of prompts with their images is rendered with the chat template and encoded
   left-padded. Each model's vision tower runs once on the batch's `pixel_values`; the features are passed as
   `image_features=` to generation and to the policy, reference, value and reward forwards (frozen towers with equal
   weights share one encoding; a frozen tower's features are reused by the PPO epochs as well, a training tower
   re-encodes there to get gradients). Responses are sampled at `temperature` (image tags excluded), cut after the
   first stop token, and scored by the reward model (at the last response token) or by reward functions.
2. *Advantages.* Per-token rewards `-kl_coef * KL(policy || reference)` (k1 or k3) with the score (minus the
   missing-EOS penalty; with `num_generations` > 1 less the mean of the prompt's other responses' scores; optionally
   standardised by its running moments) on the last token, or, with `dense_rewards`, each token's share of a
   likelihood reward model's score on that token; optional reward whitening, GAE, whitened advantages
   (`whiten_advantages`).
3. *PPO epochs.* `num_ppo_epochs` shuffled passes in minibatches: clipped policy surrogate + `vf_coef` x clipped
   value loss + `ptx_coef` x the language-modelling loss of one batch of the pre-training (SFT) data.

The policy and the value model train together (one optimiser, one `accelerate`-prepared module), so the trainer
runs unchanged under `accelerate launch` on several processes; each process rolls out its own share of prompts.
The frozen reference is a copy of the policy, or the PEFT policy with its adapters disabled.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from transformers import GenerationConfig, get_scheduler

from .core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    leave_one_out_baseline,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    truncate_after_eos,
    value_loss,
)
from .ppo_config import PPOConfig
from .value import per_token_values, sequence_classifier_from_causal_lm, vision_tower


logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]
IMAGE_TAGS = ("<img>", "</img>", "<imgpad>")


def _disable_dropout(model: nn.Module) -> None:
    """PPO ratios compare two forwards of the same weights; dropout would make them differ at ratio 1."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _is_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def _same_frozen_tower(a: nn.Module, b: nn.Module) -> bool:
    """Whether two vision towers always give the same features: both frozen and with equal weights."""
    if not (_is_frozen(a) and _is_frozen(b)):
        return False
    if a is b:
        return True
    params_a, params_b = list(a.parameters()), list(b.parameters())
    return len(params_a) == len(params_b) and all(
        x.shape == y.shape and torch.equal(x, y.to(x.device)) for x, y in zip(params_a, params_b)
    )


def _image_rows(counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Indices of the images of `rows` in a batch whose row i owns `counts[i]` consecutive images."""
    starts = torch.cumsum(counts, 0) - counts
    pieces = [torch.arange(int(starts[r]), int(starts[r] + counts[r])) for r in rows.tolist()]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _embedded_images(messages: list[dict]) -> list[Any]:
    return [
        block["image"]
        for message in messages
        if isinstance(message.get("content"), list)
        for block in message["content"]
        if isinstance(block, dict) and block.get("type") == "image" and "image" in block
    ]


@dataclass
class Rollout:
    """One batch of sampled responses and everything the PPO epochs need, on one process.

    Tensors of shape `(batch, response_length)` are right-padded: `response_mask` is 1 up to and including the stop
    token. `features` maps "policy" / "value" to the image features of the batch (row-major, `image_counts[i]`
    images for row i) when that model's vision tower is frozen, so the PPO epochs do not encode images again.
    """

    query_responses: torch.Tensor
    attention_mask: torch.Tensor
    context_length: int
    responses: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    has_stop: torch.Tensor
    pixel_values: torch.Tensor | None
    image_counts: torch.Tensor
    features: dict[str, torch.Tensor | None]
    completions: list[str]

    def __len__(self) -> int:
        return self.responses.size(0)


class PolicyAndValueModel(nn.Module):
    """The two trained models as one module, so that `accelerate`/DDP sees one forward per micro-batch.

    `forward` returns the policy's logits on the last `logits_to_keep` positions, the per-token values, and the
    language-modelling loss of an optional pre-training batch (computed in the same forward for the same reason).
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(
        self,
        policy_inputs: dict[str, torch.Tensor],
        value_inputs: dict[str, torch.Tensor],
        logits_to_keep: int,
        ptx_inputs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits = self.policy(**policy_inputs, use_cache=False, logits_to_keep=logits_to_keep).logits
        values = per_token_values(self.value_model, **value_inputs)
        ptx_loss = self.policy(**ptx_inputs, use_cache=False).loss if ptx_inputs is not None else None
        return logits, values, ptx_loss


class PPOTrainer:
    """PPO-ptx for Qwen-VL on prompts with images.

    Args:
        config: a [`PPOConfig`].
        processor: the `QwenVLProcessor` shared by the policy, reference, value and reward models.
        policy: the SFT model (`QwenVLForConditionalGeneration`), trained in place.
        ref_policy: the frozen reference; `None` uses a frozen deep copy of `policy`, or, with `peft_config`, the
            policy with its adapters disabled.
        reward_model: a `QwenVLForSequenceClassification` with `num_labels=1` that scores prompt + response at the
            last response token, with the images, or a `QwenVLForLikelihoodReward`.
        reward_fn: a reward callable (or a list, summed with `config.reward_weights`) with the TRL calling convention
            of `qwenvl.rl.rewards`: `fn(prompts=messages, completions=[[{"role": "assistant", "content": text}]],
            completion_ids=..., **other_dataset_columns)`, returning one float (or `None`, "no opinion") per row. At
            least one of `reward_model` and `reward_fn` is required; with both, a response's score is the reward
            model's plus the weighted callables' (e.g. task correctness, `iou_reward` / `exact_match_reward`, which
            the reward model's preference pairs only approximate).
        value_model: the critic; `None` copies the reward model (or, with `reward_fn` or a likelihood reward model,
            builds one from the policy with a zero-initialised head). A critic created here trains its vision tower
            only if the policy does.
        train_dataset: prompt rows (`datasets.Dataset` or any sequence of dicts) with `prompt` (a user string or a
            list of messages), `images` (a list of image objects) or `image`, and any columns the reward functions
            read (`box`, `answer`, ...).
        ptx_dataset, ptx_collator: pre-training (SFT) rows and the collator that turns them into `input_ids`,
            `attention_mask`, `pixel_values` and `labels` (by default `qwenvl.train.QwenVLDataCollator`). Needed
            when `config.ptx_coef > 0`.
        peft_config: a PEFT config applied to the policy (the adapters are what is trained and saved).
    """

    def __init__(
        self,
        config: PPOConfig,
        processor: Any,
        policy: nn.Module,
        ref_policy: nn.Module | None = None,
        reward_model: nn.Module | None = None,
        reward_fn: RewardFn | Sequence[RewardFn] | None = None,
        value_model: nn.Module | None = None,
        train_dataset: Sequence[dict[str, Any]] | None = None,
        ptx_dataset: Sequence[Any] | None = None,
        ptx_collator: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
        peft_config: Any | None = None,
    ):
        if train_dataset is None:
            raise ValueError("PPOTrainer needs a train_dataset of prompt rows")
        if isinstance(reward_fn, (list, tuple)):
            reward_fns = list(reward_fn)
        else:
            reward_fns = [] if reward_fn is None else [reward_fn]
        if reward_model is None and not reward_fns:
            raise ValueError("pass a reward_model (a VLM reward model), reward_fn (reward callables), or both")
        if config.reward_weights is not None and len(config.reward_weights) != len(reward_fns):
            raise ValueError(f"PPOConfig.reward_weights has {len(config.reward_weights)} weights for "
                             f"{len(reward_fns)} reward callables")
        if ref_policy is not None and ref_policy is policy:
            raise ValueError("ref_policy must not be the policy itself; leave it None to get a frozen copy")
        if config.ptx_coef > 0 and ptx_dataset is None:
            raise ValueError(f"ptx_coef={config.ptx_coef} needs a ptx_dataset (pre-training / SFT rows)")
        if config.dense_rewards and reward_model is None:
            raise ValueError("dense_rewards=True spreads a reward model's score over the tokens: pass a reward_model "
                             "that returns token_rewards (QwenVLForLikelihoodReward)")
        if reward_model is not None and getattr(reward_model.config, "num_labels", None) != 1:
            raise ValueError(f"reward_model must have num_labels=1, got {reward_model.config.num_labels}")

        self.config = config
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.train_dataset = train_dataset
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            cpu=config.use_cpu,
            log_with=config.report_to or None,
            project_dir=config.output_dir,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        set_seed(config.seed)  # identical initial weights (new value heads) on every process

        # Models
        self.is_peft = peft_config is not None
        created_value_model = value_model is None
        if created_value_model:
            # Before PEFT wraps the policy, so that a critic built from it gets no adapter layers.
            # A reward model with a score head seeds the critic (InstructGPT); a likelihood reward model has none.
            value_model = (
                copy.deepcopy(reward_model).requires_grad_(True)
                if getattr(reward_model, "score", None) is not None
                else sequence_classifier_from_causal_lm(policy, zero_init_score=True)
            )
        if self.is_peft:
            from peft import get_peft_model

            policy = get_peft_model(policy, peft_config)
        elif ref_policy is None:
            ref_policy = copy.deepcopy(policy)
        if created_value_model and _is_frozen(vision_tower(policy)):
            vision_tower(value_model).requires_grad_(False)
        if ref_policy is not None:
            ref_policy.eval().requires_grad_(False)
        if reward_model is not None:
            reward_model.eval().requires_grad_(False)
        for model in (policy, ref_policy, reward_model, value_model):
            if model is not None:
                _disable_dropout(model)
        if config.gradient_checkpointing:
            policy.activation_checkpointing_enable()
            value_model.activation_checkpointing_enable()
            if self.is_peft:
                policy.enable_input_require_grads()
        self.ref_policy = ref_policy.to(self.accelerator.device) if ref_policy is not None else None
        self.reward_model = reward_model.to(self.accelerator.device) if reward_model is not None else None
        self.reward_fns = reward_fns
        self.reward_weights = config.reward_weights or [1.0] * len(reward_fns)
        self._feature_source = self._plan_image_features(policy, value_model)

        # Tokens
        generation_config = getattr(policy, "generation_config", None)
        stop_ids = config.stop_token_ids or getattr(generation_config, "eos_token_id", None)
        if stop_ids is None:
            raise ValueError("no stop token: set PPOConfig.stop_token_ids or policy.generation_config.eos_token_id")
        self.stop_token_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the processor's tokenizer has no pad token")
        # Image tags are never sampled: a generated `<img>` would open an image slot with no image.
        self.suppressed_token_ids = self.tokenizer.convert_tokens_to_ids(list(IMAGE_TAGS))
        self.generation_config = GenerationConfig(
            max_new_tokens=config.response_length,
            do_sample=True,
            temperature=config.temperature,
            top_k=0,
            top_p=1.0,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            suppress_tokens=self.suppressed_token_ids,
        )

        # Data
        world_size = self.accelerator.num_processes
        prompts_per_update = config.local_prompt_batch_size * world_size
        if len(train_dataset) < prompts_per_update:
            raise ValueError(
                f"train_dataset has {len(train_dataset)} rows, fewer than the {prompts_per_update} prompts of one "
                "update (per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches x processes "
                "/ num_generations)"
            )
        self.num_updates = config.num_updates(len(train_dataset), world_size)
        prompt_loader = DataLoader(
            range(len(train_dataset)), batch_size=config.local_prompt_batch_size, shuffle=True, drop_last=True,
            collate_fn=list,
        )
        ptx_loader = None
        if ptx_dataset is not None:
            if ptx_collator is None:
                ptx_collator = self._default_ptx_collator(processor)
            ptx_loader = DataLoader(
                ptx_dataset, batch_size=config.ptx_batch_size or config.per_device_train_batch_size, shuffle=True,
                drop_last=True, collate_fn=ptx_collator,
            )
            if len(ptx_loader) == 0:
                raise ValueError(f"ptx_dataset has {len(ptx_dataset)} rows, fewer than one pre-training batch")

        # Optimisation
        self.kl_ctl = (
            AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
            if config.adaptive_kl
            else FixedKLController(config.kl_coef)
        )
        self.score_moments = RunningMoments()
        model = PolicyAndValueModel(policy, value_model)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
            num_training_steps=self.num_updates,
        )
        if ptx_loader is not None:
            self.model, self.optimizer, self.prompt_loader, self.ptx_loader = self.accelerator.prepare(
                model, optimizer, prompt_loader, ptx_loader
            )
        else:
            self.model, self.optimizer, self.prompt_loader = self.accelerator.prepare(model, optimizer, prompt_loader)
            self.ptx_loader = None
        self._ptx_batches = self._cycle(self.ptx_loader) if self.ptx_loader is not None else None
        set_seed(config.seed + self.accelerator.process_index)  # different samples on each process

        self.history: list[dict[str, float]] = []
        self.episode = 0
        self.update = 0
        if config.report_to:
            self.accelerator.init_trackers(config.run_name, config={k: v for k, v in vars(config).items()
                                                                    if isinstance(v, (int, float, str, bool))})

    # ------------------------------------------------------------------------------------------------------------
    # Set-up helpers
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _default_ptx_collator(processor: Any) -> Callable:
        from ..train import QwenVLDataCollator  # imported on use: the training stack is not needed otherwise

        return QwenVLDataCollator(processor)

    def _plan_image_features(self, policy: nn.Module, value_model: nn.Module) -> dict[str, str]:
        """For each model, the model whose image features it reuses (itself when it must encode on its own)."""
        towers = {"policy": vision_tower(policy), "value": vision_tower(value_model)}
        if self.ref_policy is not None:
            towers["ref"] = vision_tower(self.ref_policy)
        elif not _is_frozen(towers["policy"]):
            # PEFT adapters inside the vision tower: the reference encodes with adapters disabled.
            towers["ref"] = None
        else:
            towers["ref"] = towers["policy"]
        if self.reward_model is not None:
            towers["reward"] = vision_tower(self.reward_model)
        source: dict[str, str] = {}
        for name, tower in towers.items():
            source[name] = next(
                (other for other in source if source[other] == other and tower is not None
                 and towers[other] is not None and _same_frozen_tower(tower, towers[other])),
                name,
            )
        return source

    @staticmethod
    def _cycle(loader: DataLoader) -> Iterator[Any]:
        while True:
            yield from loader

    @property
    def policy(self) -> nn.Module:
        """The policy being trained (unwrapped from DDP; a `PeftModel` with `peft_config`)."""
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).value_model

    @property
    def log_history(self) -> list[dict[str, float]]:
        """Same list as `history`, under the `Trainer.state` name."""
        return self.history

    # ------------------------------------------------------------------------------------------------------------
    # Prompts
    # ------------------------------------------------------------------------------------------------------------

    def _prompt_messages(self, row: dict[str, Any], index: int) -> tuple[list[dict], list[Any]]:
        """The row's prompt as chat messages with its images in `{"type": "image", "image": ...}` blocks."""
        from trl.data_utils import prepare_multimodal_messages

        if "prompt" not in row:
            raise ValueError(f"train_dataset row {index}: missing field 'prompt'")
        prompt = row["prompt"]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
            messages = list(prompt)
        else:
            raise ValueError(
                f"train_dataset row {index}: field 'prompt' must be a string or a list of messages, "
                f"got {type(prompt).__name__}"
            )
        images = row.get("images")
        if images is None and row.get("image") is not None:
            images = [row["image"]]
        images = list(images or [])
        for image in images:
            if not isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
                raise ValueError(
                    f"train_dataset row {index}: field 'images' holds a {type(image).__name__}; PPOTrainer takes "
                    "image objects (PIL, numpy or torch): load image files in the dataset first"
                )
        try:
            if _embedded_images(messages):
                if images:
                    raise ValueError("the prompt embeds images and the row also has an 'images' column")
            else:
                messages = prepare_multimodal_messages(messages, images=images)
        except ValueError as error:
            raise ValueError(f"train_dataset row {index}: {error}") from error
        return messages, _embedded_images(messages)

    def _encode_prompts(
        self, rows: list[dict[str, Any]], indices: list[int]
    ) -> tuple[dict, list[list[dict]], list[int]]:
        messages, images = [], []
        for row, index in zip(rows, indices):
            row_messages, row_images = self._prompt_messages(row, index)
            messages.append(row_messages)
            images.append(row_images)
        texts = [
            self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True,
                                               **self.config.chat_template_kwargs)
            for m in messages
        ]
        inputs = self.processor(
            text=texts, images=images if any(images) else None, padding=True, padding_side="left",
            return_tensors="pt",
        )
        return inputs, messages, [len(i) for i in images]

    # ------------------------------------------------------------------------------------------------------------
    # Rollout
    # ------------------------------------------------------------------------------------------------------------

    def _response_logprobs(self, logits: torch.Tensor, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities (and entropies) of the sampled tokens under the sampling distribution: logits of the
        positions before each response token, divided by the temperature, image tags excluded."""
        logits = logits[:, -responses.size(1) - 1 : -1] / self.config.temperature
        ids = torch.as_tensor(self.suppressed_token_ids, device=logits.device)
        logits = logits.index_fill(-1, ids, torch.finfo(logits.dtype).min)
        logprobs = logprobs_from_logits(logits, responses)
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        return logprobs, entropy

    def _image_inputs(self, name: str, rollout_features: dict, pixel_values, counts, rows) -> dict[str, torch.Tensor]:
        """`image_features` (reused) or `pixel_values` (encoded in the forward) for the images of `rows`."""
        if pixel_values is None:
            return {}
        index = _image_rows(counts, rows).to(pixel_values.device)
        if index.numel() == 0:
            return {}
        features = rollout_features.get(name)
        if features is not None:
            return {"image_features": features[index]}
        return {"pixel_values": pixel_values[index]}

    @torch.no_grad()
    def _encode_images(
        self, pixel_values: torch.Tensor | None, image_index: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Each vision tower's features for the rollout batch, encoded once and shared where towers are equal.
        `image_index` picks (and repeats) the result's rows, e.g. a prompt's images once per response."""
        features: dict[str, torch.Tensor | None] = {}
        if pixel_values is None:
            return features
        models = {"policy": self.policy, "value": self.value_model, "ref": self.ref_policy, "reward": self.reward_model}
        for name, source in self._feature_source.items():
            if source != name:
                features[name] = features[source]
                continue
            if name == "ref" and self.ref_policy is None:
                with self.policy.disable_adapter():
                    encoded = vision_tower(self.policy)(pixel_values)
            else:
                encoded = vision_tower(models[name])(pixel_values)
            features[name] = encoded if image_index is None else encoded[image_index]
        return features

    def _score_with_functions(
        self, rows: list[dict], messages: list[list[dict]], completions: list[str], responses: list[list[int]]
    ) -> torch.Tensor:
        """The weighted sum of the reward callables' values per row; a row that every callable leaves unscored
        (`None`) is an error unless the reward model scores it too."""
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
        total = np.zeros(len(rows))
        scored = np.zeros(len(rows), dtype=bool)
        for fn, weight in zip(self.reward_fns, self.reward_weights):
            values = fn(
                prompts=messages,
                completions=[[{"role": "assistant", "content": text}] for text in completions],
                completion_ids=responses,
                **columns,
            )
            name = getattr(fn, "__name__", type(fn).__name__)
            if len(values) != len(rows):
                raise ValueError(f"reward function {name} returned {len(values)} values for {len(rows)} rows")
            for i, value in enumerate(values):
                if value is not None:
                    if not math.isfinite(float(value)):
                        raise ValueError(f"reward function {name} returned {value} for row {i}")
                    total[i] += weight * float(value)
                    scored[i] = True
        if self.reward_model is None and not scored.all():
            raise ValueError(f"no reward function scored rows {np.flatnonzero(~scored).tolist()} (all returned None)")
        return torch.tensor(total, dtype=torch.float32, device=self.accelerator.device)

    @torch.no_grad()
    def generate_rollout(self, rows: list[dict[str, Any]], indices: list[int] | None = None) -> Rollout:
        """Sample `num_generations` responses for each of `rows` (prompt dataset rows; a prompt's responses are
        consecutive rows of the rollout) and compute log-probs, values, scores and advantages."""
        config, device = self.config, self.accelerator.device
        indices = list(range(len(rows))) if indices is None else indices
        inputs, messages, image_counts = self._encode_prompts(rows, indices)
        # Each prompt is rendered and its images encoded once, then repeated for its `num_generations` responses.
        prompt_of_row = torch.arange(len(rows)).repeat_interleave(config.num_generations)
        rows = [rows[i] for i in prompt_of_row.tolist()]
        messages = [messages[i] for i in prompt_of_row.tolist()]
        prompt_ids = inputs["input_ids"][prompt_of_row].to(device)
        prompt_mask = inputs["attention_mask"][prompt_of_row].to(device)
        pixel_values, features = None, {}
        if "pixel_values" in inputs:
            image_index = _image_rows(torch.tensor(image_counts), prompt_of_row).to(device)
            unique_pixel_values = inputs["pixel_values"].to(device)
            pixel_values = unique_pixel_values[image_index]
            features = self._encode_images(unique_pixel_values, image_index)
        counts = torch.tensor(image_counts)[prompt_of_row]
        context_length = prompt_ids.size(1)
        chunk = config.local_rollout_forward_batch_size
        batch_rows = torch.arange(len(rows))

        # Generation
        policy = self.policy
        policy.eval()
        sampled = []
        with self.accelerator.autocast():
            for start in range(0, len(rows), chunk):
                part = batch_rows[start : start + chunk]
                output = policy.generate(
                    input_ids=prompt_ids[part], attention_mask=prompt_mask[part],
                    **self._image_inputs("policy", features, pixel_values, counts, part),
                    generation_config=self.generation_config,
                )
                sampled.append(output[:, context_length:])
        width = max(s.size(1) for s in sampled)
        responses = torch.cat(
            [nn.functional.pad(s, (0, width - s.size(1)), value=self.pad_token_id) for s in sampled]
        )
        responses, response_mask = truncate_after_eos(responses, self.stop_token_ids, self.pad_token_id)
        response_mask = response_mask.long()
        has_stop = torch.isin(responses, torch.as_tensor(self.stop_token_ids, device=device)).any(-1)
        query_responses = torch.cat([prompt_ids, responses], 1)
        attention_mask = torch.cat([prompt_mask, response_mask], 1)

        # Forwards: policy and reference log-probs, values, reward-model scores
        self.model.train()
        logprobs, ref_logprobs, values, scores, token_rewards = [], [], [], [], []
        with self.accelerator.autocast():
            for start in range(0, len(rows), chunk):
                part = batch_rows[start : start + chunk]
                base = {"input_ids": query_responses[part], "attention_mask": attention_mask[part]}
                logits, value, _ = self.accelerator.unwrap_model(self.model)(
                    {**base, **self._image_inputs("policy", features, pixel_values, counts, part)},
                    {**base, **self._image_inputs("value", features, pixel_values, counts, part)},
                    logits_to_keep=width + 1,
                )
                logprobs.append(self._response_logprobs(logits, responses[part])[0])
                values.append(value[:, context_length - 1 : -1].float())
                ref_inputs = {**base, **self._image_inputs("ref", features, pixel_values, counts, part)}
                if self.ref_policy is not None:
                    ref_logits = self.ref_policy(**ref_inputs, use_cache=False, logits_to_keep=width + 1).logits
                else:
                    with policy.disable_adapter():
                        ref_logits = policy(**ref_inputs, use_cache=False, logits_to_keep=width + 1).logits
                ref_logprobs.append(self._response_logprobs(ref_logits, responses[part])[0])
                if self.reward_model is not None:
                    reward_inputs = {**base, **self._image_inputs("reward", features, pixel_values, counts, part)}
                    scored = self.reward_model(**reward_inputs, use_cache=False)
                    scores.append(scored.logits[:, 0].float())
                    if config.dense_rewards:
                        if scored.get("token_rewards") is None:
                            raise ValueError(f"dense_rewards=True needs token_rewards from the reward model; "
                                             f"{type(self.reward_model).__name__} returns none "
                                             "(QwenVLForLikelihoodReward does)")
                        token_rewards.append(scored.token_rewards[:, context_length:].float())
        logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)

        response_lists = [r[m.bool()].tolist() for r, m in zip(responses, response_mask)]
        stops = set(self.stop_token_ids)
        completions = [
            self.tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=False)
            for ids in response_lists
        ]
        scores = torch.cat(scores) if self.reward_model is not None else torch.zeros(len(rows), device=device)
        if self.reward_fns:
            scores = scores + self._score_with_functions(rows, messages, completions, response_lists)
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * (~has_stop).float()

        # Advantages
        reward_scores = scores  # `Rollout.scores` stays on the reward model's scale, for the logs
        if config.num_generations > 1:
            reward_scores = leave_one_out_baseline(scores, config.num_generations)
        if config.normalize_scores:
            self.score_moments.update(self.accelerator.gather(reward_scores))
            reward_scores = self.score_moments.normalize(reward_scores)
        dense = None
        if config.dense_rewards:  # each token's share on the token, the rest of the score on the last one
            dense = torch.cat(token_rewards) * response_mask
            if config.normalize_scores:
                dense = dense / self.score_moments.std
            reward_scores = reward_scores - dense.sum(1)
        rewards, kl = compute_rewards(
            reward_scores, logprobs, ref_logprobs, response_mask, self.kl_ctl.value, config.kl_estimator
        )
        if dense is not None:
            rewards = rewards + dense
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, response_mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, response_mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, response_mask)

        kept = {name: features.get(name) if _is_frozen(vision_tower(model)) else None
                for name, model in (("policy", policy), ("value", self.value_model))}
        return Rollout(
            query_responses=query_responses, attention_mask=attention_mask, context_length=context_length,
            responses=responses, response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
            values=values, scores=scores, kl=kl, rewards=rewards, advantages=advantages, returns=returns,
            has_stop=has_stop, pixel_values=pixel_values, image_counts=counts, features=kept,
            completions=completions,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Losses and updates
    # ------------------------------------------------------------------------------------------------------------

    def next_ptx_batch(self) -> dict[str, torch.Tensor] | None:
        """The next pre-training batch (cycling over `ptx_dataset`), or `None` when PPO-ptx is off."""
        if self._ptx_batches is None or self.config.ptx_coef == 0:
            return None
        batch = next(self._ptx_batches)
        if "labels" not in batch:
            raise ValueError("the ptx collator must return 'labels' (the language-modelling targets)")
        keys = ("input_ids", "attention_mask", "pixel_values", "labels")
        return {k: batch[k].to(self.accelerator.device) for k in keys if batch.get(k) is not None}

    def compute_loss(
        self, rollout: Rollout, rows: torch.Tensor, ptx_batch: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PPO loss of micro-batch `rows` of `rollout`: `pg + vf_coef * vf (+ ptx_coef * ptx_lm_loss)`.

        Returns the loss and detached statistics. `ptx_batch` (from [`next_ptx_batch`]) adds the pre-training term;
        its LM loss is a mean over its own supervised tokens, independent of the RL token count.
        """
        config = self.config
        mask = rollout.response_mask[rows]
        base = {"input_ids": rollout.query_responses[rows], "attention_mask": rollout.attention_mask[rows]}
        args = (rollout.features, rollout.pixel_values, rollout.image_counts, rows.cpu())
        logits, values, ptx_loss = self.model(
            {**base, **self._image_inputs("policy", *args)},
            {**base, **self._image_inputs("value", *args)},
            logits_to_keep=rollout.responses.size(1) + 1,
            ptx_inputs=ptx_batch,
        )
        logprobs, entropy = self._response_logprobs(logits, rollout.responses[rows])
        values = values[:, rollout.context_length - 1 : -1].float()
        pg_loss, pg_clipfrac, approx_kl = policy_loss(
            logprobs, rollout.logprobs[rows], rollout.advantages[rows], mask, config.cliprange
        )
        vf_loss, vf_clipfrac = value_loss(
            values, rollout.values[rows], rollout.returns[rows], mask, config.cliprange_value
        )
        loss = pg_loss + config.vf_coef * vf_loss
        if ptx_loss is not None:
            loss = loss + config.ptx_coef * ptx_loss
        with torch.no_grad():
            stats = {
                "policy/approxkl_avg": approx_kl,
                "policy/clipfrac_avg": pg_clipfrac,
                "policy/entropy_avg": masked_mean(entropy, mask),
                "loss/policy_avg": pg_loss.detach(),
                "loss/value_avg": vf_loss.detach(),
                "val/clipfrac_avg": vf_clipfrac,
                "val/ratio": masked_mean(torch.exp(logprobs - rollout.logprobs[rows]), mask),
            }
            if ptx_loss is not None:
                stats["loss/ptx_avg"] = ptx_loss.detach()
        return loss, stats

    def _ppo_epochs(self, rollout: Rollout) -> dict[str, float]:
        config = self.config
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.model.train()
        for _ in range(config.num_ppo_epochs):
            order = torch.randperm(len(rollout), device=rollout.responses.device)
            for mini_start in range(0, len(rollout), config.local_mini_batch_size):
                minibatch = order[mini_start : mini_start + config.local_mini_batch_size]
                for micro_start in range(0, len(minibatch), config.per_device_train_batch_size):
                    rows = minibatch[micro_start : micro_start + config.per_device_train_batch_size]
                    with self.accelerator.accumulate(self.model):
                        loss, micro_stats = self.compute_loss(rollout, rows, self.next_ptx_batch())
                        self.accelerator.backward(loss)
                        if self.accelerator.sync_gradients and config.max_grad_norm is not None:
                            self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    for key, value in micro_stats.items():
                        stats[key].append(value)
        return {key: torch.stack(values).mean() for key, values in stats.items()}

    def _rollout_stats(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        mask = rollout.response_mask.float()
        kl_sum = (rollout.kl * mask).sum(1)
        non_score = (-self.kl_ctl.value * rollout.kl * mask).sum(1)
        return {
            "objective/scores": rollout.scores.mean(),
            "objective/kl": kl_sum.mean(),
            "objective/entropy": (-rollout.logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (rollout.scores + non_score).mean(),
            "val/num_eos_tokens": rollout.has_stop.float().sum(),
            "response_length": mask.sum(1).mean(),
        }

    def step(self, rows: list[dict[str, Any]], indices: list[int] | None = None) -> dict[str, float]:
        """One PPO update on `rows` (this process's prompts, `num_generations` responses each): rollout, PPO epochs,
        KL controller, LR schedule."""
        rollout = self.generate_rollout(rows, indices)
        stats = {**self._rollout_stats(rollout), **self._ppo_epochs(rollout)}
        reduced = {}
        for key, value in stats.items():
            value = value.to(self.accelerator.device, torch.float32)
            op = "sum" if key == "val/num_eos_tokens" else "mean"
            reduced[key] = float(self.accelerator.reduce(value, reduction=op))
        batch_size = len(rollout) * self.accelerator.num_processes  # responses
        reduced["kl_coef"] = float(self.kl_ctl.value)
        self.kl_ctl.update(reduced["objective/kl"], batch_size)
        reduced["lr"] = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        self.update += 1
        self.episode += batch_size
        reduced["episode"] = self.episode
        reduced["update"] = self.update
        return reduced

    def train(self) -> list[dict[str, float]]:
        """Run `num_updates` PPO updates; returns `history`, the statistics logged every `logging_steps` updates."""
        config = self.config
        pending: dict[str, list[float]] = defaultdict(list)
        batches = self._cycle(self.prompt_loader)
        while self.update < self.num_updates:
            indices = next(batches)
            stats = self.step([self.train_dataset[i] for i in indices], indices)
            for key, value in stats.items():
                pending[key].append(value)
            if self.update % config.logging_steps == 0 or self.update == self.num_updates:
                entry = {key: float(np.mean(values)) for key, values in pending.items()}
                entry.update(episode=stats["episode"], update=stats["update"], kl_coef=stats["kl_coef"])
                self.history.append(entry)
                if self.accelerator.is_main_process:
                    logger.info("PPO update %d/%d: %s", self.update, self.num_updates,
                                ", ".join(f"{k}={v:.4g}" for k, v in entry.items()))
                if config.report_to:
                    self.accelerator.log(entry, step=self.update)
                pending.clear()
            if config.save_steps and self.update % config.save_steps == 0:
                self.save_model(os.path.join(config.output_dir, f"checkpoint-{self.update}"))
        if config.report_to:
            self.accelerator.end_training()
        return self.history

    def save_model(self, output_dir: str | None = None) -> None:
        """Save the policy and the processor as a folder `from_pretrained(..., trust_remote_code=True)` loads.

        With `peft_config` the folder holds the adapters (`AutoPeftModelForCausalLM` loads them).
        """
        output_dir = output_dir or self.config.output_dir
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.policy.save_pretrained(output_dir)
            self.processor.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()


__all__ = ["PPOTrainer", "PolicyAndValueModel", "Rollout"]
