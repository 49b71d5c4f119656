"""qwenvl: a Hugging Face-native Qwen-VL (remote-code model, processor, training, RLHF)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers import AutoModelForSequenceClassification

from .configuration_qwenvl import QwenVLConfig
from .modeling_qwenvl import (
    QwenVLForConditionalGeneration,
    QwenVLForSequenceClassification,
    QwenVLModel,
    QwenVLPreTrainedModel,
)

__version__ = "0.1.0"


def _register() -> None:
    """Register with the Auto classes (in-process) and as remote code (written into every saved folder)."""
    AutoConfig.register(QwenVLConfig.model_type, QwenVLConfig, exist_ok=True)
    for auto, cls in (
        (AutoModel, QwenVLModel),
        (AutoModelForCausalLM, QwenVLForConditionalGeneration),
        (AutoModelForImageTextToText, QwenVLForConditionalGeneration),
        (AutoModelForSequenceClassification, QwenVLForSequenceClassification),
    ):
        auto.register(QwenVLConfig, cls, exist_ok=True)
    QwenVLConfig.register_for_auto_class()
    QwenVLModel.register_for_auto_class("AutoModel")
    QwenVLForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
    QwenVLForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")


_register()

__all__ = [
    "QwenVLConfig",
    "QwenVLModel",
    "QwenVLPreTrainedModel",
    "QwenVLForConditionalGeneration",
    "QwenVLForSequenceClassification",
]
