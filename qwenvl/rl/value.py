"""Scalar heads on Qwen-VL for RL: reward models (one score per sequence) and value models (one value per token).

Both are `QwenVLForSequenceClassification` with `num_labels=1`: a reward model reads its `score` head at the last
attended token (the class's own `forward`), a PPO value model applies the same head to every position
([`per_token_values`]). So a value model can start as a copy of the reward model, as in InstructGPT.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..modeling_qwenvl import QwenVLForSequenceClassification


def sequence_classifier_from_causal_lm(
    model: nn.Module, num_labels: int = 1, zero_init_score: bool = False
) -> QwenVLForSequenceClassification:
    """A `QwenVLForSequenceClassification` whose backbone is a copy of `model`'s (an SFT policy) and whose `score`
    head is new.

    The classifier is built on the meta device and receives a deep copy of `model.transformer`, so the backbone is
    never allocated twice. `zero_init_score=True` starts every score at 0, which suits a value head (the first
    advantages are then the raw returns); otherwise the head gets the usual `normal(0, initializer_range)` init.
    For a checkpoint on disk, `AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
    trust_remote_code=True)` does the same.
    """
    backbone = getattr(model, "transformer", None)
    if backbone is None:
        raise ValueError(
            f"{type(model).__name__} has no `transformer` backbone; pass a Qwen-VL causal LM "
            "(QwenVLForConditionalGeneration), not a PEFT wrapper or another architecture"
        )
    config = copy.deepcopy(model.config)
    config.num_labels = num_labels
    with torch.device("meta"):
        classifier = QwenVLForSequenceClassification(config)
    classifier.transformer = copy.deepcopy(backbone)
    reference = next(backbone.parameters())
    classifier.score = nn.Linear(config.hidden_size, num_labels, bias=False, device=reference.device,
                                 dtype=reference.dtype)
    with torch.no_grad():
        if zero_init_score:
            classifier.score.weight.zero_()
        else:
            classifier.score.weight.normal_(mean=0.0, std=config.initializer_range)
    return classifier.train(model.training)


def vision_tower(model: nn.Module) -> nn.Module:
    """The `visual` module of a Qwen-VL model, also inside PEFT / DDP wrappers; calling it encodes `pixel_values`
    into image features exactly as `get_image_features` does."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "visual":
            return module
    raise ValueError(f"{type(model).__name__} has no `visual` vision tower; expected a Qwen-VL model")


def per_token_values(value_model: nn.Module, **inputs) -> torch.Tensor:
    """`(batch, length)` values: the value model's `score` head applied to the final hidden state of every token.

    `inputs` go to the backbone (`input_ids`, `attention_mask`, and `pixel_values` or precomputed `image_features`).
    The value model must have `num_labels=1`.
    """
    score = value_model.score
    if score.out_features != 1:
        raise ValueError(f"a value model needs num_labels=1, got a score head with {score.out_features} outputs")
    hidden = value_model.base_model(**inputs, use_cache=False).last_hidden_state
    return score(hidden.to(score.weight.dtype)).squeeze(-1)


__all__ = ["per_token_values", "sequence_classifier_from_causal_lm", "vision_tower"]
