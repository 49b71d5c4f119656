"""Inference: `chat`, `batch_chat`, streaming, boxes in pixel space, and the `qwenvl chat` command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.inference import response_boxes
from qwenvl.testing import build_tiny_model_and_processor

GREEDY = dict(max_new_tokens=12, do_sample=False)
GROUNDING_ANSWER = "<ref>the red square</ref><box>(250,500),(750,900)</box>"


def picture(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model_and_processor(seed=3)


def test_batch_chat_equals_separate_chat_calls(tiny):
    model, processor = tiny
    _, earlier = model.chat(processor, "What colour is the circle?", images=[picture(0)], **GREEDY)
    queries = ["How many objects are there?", "Which digit is shown?", "Describe the image in English:",
               "Is the triangle left of the circle? Answer yes or no."]
    images = [[picture(1)], [picture(2), picture(3)], None, [picture(4, size=(90, 20))]]
    histories = [None, None, None, earlier]
    responses, new_histories = model.batch_chat(processor, queries, images=images, histories=histories, **GREEDY)
    for i in range(4):
        alone, alone_history = model.chat(processor, queries[i], images=images[i], history=histories[i], **GREEDY)
        assert responses[i] == alone
        assert new_histories[i][-1] == {"role": "assistant", "content": alone}
    assert len(new_histories[3]) == len(earlier) + 2


def test_history_turns_give_the_ids_of_the_whole_conversation(tiny, monkeypatch):
    model, processor = tiny
    seen = []
    generate = model.generate

    def recording_generate(**kwargs):
        seen.append(kwargs["input_ids"].clone())
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    images = [picture(5), picture(6)]
    _, history = model.chat(processor, "What colour is the circle?", images=images, **GREEDY)
    _, history = model.chat(processor, "And the square?", history=history, **GREEDY)
    _, history = model.chat(processor, "Compare with this one.", images=[picture(7)], history=history, **GREEDY)

    messages = [
        {"role": m["role"], "content": [{k: v for k, v in block.items() if k != "features"} for block in m["content"]]
         if isinstance(m["content"], list) else m["content"]}
        for m in history[:-1]
    ]
    expected = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")
    assert torch.equal(seen[-1], expected["input_ids"])
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("Picture 1: <img></img>") == 2 and text.count("Picture 2: <img></img>") == 1
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


def test_history_images_are_encoded_once(tiny, monkeypatch):
    model, processor = tiny
    calls = []
    encode = model.get_image_features
    monkeypatch.setattr(model, "get_image_features", lambda pv: calls.append(pv.shape[0]) or encode(pv))
    _, history = model.chat(processor, "What colour?", images=[picture(8), picture(9)], **GREEDY)
    model.chat(processor, "And now?", history=history, **GREEDY)
    assert calls == [2]


def test_streamed_response_equals_the_plain_response(tiny):
    model, processor = tiny
    kwargs = dict(images=[picture(10)], max_new_tokens=24, do_sample=False)
    response, history = model.chat(processor, "Describe the image in English:", **kwargs)
    stream = model.chat(processor, "Describe the image in English:", stream=True, **kwargs)
    deltas = list(stream)
    assert "".join(deltas) == response == stream.response
    assert stream.history[-1]["content"] == response


def test_chat_accepts_arrays_and_bytes(tiny):
    import io

    model, processor = tiny
    buffer = io.BytesIO()
    picture(11).save(buffer, format="PNG")
    array = np.asarray(picture(11))
    from_bytes, _ = model.chat(processor, "What colour?", images=[buffer.getvalue()], **GREEDY)
    from_array, _ = model.chat(processor, "What colour?", images=[array], **GREEDY)
    from_pil, _ = model.chat(processor, "What colour?", images=[picture(11)], **GREEDY)
    assert from_bytes == from_array == from_pil


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (1000, 1000), (57, 33)])
def test_response_boxes_map_to_the_pixels_of_the_users_image(size):
    width, height = size
    boxes = response_boxes(GROUNDING_ANSWER, Image.new("RGB", size))
    assert [ref for ref, _ in boxes] == ["the red square"]
    x1, y1, x2, y2 = boxes[0][1]
    expected = (0.2505 * width, 0.5005 * height, 0.7505 * width, 0.9005 * height)  # cell centres, scale 1000
    assert np.allclose((x1, y1, x2, y2), expected, atol=1e-6)
    assert response_boxes(GROUNDING_ANSWER, np.zeros((height, width, 3), np.uint8)) == boxes
    assert response_boxes(GROUNDING_ANSWER, (width, height)) == boxes
    evaluation = response_boxes(GROUNDING_ANSWER, (width, height), scale=999)[0][1]  # the original RefCOCO scale
    assert np.allclose(evaluation, (250 / 999 * width, 500 / 999 * height, 750 / 999 * width, 900 / 999 * height))


# ------------------------------------------------------------------------------------------------------------
# The command line, on a saved tiny model taught one grounding answer
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grounding_model_dir(tmp_path_factory):
    """A tiny model overfitted to answer GROUNDING_ANSWER, saved with its processor as a hub-ready folder."""
    model, processor = build_tiny_model_and_processor(seed=4)
    image = picture(12)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the red square?"}]},
                {"role": "assistant", "content": GROUNDING_ANSWER}]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text], images=[[image]], return_tensors="pt")
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = processor(text=[prompt], images=[[image]], return_tensors="pt")["input_ids"].shape[1]
    labels = batch["input_ids"].clone()
    labels[:, :n_prompt] = -100
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    model.eval()
    folder = tmp_path_factory.mktemp("grounding_model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image.save(folder / "picture.png")
    return folder


def run_cli(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenvl.cli", "chat", *args], capture_output=True, text=True,
                          input=input_text, timeout=300)


def test_cli_answers_a_question_and_draws_the_boxes(grounding_model_dir, tmp_path):
    out = tmp_path / "boxes.png"
    result = run_cli("--model", str(grounding_model_dir), "--image", str(grounding_model_dir / "picture.png"),
                     "--draw", str(out), "Where is the red square?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == GROUNDING_ANSWER
    drawn = Image.open(out)
    assert drawn.size == Image.open(grounding_model_dir / "picture.png").size
    assert np.asarray(drawn.convert("RGB")).tolist() != np.asarray(Image.open(grounding_model_dir / "picture.png")
                                                                    .convert("RGB")).tolist()


def test_cli_interactive_session_streams_several_turns(grounding_model_dir):
    result = run_cli("--model", str(grounding_model_dir), "--image", str(grounding_model_dir / "picture.png"),
                     input_text="Where is the red square?\nAnd again?\n:q\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 2
    assert GROUNDING_ANSWER in result.stdout


def test_cli_reports_a_missing_or_unreadable_image_in_one_line(grounding_model_dir, tmp_path):
    missing = run_cli("--model", str(grounding_model_dir), "--image", str(tmp_path / "nope.png"), "Hi")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "not found" in missing.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    unreadable = run_cli("--model", str(grounding_model_dir), "--image", str(broken), "Hi")
    assert unreadable.returncode == 2 and unreadable.stderr.strip().count("\n") == 0
    assert "cannot read image" in unreadable.stderr


def test_transformers_pipeline_runs_a_saved_checkpoint(grounding_model_dir):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(grounding_model_dir), trust_remote_code=True)
    image = Image.open(grounding_model_dir / "picture.png").convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Where is the red square?"}]}]
    out = pipe(text=messages, generate_kwargs={"max_new_tokens": 30, "do_sample": False})
    answer = out[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    # Grounding tags are added, non-special tokens: they survive the pipeline's skip_special_tokens decoding.
    assert answer["content"].strip() == GROUNDING_ANSWER
