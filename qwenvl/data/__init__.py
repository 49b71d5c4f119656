"""Dataset readers and writers."""

from .official import load_image, load_official_finetune_json, write_official_finetune_json


__all__ = ["load_official_finetune_json", "write_official_finetune_json", "load_image"]
