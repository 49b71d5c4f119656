"""`chat` / `batch_chat`: the original Qwen-VL-Chat call, with images as objects, batching and streaming.

Conversations are lists of messages (`{"role", "content"}`), content being a string or a list of
`{"type": "image", "image": <PIL | array | bytes>}` / `{"type": "text", "text": ...}` blocks. Images are encoded once:
the returned history keeps each image's features next to it (`"features"` in its block), so later turns reuse them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import TextIteratorStreamer

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def user_message(query: str, images: Sequence[Any] = ()) -> dict:
    """A user turn: its images first (rendered `Picture k: ...`, as the original), then the text."""
    return {"role": "user", "content": [*({"type": "image", "image": img} for img in images),
                                        {"type": "text", "text": query}]}


def _image_blocks(messages: list[dict]) -> list[dict]:
    return [block for message in messages if isinstance(message.get("content"), list)
            for block in message["content"] if block.get("type") == "image"]


def _template_view(messages: list[dict]) -> list[dict]:
    """The messages as the chat template sees them: image blocks reduced to `{"type": "image"}`."""
    view = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if b.get("type") == "image" else b for b in content]
        view.append({"role": message["role"], "content": content})
    return view


class _StopFilteringStreamer(TextIteratorStreamer):
    """Streams generated text without the stop tokens, as the non-streamed response is decoded."""

    def __init__(self, tokenizer, stop_ids: set[int], **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False, **kwargs)
        self.stop_ids = stop_ids
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:
            return super().put(value)
        ids = value.reshape(-1).tolist()
        kept = []
        for token in ids:
            if token in self.stop_ids:
                self.stopped = True
            if not self.stopped:
                kept.append(token)
        if kept:
            super().put(torch.tensor(kept))


class ChatStream:
    """Iterate for text deltas; once exhausted, `response` and `history` hold the full turn."""

    def __init__(self, deltas: Iterator[str]):
        self._deltas = deltas
        self.response: str | None = None
        self.history: list[dict] | None = None

    def __iter__(self) -> Iterator[str]:
        return self._deltas


class QwenVLChatMixin:
    """Mixed into `QwenVLForConditionalGeneration`."""

    def _stop_ids(self, tokenizer) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]

    def _encode_images(self, processor, blocks: list[dict]) -> None:
        """Attach `features` to every image block that has none (one ViT pass for all of them)."""
        todo = [b for b in blocks if "features" not in b]
        if not todo:
            return
        pixel_values = processor.image_processor([b["image"] for b in todo], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = self.get_image_features(pixel_values.to(self.device, self.dtype))
        for block, feature in zip(todo, features):
            block["features"] = feature

    def _prepare(self, processor, conversations: list[list[dict]], trusted_text: bool = False) -> dict:
        blocks = [block for conv in conversations for block in _image_blocks(conv)]
        self._encode_images(processor, blocks)
        texts = [processor.apply_chat_template(_template_view(conv), tokenize=False, add_generation_prompt=True,
                                               trusted_text=trusted_text) for conv in conversations]
        # Features are already computed, so the spans are expanded here and only the text is tokenised.
        if processor.num_image_tokens != self.config.num_image_tokens:
            raise ValueError(f"the processor expands images to {processor.num_image_tokens} tokens, the model "
                             f"expects {self.config.num_image_tokens} (visual.n_queries)")
        texts = [text.replace("<img></img>", processor.image_span) for text in texts]
        inputs = processor.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        if blocks:
            inputs["image_features"] = torch.stack([b["features"] for b in blocks]).to(self.device)
        return inputs

    def _generate_kwargs(self, tokenizer, generate_kwargs: dict) -> dict:
        kwargs = dict(generate_kwargs)
        kwargs.setdefault("eos_token_id", self._stop_ids(tokenizer))
        kwargs.setdefault("pad_token_id", tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        kwargs.setdefault("max_new_tokens", 512)
        return kwargs

    def _decode(self, tokenizer, ids: list[int]) -> str:
        stops = set(self._stop_ids(tokenizer))
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return tokenizer.decode(ids[:end], skip_special_tokens=False).strip()

    def chat(
        self,
        processor,
        query: str,
        images: Any = None,
        history: list[dict] | None = None,
        system: str | None = None,
        stream: bool = False,
        trusted_text: bool = False,
        **generate_kwargs,
    ) -> tuple[str, list[dict]] | ChatStream:
        """Answer `query` about `images` (objects, never paths read from text), continuing `history`.

        Returns `(response, history)` where history gains the user and assistant turns; with `stream=True`, a
        `ChatStream` yielding text deltas whose concatenation equals the non-streamed response. Special-token strings
        typed in the query stay plain text; `trusted_text=True` parses grounding tags (`<ref>`, `<box>`) in it, as the
        original grounding prompts need.
        """
        history = list(history or [])
        messages = ([{"role": "system", "content": system}] if system is not None and not history else []) + history
        messages.append(user_message(query, _as_list(images)))
        inputs = self._prepare(processor, [messages], trusted_text)
        kwargs = self._generate_kwargs(processor.tokenizer, generate_kwargs)
        prompt_length = inputs["input_ids"].shape[1]

        def finish(response: str) -> list[dict]:
            return messages + [{"role": "assistant", "content": response}]

        if not stream:
            output = self.generate(**inputs, **kwargs)
            response = self._decode(processor.tokenizer, output[0, prompt_length:].tolist())
            return response, finish(response)

        streamer = _StopFilteringStreamer(processor.tokenizer, set(self._stop_ids(processor.tokenizer)))
        thread = threading.Thread(target=self.generate, kwargs={**inputs, **kwargs, "streamer": streamer}, daemon=True)

        def deltas() -> Iterator[str]:
            thread.start()
            text, sent = "", 0
            for piece in streamer:
                text += piece
                visible = text.strip()  # a growing prefix: the same stripping as the non-streamed response
                if len(visible) > sent:
                    yield visible[sent:]
                    sent = len(visible)
            thread.join()
            chat_stream.response = text.strip()
            chat_stream.history = finish(chat_stream.response)

        chat_stream = ChatStream(deltas())
        return chat_stream

    def batch_chat(
        self,
        processor,
        queries: Sequence[str],
        images: Sequence[Any] | None = None,
        histories: Sequence[list[dict] | None] | None = None,
        system: str | None = None,
        trusted_text: bool = False,
        **generate_kwargs,
    ) -> tuple[list[str], list[list[dict]]]:
        """Many conversations in one left-padded `generate`; greedy results equal separate `chat` calls."""
        n = len(queries)
        images = list(images) if images is not None else [None] * n
        histories = list(histories) if histories is not None else [None] * n
        if not len(images) == len(histories) == n:
            raise ValueError(f"batch_chat got {n} queries, {len(images)} image entries and {len(histories)} histories")
        conversations = []
        for query, imgs, history in zip(queries, images, histories):
            history = list(history or [])
            messages = ([{"role": "system", "content": system}] if system is not None and not history else []) + history
            conversations.append(messages + [user_message(query, _as_list(imgs))])
        inputs = self._prepare(processor, conversations, trusted_text)
        output = self.generate(**inputs, **self._generate_kwargs(processor.tokenizer, generate_kwargs))
        prompt_length = inputs["input_ids"].shape[1]
        responses = [self._decode(processor.tokenizer, row[prompt_length:].tolist()) for row in output]
        return responses, [conv + [{"role": "assistant", "content": r}] for conv, r in zip(conversations, responses)]
