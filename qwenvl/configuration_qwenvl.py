"""Configuration of Qwen-VL (ViT-bigG → 256-query cross-attention adapter → Qwen LLM).

The field names are those of the original release's `config.json`, so a downloaded Qwen/Qwen-VL(-Chat) config loads
unchanged; every size is configurable so tests and demos can build tiny models of the same shape.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

VISUAL_DEFAULTS: dict[str, Any] = {
    "image_size": 448,
    "patch_size": 14,
    "width": 1664,
    "layers": 48,
    "heads": 16,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "image_start_id": 151857,
    "n_queries": 256,
}

AUTO_MAP = {
    "AutoConfig": "configuration_qwenvl.QwenVLConfig",
    "AutoModel": "modeling_qwenvl.QwenVLModel",
    "AutoModelForCausalLM": "modeling_qwenvl.QwenVLForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_qwenvl.QwenVLForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_qwenvl.QwenVLForSequenceClassification",
}


class QwenVLConfig(PreTrainedConfig):
    r"""Configuration of a Qwen-VL model.

    LLM fields keep the original names (`kv_channels`, `rotary_pct`, `no_bias`, `seq_length`, ...). Note that, as in the
    original, `intermediate_size` is twice the width of each MLP input projection (`w1`/`w2` are
    `hidden_size → intermediate_size // 2`).

    `visual` is a plain dict, as in the original, with the ViT shape (`image_size`, `patch_size`, `width`, `layers`,
    `heads`, `mlp_ratio`), the adapter width `output_dim` (= `hidden_size`), the number of learnable adapter queries
    `n_queries` (256 in the release) and `image_start_id`, the id of `<img>`; `</img>` and `<imgpad>` follow it.
    """

    model_type = "qwen_vl"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        kv_channels: int = 128,
        intermediate_size: int = 22016,
        layer_norm_epsilon: float = 1e-6,
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        seq_length: int = 2048,
        max_position_embeddings: int = 8192,
        no_bias: bool = True,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        use_flash_attn: bool | str = "auto",
        tie_word_embeddings: bool = False,
        visual: dict[str, Any] | None = None,
        pad_token_id: int | None = 151643,
        eos_token_id: int | list[int] | None = 151643,
        bos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.intermediate_size = intermediate_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.seq_length = seq_length
        self.max_position_embeddings = max_position_embeddings
        self.no_bias = no_bias
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.use_flash_attn = use_flash_attn
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id

        unknown = set(visual or {}) - set(VISUAL_DEFAULTS)
        if unknown:
            raise ValueError(f"QwenVLConfig.visual has unknown keys {sorted(unknown)}; known: {sorted(VISUAL_DEFAULTS)}")
        self.visual = {**VISUAL_DEFAULTS, **(visual or {})}

        # `image_token_id` is derived from `visual.image_start_id`, as in the original; accept it only when consistent.
        image_token_id = kwargs.pop("image_token_id", None)
        if image_token_id is not None and image_token_id != self.visual["image_start_id"] + 2:
            raise ValueError(
                f"image_token_id={image_token_id} disagrees with visual.image_start_id="
                f"{self.visual['image_start_id']} (<imgpad> is image_start_id + 2)"
            )
        # The release's config.json points at the original remote code; a saved QwenVLConfig must point at ours.
        auto_map = kwargs.pop("auto_map", None) or {}
        if any(not str(v).split("--")[-1].startswith(("configuration_qwenvl.", "modeling_qwenvl.")) for v in
               auto_map.values() if isinstance(v, str)):
            auto_map = {}
        self.auto_map = {**AUTO_MAP, **auto_map}
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.num_attention_heads * self.kv_channels != self.hidden_size:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) × kv_channels ({self.kv_channels}) must equal "
                f"hidden_size ({self.hidden_size})"
            )
        if self.intermediate_size % 2:
            raise ValueError(f"intermediate_size must be even (each MLP branch is half of it), got {self.intermediate_size}")
        v = self.visual
        if v["image_size"] % v["patch_size"]:
            raise ValueError(f"visual.image_size {v['image_size']} is not a multiple of patch_size {v['patch_size']}")
        if v["width"] % v["heads"]:
            raise ValueError(f"visual.width {v['width']} is not divisible by visual.heads {v['heads']}")
        if v["output_dim"] != self.hidden_size:
            raise ValueError(f"visual.output_dim {v['output_dim']} must equal hidden_size {self.hidden_size}")
        if v["output_dim"] % self.kv_channels:
            raise ValueError(f"visual.output_dim {v['output_dim']} is not divisible by kv_channels {self.kv_channels}")
        if int(v["n_queries"] ** 0.5) ** 2 != v["n_queries"]:
            raise ValueError(f"visual.n_queries must be a square number (a 2-D grid of queries), got {v['n_queries']}")

    @property
    def image_start_id(self) -> int:
        """Id of `<img>`."""
        return self.visual["image_start_id"]

    @property
    def image_end_id(self) -> int:
        """Id of `</img>`."""
        return self.visual["image_start_id"] + 1

    @property
    def image_token_id(self) -> int:
        """Id of `<imgpad>`, the placeholder each image's `n_queries` features replace (read by TRL)."""
        return self.visual["image_start_id"] + 2

    @property
    def num_image_tokens(self) -> int:
        return self.visual["n_queries"]

    @property
    def head_dim(self) -> int:
        return self.kv_channels


__all__ = ["QwenVLConfig"]
