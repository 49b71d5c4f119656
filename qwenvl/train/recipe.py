"""The pieces shared by `examples/pretrain.py`, `examples/sft.py` and `examples/sft_trl.py`.

Argument dataclasses for `HfArgumentParser` (next to `TrainingArguments`), model/processor loading (a saved qwenvl
folder, or `--tiny` for a from-scratch tiny model), LoRA/QLoRA wrapping, data preparation, and a `Trainer` that keeps
every checkpoint hub-ready: weights, config, code files, tokenizer, processor and chat template (saved by `Trainer`
because the processor is the `processing_class`) plus a model card written here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..image_processing_qwenvl import QwenVLImageProcessor
from ..modeling_qwenvl import QwenVLForConditionalGeneration
from ..processing_qwenvl import QwenVLProcessor
from ..tokenization_qwenvl import QwenVLTokenizerFast
from .collator import LABEL_MODES, QwenVLDataCollator
from .compile import compile_regions
from .data import caption_to_prompt_completion, load_rows, prepare_dataset
from .lora import lora_config, qlora_quantization_config
from .precision import slow_bf16_warning
from .stages import STAGES, ParameterTable, apply_stage, parameter_table

__all__ = [
    "DataArguments",
    "DatasetArguments",
    "HubReadyMixin",
    "LengthGroupedBatchOrder",
    "ModelArguments",
    "QwenVLTrainer",
    "build_collator",
    "build_datasets",
    "load_model_and_processor",
    "load_processor",
    "prepare_training_arguments",
    "render_model_card",
    "setup_trainable",
    "wrap_with_lora",
]

logger = logging.getLogger(__name__)

TINY_BASE_DIR = "tiny-base"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A qwenvl model folder or Hub repo (convert original releases with `qwenvl convert`)."},
    )
    tiny: bool = field(
        default=False,
        metadata={"help": "Build a tiny random Qwen-VL from scratch (saved to <output_dir>/tiny-base) to smoke-test."},
    )
    stage: str = field(
        default="chat-sft",
        metadata={"help": f"Which parameters train in full training: {', '.join(STAGES)} (LoRA trains its adapters)."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Dtype of the loaded weights; use --bf16 for mixed precision on fp32 weights.",
                  "choices": list(_DTYPES)},
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, flash_attention_2, ..."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Train at this image size (224 in the paper's stage 1); positions are interpolated."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of full weights."})
    q_lora: bool = field(default=False, metadata={"help": "QLoRA: LLM in 4-bit (bitsandbytes, CUDA); implies LoRA."})
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_resampler: bool = field(default=False, metadata={"help": "Also put LoRA on the resampler's linear layers."})
    lora_vit: bool = field(default=False, metadata={"help": "Also put LoRA on the ViT blocks."})
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full next to LoRA, e.g. wte lm_head for a base model."}
    )
    chunked_loss: bool = field(
        default=False,
        metadata={"help": "Compute the training loss without the (batch, length, vocab) logits, in chunks of labelled "
                          "positions (model.enable_chunked_loss): saves ~2.4 GB per 2,048-token sample at Qwen-VL's "
                          "vocabulary; the model then returns no logits while training."},
    )
    compile_regions: bool = field(
        default=False,
        metadata={"help": "torch.compile each transformer block and the loss (qwenvl.train.compile_regions); for "
                          "GPUs and fixed-size batches."},
    )


@dataclass
class DatasetArguments:
    data_path: str = field(
        default=None,
        metadata={"help": "Original finetune JSON, a JSON/JSONL of rows, a saved dataset folder or a Hub dataset."},
    )
    image_root: str | None = field(default=None, metadata={"help": "Folder of relative image paths (default: data's)."})
    eval_data_path: str | None = None
    dataset_split: str = "train"
    label_mode: str = field(default="assistant", metadata={"help": "Loss mask.", "choices": list(LABEL_MODES)})
    trusted_text: bool = field(default=True, metadata={"help": "Parse <ref>/<box> tags in user text (dataset files)."})
    drop_bad_rows: bool = field(default=False, metadata={"help": "Drop invalid rows (reported) instead of stopping."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows (quick runs)."})


@dataclass
class DataArguments(DatasetArguments):
    """`DatasetArguments` plus the sequence options that TRL's `SFTConfig` already has."""

    max_length: int | None = field(default=2048, metadata={"help": "Truncate longer samples (never through an image)."})
    pad_to_multiple_of: int | None = None


def prepare_training_arguments(training_args: TrainingArguments) -> TrainingArguments:
    """Settings every qwenvl run needs: keep the raw columns for the collator, and let DDP skip parameters a
    text-only batch does not use (the vision tower)."""
    training_args.remove_unused_columns = False
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True
    on_cpu = training_args.use_cpu or not torch.cuda.is_available()
    warning = slow_bf16_warning("cpu") if training_args.bf16 and on_cpu else None
    if warning:
        logger.warning("--bf16: %s", warning)
    return training_args


def _build_tiny(folder: Path, seed: int) -> None:
    from ..testing import build_tiny_model_and_processor

    model, processor = build_tiny_model_and_processor(seed=seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def load_processor(path: str | os.PathLike) -> QwenVLProcessor:
    """The processor saved in `path`, built from this package's classes (no code from the folder is executed)."""
    config_file = Path(path) / "processor_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found: {path} is not a qwenvl checkpoint (convert an original release with "
            "`qwenvl convert`)"
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    tokenizer = QwenVLTokenizerFast.from_pretrained(path)
    return QwenVLProcessor(
        image_processor=QwenVLImageProcessor.from_pretrained(path),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        num_image_tokens=config.get("num_image_tokens", 256),
    )


def load_model_and_processor(
    model_args: ModelArguments, training_args: TrainingArguments
) -> tuple[QwenVLForConditionalGeneration, QwenVLProcessor]:
    """Load (or, with `--tiny`, create once on the main process and then load) the model and processor."""
    if model_args.tiny == bool(model_args.model_name_or_path):
        raise ValueError("pass exactly one of --model_name_or_path and --tiny")
    path = model_args.model_name_or_path
    if model_args.tiny:
        path = os.path.join(training_args.output_dir, TINY_BASE_DIR)
        with training_args.main_process_first(local=False, desc="build tiny model"):
            if training_args.process_index == 0 and not os.path.isfile(os.path.join(path, "config.json")):
                _build_tiny(Path(path), training_args.seed)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[model_args.dtype]}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.q_lora:
        kwargs["quantization_config"] = qlora_quantization_config(
            torch.bfloat16 if training_args.bf16 or model_args.dtype == "bfloat16" else torch.float16
        )
        kwargs["device_map"] = {"": training_args.local_process_index}
    model = QwenVLForConditionalGeneration.from_pretrained(path, **kwargs)
    processor = load_processor(path)
    if model_args.image_size:
        processor.image_processor.size = {"height": model_args.image_size, "width": model_args.image_size}
    return model, processor


def wrap_with_lora(model: Any, model_args: ModelArguments, training_args: TrainingArguments) -> Any:
    """Apply PEFT LoRA (after `prepare_model_for_kbit_training` for QLoRA); returns the `PeftModel`."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if model_args.q_lora:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(training_args.activation_checkpointing),
            gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs,
        )
    config = lora_config(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        resampler=model_args.lora_resampler,
        vit=model_args.lora_vit,
        modules_to_save=model_args.lora_modules_to_save,
    )
    return get_peft_model(model, config)


def setup_trainable(
    model: Any, model_args: ModelArguments, training_args: TrainingArguments
) -> tuple[Any, ParameterTable]:
    """The chunked loss if asked, stage freezing for full training or LoRA wrapping, then regional compilation if
    asked; prints and returns the trainable-parameter table."""
    if model_args.chunked_loss:
        model.enable_chunked_loss()
    if model_args.use_lora or model_args.q_lora:
        model = wrap_with_lora(model, model_args, training_args)
        table = parameter_table(model, extra=("lora",))
        if training_args.process_index == 0:
            print(f"LoRA: trainable parameters per component\n{table}")
    else:
        table = apply_stage(model, model_args.stage, verbose=training_args.process_index == 0)
    if model_args.compile_regions:
        compile_regions(model)
    return model, table


def build_collator(
    processor: QwenVLProcessor,
    data_args: DatasetArguments,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> QwenVLDataCollator:
    """The collator for `data_args`; `max_length`/`pad_to_multiple_of` come from `DataArguments` when it has them."""
    if isinstance(data_args, DataArguments):
        max_length, pad_to_multiple_of = data_args.max_length, data_args.pad_to_multiple_of
    return QwenVLDataCollator(
        processor,
        label_mode=data_args.label_mode,
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        trusted_text=data_args.trusted_text,
    )


def _rows(path: str, data_args: DatasetArguments, captions: bool) -> Any:
    rows = load_rows(path, data_args.image_root, split=data_args.dataset_split)
    if data_args.max_samples is not None:
        rows = rows.select(range(min(data_args.max_samples, len(rows)))) if hasattr(rows, "select") else rows[
            : data_args.max_samples
        ]
    if captions:
        if hasattr(rows, "map"):
            rows = rows.map(caption_to_prompt_completion, remove_columns=rows.column_names)
        else:
            converted = []
            for index, row in enumerate(rows):
                try:
                    converted.append(caption_to_prompt_completion(row))
                except ValueError as error:
                    raise ValueError(f"{path}: row {index}: {error}") from None
            rows = converted
    return rows


def build_datasets(
    data_args: DatasetArguments, collator: QwenVLDataCollator, captions: bool = False
) -> tuple[Any, Any | None]:
    """Train (and eval) `datasets.Dataset`s, validated before training: bad rows stop the run with their index and
    reason, or are dropped with `--drop_bad_rows`. `captions=True` maps image–caption rows to prompt/completion."""
    if not data_args.data_path:
        raise ValueError("--data_path is required")
    train, report = prepare_dataset(_rows(data_args.data_path, data_args, captions), collator, data_args.drop_bad_rows)
    logger.info("training data: %s", report)
    evaluation = None
    if data_args.eval_data_path:
        evaluation, _ = prepare_dataset(
            _rows(data_args.eval_data_path, data_args, captions), collator, data_args.drop_bad_rows
        )
    return train, evaluation


# ----------------------------------------------------------------------------------------------------------------
# Hub-ready checkpoints
# ----------------------------------------------------------------------------------------------------------------

_STAGE_TEXT = {
    "pretrain": "stage 1, adapter pre-training (ViT and LLM frozen; resampler, ln_post and proj train)",
    "pretrain-paper": "stage 1 as in the paper (LLM frozen; ViT and adapter train)",
    "multitask": "stage 2, multi-task training (all parameters train)",
    "chat-sft": "chat fine-tuning (ViT frozen; resampler and LLM train, as the original finetune.py)",
}


def render_model_card(
    *,
    base_model: str | None,
    stage: str | None,
    label_mode: str,
    table: ParameterTable | None,
    training_args: TrainingArguments,
    data_path: str | None = None,
    lora: dict[str, Any] | None = None,
    trainer_name: str = "Trainer",
) -> str:
    """A model card (YAML front matter + Markdown) describing how the checkpoint was trained and how to load it."""
    hub_base = base_model if base_model and _HUB_ID.fullmatch(base_model) and not os.path.isdir(base_model) else None
    tags = ["qwen-vl", "vision-language", "custom_code", "qwenvl"] + (["lora"] if lora else [])
    front = ["---", "library_name: " + ("peft" if lora else "transformers"), "pipeline_tag: image-text-to-text"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front += ["tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    world = max(training_args.world_size, 1)
    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    scheduler = training_args.lr_scheduler_type
    precision = "bf16 mixed" if training_args.bf16 else "fp16 mixed" if training_args.fp16 else "fp32"
    body = [
        f"# {Path(training_args.output_dir).name}",
        "",
        f"Qwen-VL trained with the `qwenvl` package ({trainer_name}), "
        + (f"{_STAGE_TEXT.get(stage, stage)}." if stage and not lora else "LoRA adapters (PEFT)."),
        "",
        "## Training",
        "",
        f"- base model: `{base_model or 'unknown'}`",
        f"- data: `{data_path or 'unknown'}`",
        (f"- loss: next-token cross-entropy on responses only (label mode `{label_mode}`), normalised by the "
         "number of supervised tokens across gradient accumulation"),
        (f"- learning rate {training_args.learning_rate}, {getattr(scheduler, 'value', scheduler)} schedule, "
         f"global batch {global_batch} ({world} process(es) x {training_args.per_device_train_batch_size} x "
         f"{training_args.gradient_accumulation_steps} accumulation), {precision}"),
    ]
    if lora:
        body.append(f"- LoRA: {', '.join(f'{k}={v}' for k, v in lora.items())}")
    if table is not None:
        body += ["", "Trainable parameters:", "", "```", str(table), "```"]
    loader = "AutoPeftModelForCausalLM" if lora else "AutoModelForCausalLM"
    module = "peft" if lora else "transformers"
    body += [
        "",
        "## Usage",
        "",
        "```python",
        f"from {module} import {loader}",
        "from transformers import AutoProcessor",
        "",
        f'model = {loader}.from_pretrained("<this folder or repo>", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained("<this folder or repo>", trust_remote_code=True)',
        'response, history = model.chat(processor, "What is in the picture?", images=[image])',
        "```",
        "",
    ]
    return "\n".join(front + body)


class HubReadyMixin:
    """Writes the model card into every checkpoint and into `output_dir` (so `push_to_hub` uploads it), and copies
    the remote-code files next to the weights that intermediate pushes (`hub_strategy="every_save"`) upload."""

    def __init__(self, *args, model_card: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_card = dict(model_card or {})
        self.add_callback(_ModelCardCallback(self))

    def _model_card_text(self) -> str:
        card = {"base_model": None, "stage": None, "label_mode": "assistant", "table": None, **self.model_card}
        return render_model_card(training_args=self.args, trainer_name=type(self).__name__, **card)

    def write_model_card(self, folder: str | os.PathLike) -> None:
        if self.is_world_process_zero():
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "README.md").write_text(self._model_card_text(), encoding="utf-8")

    def create_model_card(self, *args, **kwargs) -> None:
        self.write_model_card(self.args.output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self.is_world_process_zero():
            for code_file in Path(checkpoint_folder).glob("*.py"):
                shutil.copy(code_file, Path(self.args.output_dir) / code_file.name)
            self.write_model_card(self.args.output_dir)
        super()._push_from_checkpoint(checkpoint_folder)


class _ModelCardCallback(TrainerCallback):
    def __init__(self, trainer: HubReadyMixin):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.trainer.write_model_card(folder)
        return control


class QwenVLTrainer(HubReadyMixin, Trainer):
    """`transformers.Trainer` whose checkpoints are hub-ready (model card included).

    `train_sampling_strategy="group_by_length"` also works on chat rows (messages and images, no `input_ids`): the
    lengths come from the collator's own encoding, image tokens included. Mixed tasks differ in length by 3× (a VQA
    answer vs a grounded caption), so random batches are mostly padding.
    """

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if (
            self.args.train_sampling_strategy == "group_by_length"
            and dataset is not None
            and hasattr(dataset, "__len__")
            and not _has_length_source(dataset, self.args.length_column_name)
            and hasattr(self.data_collator, "encode")
        ):
            lengths = [
                len(self.data_collator.encode(dataset[index], where=f"train row {index}").input_ids)
                for index in range(len(dataset))
            ]
            generator = torch.Generator().manual_seed(self.args.data_seed or self.args.seed)
            return LengthGroupedBatchOrder(
                lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps, generator
            )
        return super()._get_train_sampler(train_dataset)


class LengthGroupedBatchOrder(torch.utils.data.Sampler):
    """Indices such that consecutive runs of `batch_size` have similar lengths, the batches in random order.

    Each epoch: shuffle, cut into windows of 50 batches, sort each window by length, split it into batches and
    shuffle the batches. Unlike `transformers`' `LengthGroupedSampler` (long to short inside each window), the task
    mix stays uniform over steps: sorted windows would train ~12 steps of grounded captions, then captions, then VQA.
    """

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, window: int = 50):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.window = window * batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=self.lengths.__getitem__)
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        # Only the last window can leave a short batch; it stays last so the DataLoader's cuts meet the batches.
        short = batches.pop() if batches and len(batches[-1]) < self.batch_size else []
        for batch in torch.randperm(len(batches), generator=self.generator).tolist():
            yield from batches[batch]
        yield from short


def _has_length_source(dataset: Any, length_column: str) -> bool:
    """Whether `Trainer` can find lengths itself: a length column, or `input_ids` in the rows."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        return length_column in columns or "input_ids" in columns
    first = dataset[0] if len(dataset) else {}
    return isinstance(first, dict) and "input_ids" in first


def shutdown_distributed() -> None:
    """Tear down the process group at the end of a script launched with `accelerate launch`.

    Left to interpreter exit, gloo's threads can be destroyed while still joinable, and a rank aborts with
    "terminate called without an active exception" after training has finished and saved.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
