"""Convert an original Qwen/Qwen-VL(-Chat) snapshot into a hub-ready repository in this project's format.

The tensors are copied shard by shard (never the whole model in memory at once) into safetensors, under the same key
names: the layouts are identical, so the conversion is a change of container, config and code, not of weights.
Pickled `.bin` shards are read with `torch.load(weights_only=True)`, which refuses anything but tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .configuration_qwenvl import QwenVLConfig

PACKAGE_DIR = Path(__file__).resolve().parent
CHAT_EOS_TOKEN_IDS = [151643, 151645]  # <|endoftext|>, <|im_end|>


class ConversionError(ValueError):
    """The source snapshot cannot be converted; nothing was written to the destination."""


def _weight_files(src: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = src / index_name
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ConversionError(f"{index_path}: not a valid weight index ({err})") from err
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (src / f).exists()]
            if missing:
                raise ConversionError(f"{index_path} names shards that are not in {src}: {missing}")
            return [src / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).exists():
            return [src / single]
    raise ConversionError(f"{src}: no weights found (expected *.index.json with shards, model.safetensors or pytorch_model.bin)")


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # UnpicklingError and friends: the file holds more than tensors
        raise ConversionError(
            f"{path}: refused to load; it is not a plain tensor checkpoint (torch.load(weights_only=True) said: "
            f"{str(err).splitlines()[0]})"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a dict of tensors")
    return state


def _expected_shapes(config: QwenVLConfig) -> dict[str, tuple[int, ...]]:
    from .modeling_qwenvl import QwenVLForConditionalGeneration

    with torch.device("meta"):
        model = QwenVLForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shards(state_files: list[Path], max_shard_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Regroup the source tensors into shards of at most `max_shard_bytes` (a lone larger tensor gets its own)."""
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for path in state_files:
        for name, tensor in _load_shard(path).items():
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > max_shard_bytes:
                yield shard
                shard, size = {}, 0
            shard[name] = tensor.contiguous()
            size += nbytes
    if shard:
        yield shard


def _model_card(src_name: str, config: QwenVLConfig) -> str:
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
base_model: Qwen/{src_name}
tags:
- qwen-vl
- vision-language
- custom_code
---

# {src_name} (qwenvl format)

The original {src_name} weights, unchanged, repackaged as safetensors with transformers-5 remote code
(`qwenvl`). Images are passed as objects through the processor; the model never reads paths or URLs.

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
```

Architecture: ViT ({config.visual['layers']} layers, width {config.visual['width']}, {config.visual['image_size']} px) →
{config.visual['n_queries']}-query cross-attention adapter → Qwen LLM ({config.num_hidden_layers} layers, hidden
{config.hidden_size}). License: that of the original release (Tongyi Qianwen license).
"""


def _write_generation_config(src: Path, dst: Path) -> None:
    from transformers import GenerationConfig

    original = json.loads((src / "generation_config.json").read_text()) if (src / "generation_config.json").exists() else {}
    chat = original.get("chat_format", "chatml") == "chatml"
    eos = CHAT_EOS_TOKEN_IDS if chat else [original.get("eos_token_id", 151643)]
    GenerationConfig(
        eos_token_id=eos,
        pad_token_id=original.get("pad_token_id", 151643),
        do_sample=original.get("do_sample", True),
        top_p=original.get("top_p", 0.3),
        top_k=original.get("top_k", 0) or None,
        max_new_tokens=original.get("max_new_tokens", 512),
        chat_format=original.get("chat_format", "chatml"),
        max_window_size=original.get("max_window_size", 6144),
    ).save_pretrained(dst)


def _save_processor(src: Path, dst: Path, config: QwenVLConfig) -> bool:
    """Write tokenizer/processor files when the vocabulary is present and the processor code is available."""
    vocab = src / "qwen.tiktoken"
    if not vocab.exists():
        return False
    try:
        from .processing_qwenvl import QwenVLImageProcessor, QwenVLProcessor
        from .tokenization_qwenvl import QwenVLTokenizerFast
    except ImportError:
        return False
    tokenizer = QwenVLTokenizerFast.from_tiktoken(vocab)
    image_processor = QwenVLImageProcessor(size={"height": config.visual["image_size"], "width": config.visual["image_size"]})
    processor = QwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.visual["n_queries"])
    processor.save_pretrained(dst)
    return True


def convert_official_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, max_shard_size: str | int = "5GB") -> Path:
    """Convert the original snapshot folder `src` into a hub-ready folder `dst` and return `dst`.

    Checks every key and shape against the architecture before writing anything; missing or unexpected keys stop the
    conversion with their names. The output is written to a temporary sibling folder and moved into place at the end,
    so a failed conversion never leaves a half-written checkpoint.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src}: no config.json; pass the folder of an original Qwen-VL snapshot")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty; choose a new destination")
    config_dict = json.loads((src / "config.json").read_text())
    config = QwenVLConfig(**{k: v for k, v in config_dict.items() if k != "model_type"})
    config.architectures = ["QwenVLForConditionalGeneration"]

    weight_files = _weight_files(src)
    expected = _expected_shapes(config)
    found: dict[str, tuple[int, ...]] = {}
    for path in weight_files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            found.update({k: tuple(v.shape) for k, v in _load_shard(path).items()})
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        raise ConversionError(
            f"{src}: the weights do not match the architecture of its config.json. "
            f"missing keys: {missing[:20]}{' …' if len(missing) > 20 else ''}; "
            f"unexpected keys: {unexpected[:20]}{' …' if len(unexpected) > 20 else ''}; "
            f"wrong shapes: {[(k, found[k], expected[k]) for k in wrong[:20]]}"
        )

    from transformers.utils.hub import convert_file_size_to_int

    max_bytes = convert_file_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        names: list[tuple[str, list[str]]] = []
        total = 0
        # Stream: each shard is saved as soon as it is full (their count is unknown until the end → rename then).
        for i, shard in enumerate(_shards(weight_files, max_bytes)):
            name = f"model-{i + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            names.append((name, list(shard)))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        n = len(names)
        weight_map: dict[str, str] = {}
        if n == 1:
            os.replace(tmp / names[0][0], tmp / "model.safetensors")
        else:
            for i, (name, keys) in enumerate(names):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(tmp / name, tmp / final)
                weight_map.update({k: final for k in keys})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

        dtype = config_dict.get("torch_dtype") or config_dict.get("dtype")
        if dtype:
            config.dtype = dtype
        config.save_pretrained(tmp)
        for name in ("configuration_qwenvl.py", "modeling_qwenvl.py"):
            shutil.copy2(PACKAGE_DIR / name, tmp / name)
        _write_generation_config(src, tmp)
        _save_processor(src, tmp, config)
        (tmp / "README.md").write_text(_model_card(src.name or "Qwen-VL", config))
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
