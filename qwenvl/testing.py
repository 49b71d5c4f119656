"""Tiny, fully consistent model + processor pairs for tests, examples and smoke runs (no downloads)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .configuration_qwenvl import QwenVLConfig
from .image_processing_qwenvl import QwenVLImageProcessor
from .modeling_qwenvl import QwenVLForConditionalGeneration, QwenVLForSequenceClassification
from .processing_qwenvl import QwenVLProcessor
from .tokenization_qwenvl import QwenVLTokenizerFast, train_tokenizer

DEFAULT_CORPUS = (
    "Describe the image in English: a red circle and a blue square on a white background. "
    "What colour is the circle? red. How many objects are there? 2. Which digit is shown? 7. "
    "Where is the triangle? <ref>the green triangle</ref><box>(120,340),(560,910)</box> "
    "left right above below the a an is of in on and with There are objects shapes digits "
    "0123456789 yes no You are a helpful assistant. Picture 1: Generate the caption in English with grounding:"
)


def tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 600) -> QwenVLTokenizerFast:
    """A small BPE with Qwen-VL's pre-tokenizer and special tokens, trained in well under a second."""
    corpus = list(texts) if texts is not None else [DEFAULT_CORPUS] * 4
    return train_tokenizer(corpus, vocab_size=vocab_size)


def config_for_tokenizer(tokenizer: QwenVLTokenizerFast, image_size: int = 28, n_queries: int = 4,
                         **overrides) -> QwenVLConfig:
    """A tiny Qwen-VL config whose vocabulary and image-token ids match `tokenizer`."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    visual = dict(image_size=image_size, patch_size=14, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=64,
                  image_start_id=tokenizer.convert_tokens_to_ids("<img>"), n_queries=n_queries)
    visual.update(overrides.pop("visual", {}))
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  kv_channels=16, intermediate_size=128, seq_length=2048, visual=visual, pad_token_id=eos,
                  eos_token_id=eos)
    kwargs.update(overrides)
    return QwenVLConfig(**kwargs)


def processor_for_config(tokenizer: QwenVLTokenizerFast, config: QwenVLConfig) -> QwenVLProcessor:
    size = config.visual["image_size"]
    return QwenVLProcessor(
        image_processor=QwenVLImageProcessor(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        num_image_tokens=config.visual["n_queries"],
    )


def build_tiny_model_and_processor(
    seed: int = 0,
    texts: Iterable[str] | None = None,
    vocab_size: int = 600,
    reward_model: bool = False,
    **config_overrides,
) -> tuple[QwenVLForConditionalGeneration | QwenVLForSequenceClassification, QwenVLProcessor]:
    """(model, processor) for a ~0.2 M-parameter Qwen-VL with 28-px images and 4 image queries."""
    tokenizer = tiny_tokenizer(texts, vocab_size)
    config = config_for_tokenizer(tokenizer, **config_overrides)
    torch.manual_seed(seed)
    if reward_model:
        config.num_labels = 1
        model = QwenVLForSequenceClassification(config)
    else:
        model = QwenVLForConditionalGeneration(config)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
        generation_config.pad_token_id = config.pad_token_id
    return model.eval(), processor_for_config(tokenizer, config)


def tiny_run_paths(output_dir: str) -> tuple[str, str]:
    """The model and data folders `write_tiny_run` fills under `output_dir`."""
    import os

    return os.path.join(output_dir, "tiny-sft"), os.path.join(output_dir, "data")


def write_tiny_run_once(output_dir: str, state, overwrite: bool = True, **kwargs) -> tuple[str, str]:
    """`write_tiny_run` on the main process of an accelerate `state` while the others wait; returns the folders.

    With `overwrite=False` an existing tiny model is kept (a re-run into the same folder reuses it).
    """
    import os

    base, data = tiny_run_paths(output_dir)
    with state.main_process_first():
        if state.is_main_process and (overwrite or not os.path.isfile(os.path.join(base, "config.json"))):
            write_tiny_run(output_dir, **kwargs)
    return base, data


def write_tiny_run(output_dir: str, seed: int = 0, n_train: int = 8, n_val: int = 0, image_size: int = 32) -> tuple[str, str]:
    """Save a tiny random 'SFT' model + processor to `<output_dir>/tiny-sft` and synthetic data to `<output_dir>/data`.

    The `--tiny` smoke runs of the example scripts start from this; returns the two folders.
    """
    from .data.synthetic import generate_dataset

    base, data = tiny_run_paths(output_dir)
    model, processor = build_tiny_model_and_processor(seed=seed)
    model.save_pretrained(base)
    processor.save_pretrained(base)
    generate_dataset(data, n_train=n_train, n_val=n_val, n_test=0, image_size=image_size, seed=seed)
    return base, data
