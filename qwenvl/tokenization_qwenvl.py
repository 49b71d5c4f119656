"""Qwen-VL tokenizer: the original tiktoken vocabulary as a fast `tokenizers` tokenizer.

`QwenVLTokenizerFast.from_tiktoken("qwen.tiktoken")` reproduces the original `QWenTokenizer` id for id: byte-level
BPE with the original pre-tokenizer regex (every digit is its own token), NFC normalisation, and the 217 special
tokens appended right after the BPE ranks in the original order (`<|endoftext|>` 151643 … `<imgpad>` 151859).
`save_pretrained` writes `tokenizer.json`, so a saved tokenizer loads with `AutoTokenizer` without tiktoken.

Differences from the original, on purpose:
* Added tokens are matched on the raw text, before normalisation. The normaliser also deletes U+FDD0 (a Unicode
  noncharacter), which `escape_special_tokens` and the chat template insert after `<` so that special-token strings
  in untrusted text are encoded as the plain text they spell (the ids then equal the original's plain-text encoding).
* `<ref> </ref> <box> </box> <quad> </quad>` are added tokens but not *special* ones: `decode(...,
  skip_special_tokens=True)` keeps the grounding markup of a response (the original dropped it) and only removes
  the ChatML and image tokens.
* Image tags carry no path: an image is `<img>` + n_queries x `<imgpad>` + `</img>` and pixels travel separately.

This file is remote code: it imports only stdlib / tokenizers / transformers and must work copied flat next to a
checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.tokenization_utils_tokenizers import TokenizersBackend


if TYPE_CHECKING:
    from tokenizers import Tokenizer


__all__ = [
    "PAT_STR",
    "SPECIAL_TOKENS",
    "GROUNDING_TOKENS",
    "QwenVLTokenizerFast",
    "escape_special_tokens",
    "load_default_chat_template",
    "train_tokenizer",
]

# The original pre-tokenizer regex (tokenization_qwen.py): like cl100k but single digits (`\p{N}`, not `\p{N}{1,3}`).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_START = "<img>"
IMAGE_END = "</img>"
IMAGE_PAD = "<imgpad>"
GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")
# The original order; the ids follow the BPE ranks in exactly this order.
SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    *(f"<|extra_{i}|>" for i in range(205)),
    *GROUNDING_TOKENS,
    IMAGE_START,
    IMAGE_END,
    IMAGE_PAD,
)

# Inserted after "<" to stop the added-token matcher; the normaliser deletes it again before BPE.
ESCAPE_CHAR = "\ufdd0"

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def escape_special_tokens(text: str) -> str:
    """`text` with every special-token string neutralised, so that it is encoded as the plain text it spells.

    Use it for untrusted text that you put into a prompt by hand (the chat template does it for you). The result
    encodes to the same ids as the original tokenizer's plain-text encoding of `text`.
    """
    return text.replace("<", "<" + ESCAPE_CHAR)


def load_default_chat_template() -> str:
    """The ChatML template shipped next to this file (`chat_template.jinja`)."""
    path = Path(__file__).with_name(CHAT_TEMPLATE_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the default chat template ships with the qwenvl package; pass chat_template="
        )
    return path.read_text(encoding="utf-8")


def _read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a `.tiktoken` file ("base64(token) rank" per line) without tiktoken and without any download."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{path}: line {line_number}: expected 'base64_token rank', got {line[:80]!r}")
            try:
                token = base64.b64decode(fields[0], validate=True)
                rank = int(fields[1])
            except (binascii.Error, ValueError):
                raise ValueError(f"{path}: line {line_number}: bad token or rank field {line[:80]!r}") from None
            if token in ranks:
                raise ValueError(f"{path}: line {line_number}: token {token!r} is listed twice")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be exactly 0..{len(ranks) - 1} with no gaps or repeats")
    return ranks


class _TikTokenFileConverter(TikTokenConverter):
    """transformers' converter, reading the vocabulary file itself (tiktoken's reader would also fetch URLs)."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        return _read_tiktoken_ranks(tiktoken_url)


def _set_pipeline(tokenizer: Tokenizer) -> None:
    """The Qwen normaliser (escape removal, then NFC), pre-tokenizer regex, byte-level decoder and post-processor."""
    # `tokenizers` is only needed to build a tokenizer; loading a saved one goes through transformers.
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(ESCAPE_CHAR, ""), normalizers.NFC()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)


def _append_special_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """Append the special tokens right after the BPE vocabulary, in the original order."""
    from tokenizers import AddedToken

    base = tokenizer.get_vocab_size(with_added_tokens=False)
    for offset, content in enumerate(SPECIAL_TOKENS):
        token = AddedToken(content, normalized=False, special=content not in GROUNDING_TOKENS)
        # One at a time so that ids follow SPECIAL_TOKENS whatever the special flag.
        added = tokenizer.add_special_tokens([token]) if token.special else tokenizer.add_tokens([token])
        if added != 1 or tokenizer.token_to_id(content) != base + offset:
            raise ValueError(f"special token {content!r} collides with the BPE vocabulary")
    return tokenizer


def _default_init_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    kwargs.setdefault("eos_token", ENDOFTEXT)
    kwargs.setdefault("pad_token", ENDOFTEXT)
    kwargs.setdefault("model_max_length", 8192)
    # The byte-level decoder already restores the exact text; the "cleanup" would delete spaces before punctuation.
    kwargs.setdefault("clean_up_tokenization_spaces", False)
    if "chat_template" not in kwargs:
        kwargs["chat_template"] = load_default_chat_template()
    return kwargs


class QwenVLTokenizerFast(TokenizersBackend):
    """Fast (Rust `tokenizers`) Qwen-VL tokenizer; build it with `from_tiktoken` or load it with `from_pretrained`.

    eos and pad are `<|endoftext|>` as in the original; there is no BOS and nothing is added around a text.
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, **kwargs) -> QwenVLTokenizerFast:
        """Convert an original `qwen.tiktoken` file (no tiktoken needed). Extra kwargs go to the tokenizer init."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tiktoken vocabulary file not found: {path}")
        converter = _TikTokenFileConverter(vocab_file=os.fspath(path), pattern=PAT_STR)
        backend = converter.converted()
        _set_pipeline(backend)
        _append_special_tokens(backend)
        return cls(tokenizer_object=backend, **_default_init_kwargs(kwargs))

    @property
    def image_start_id(self) -> int:
        """Id of `<img>` (the model config's `visual["image_start_id"]`)."""
        return self.convert_tokens_to_ids(IMAGE_START)

    @property
    def image_token_id(self) -> int:
        """Id of `<imgpad>` (the model config's `image_token_id`)."""
        return self.convert_tokens_to_ids(IMAGE_PAD)


QwenVLTokenizerFast.register_for_auto_class("AutoTokenizer")


_SPECIAL_SPLIT_RE = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))


def _training_pieces(texts: Iterable[str]) -> Iterator[str]:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer: text {index} is {type(text).__name__}, expected str")
        # Special-token strings never reach BPE, so they must not take up merges.
        yield from (piece for piece in _SPECIAL_SPLIT_RE.split(text) if piece)


def train_tokenizer(texts: Iterable[str], vocab_size: int, **kwargs) -> QwenVLTokenizerFast:
    """Train a small byte-level BPE tokenizer with Qwen-VL's pre-tokenizer, normaliser and special tokens.

    `vocab_size` is the total size including the 217 special tokens, which take the last ids in the original
    relative order (so `<img>` is `len(tokenizer) - 3` and `<imgpad>` `len(tokenizer) - 1`). The 256 byte tokens are
    always present, so any text can be encoded; it needs `vocab_size >= 256 + 217`. If the corpus has fewer
    distinct merges than requested the vocabulary is smaller, never larger: size models with `len(tokenizer)`.
    Digits are single tokens (pre-tokenizer), so box coordinates split the same way as with the real vocabulary.
    Extra kwargs go to the tokenizer init.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    backend = Tokenizer(BPE(fuse_unk=False))
    _set_pipeline(backend)
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    backend.train_from_iterator(_training_pieces(texts), trainer=trainer)
    _append_special_tokens(backend)
    return QwenVLTokenizerFast(tokenizer_object=backend, **_default_init_kwargs(kwargs))
