"""qwenvl: a Hugging Face-native Qwen-VL (remote-code model, processor, training, RLHF)."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_qwenvl import QwenVLConfig
from .convert import convert_official_checkpoint
from .data.official import load_official_finetune_json, write_official_finetune_json
from .grounding import draw_boxes, format_box, parse_boxes, parse_quads
from .image_processing_qwenvl import QwenVLImageProcessor
from .inference import response_boxes
from .modeling_qwenvl import (
    QwenVLCache,
    QwenVLForConditionalGeneration,
    QwenVLForLikelihoodReward,
    QwenVLForSequenceClassification,
    QwenVLModel,
    QwenVLPreTrainedModel,
)
from .processing_qwenvl import QwenVLProcessor
from .tokenization_qwenvl import QwenVLTokenizerFast, escape_special_tokens, train_tokenizer

__version__ = "0.1.0"


def _register() -> None:
    """Register with the Auto classes (in-process) and as remote code (written into every saved folder)."""
    AutoConfig.register(QwenVLConfig.model_type, QwenVLConfig, exist_ok=True)
    for auto, cls in (
        (AutoModel, QwenVLModel),
        (AutoModelForCausalLM, QwenVLForConditionalGeneration),
        (AutoModelForImageTextToText, QwenVLForConditionalGeneration),
        # Both score sequences; `config.architectures` picks the one a folder was saved from.
        (AutoModelForSequenceClassification, (QwenVLForSequenceClassification, QwenVLForLikelihoodReward)),
    ):
        auto.register(QwenVLConfig, cls, exist_ok=True)
    AutoTokenizer.register(QwenVLConfig, fast_tokenizer_class=QwenVLTokenizerFast, exist_ok=True)
    AutoImageProcessor.register(QwenVLConfig, image_processor_classes={"pil": QwenVLImageProcessor}, exist_ok=True)
    AutoProcessor.register(QwenVLConfig, QwenVLProcessor, exist_ok=True)
    QwenVLConfig.register_for_auto_class()
    QwenVLModel.register_for_auto_class("AutoModel")
    QwenVLForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
    QwenVLForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    # Only for saving: a likelihood reward model's folder maps the sequence-classification Auto class to its class.
    QwenVLForLikelihoodReward.register_for_auto_class("AutoModelForSequenceClassification")


_register()

__all__ = [
    "QwenVLTokenizerFast",
    "QwenVLImageProcessor",
    "QwenVLProcessor",
    "train_tokenizer",
    "escape_special_tokens",
    "load_official_finetune_json",
    "write_official_finetune_json",
    "parse_quads",
    "convert_official_checkpoint",
    "draw_boxes",
    "format_box",
    "parse_boxes",
    "response_boxes",
    "QwenVLConfig",
    "QwenVLModel",
    "QwenVLPreTrainedModel",
    "QwenVLForConditionalGeneration",
    "QwenVLForSequenceClassification",
    "QwenVLForLikelihoodReward",
    "QwenVLCache",
]
