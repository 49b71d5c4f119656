"""The original finetune JSON format: read into messages + image paths, rendered as the original text, written back."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from qwenvl.data import load_image, load_official_finetune_json, write_official_finetune_json
from qwenvl.image_processing_qwenvl import QwenVLImageProcessor
from qwenvl.processing_qwenvl import QwenVLProcessor
from qwenvl.tokenization_qwenvl import ESCAPE_CHAR, train_tokenizer


def _image(seed: int, size=(24, 16)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "root"
    (images / "pics").mkdir(parents=True)
    for name, seed in (("pics/dog.png", 0), ("pics/cat.png", 1), ("pics/中文 name.png", 2)):
        _image(seed).save(images / name)
    _image(3).save(tmp_path / "outside.png")
    return images


ROWS = [
    {
        "id": "identity_0",
        "conversations": [
            {
                "from": "user",
                "value": "Picture 1: <img>pics/dog.png</img>\nPicture 2: <img>pics/cat.png</img>\n"
                "Which one is <ref>the dog</ref>?",
            },
            {"from": "assistant", "value": "<ref>The dog</ref><box>(10,20),(500,600)</box> is in picture 1."},
            {"from": "user", "value": "And this one?\nPicture 1: <img>pics/中文 name.png</img>\n"},
            {"from": "assistant", "value": "Just noise."},
        ],
    },
    {
        "id": 7,
        "conversations": [
            {"from": "user", "value": "Text only, <|im_start|> typed by a user."},
            {"from": "assistant", "value": "OK."},
        ],
    },
]


def _write(tmp_path, rows, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def test_rows_become_messages_and_image_paths(tmp_path, root):
    samples = load_official_finetune_json(_write(tmp_path, ROWS), root)
    assert [s["id"] for s in samples] == ["identity_0", "7"]
    first = samples[0]
    assert first["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "Which one is <ref>the dog</ref>?"},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "<ref>The dog</ref><box>(10,20),(500,600)</box> is in picture 1."}],
        },
        {"role": "user", "content": [{"type": "text", "text": "And this one?\n"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Just noise."}]},
    ]
    real_root = os.path.realpath(root)
    assert first["images"] == [os.path.join(real_root, "pics", n) for n in ("dog.png", "cat.png", "中文 name.png")]
    assert samples[1]["images"] == []


def test_loading_opens_no_image(tmp_path, root):
    opened = []
    sys.addaudithook(
        lambda event, args: opened.append(args) if event == "open" and str(args[0]).endswith(".png") else None
    )
    load_official_finetune_json(_write(tmp_path, ROWS), root)
    assert opened == []


def _original_text(conversations) -> str:
    """The ChatML text finetune.py built for a row, with each `<img>path</img>` emptied."""
    parts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>"]
    for turn in conversations:
        value = turn["value"]
        for path in ("pics/dog.png", "pics/cat.png", "pics/中文 name.png"):
            value = value.replace(f"<img>{path}</img>", "<img></img>")
        parts.append(f"<|im_start|>{turn['from']}\n{value}<|im_end|>")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def processor() -> QwenVLProcessor:
    tokenizer = train_tokenizer(["Which one is the dog? Picture 1: just noise.", "图中是什么"] * 10, vocab_size=600)
    return QwenVLProcessor(QwenVLImageProcessor(size=28), tokenizer, num_image_tokens=4)


def test_the_chat_template_renders_the_original_text_without_paths(tmp_path, root, processor):
    samples = load_official_finetune_json(_write(tmp_path, ROWS), root)
    for row, sample in zip(ROWS, samples, strict=True):
        text = processor.apply_chat_template(sample["messages"], trusted_text=True)
        # Only the escape mark of a typed control token differs; the tokenizer's normaliser deletes it.
        assert text.replace(ESCAPE_CHAR, "") == _original_text(row["conversations"])
    tokenizer = processor.tokenizer
    grounding = tokenizer.apply_chat_template(samples[0]["messages"], trusted_text=True)["input_ids"]
    assert grounding.count(tokenizer.convert_tokens_to_ids("<ref>")) == 2  # in the user and the assistant turn
    typed = tokenizer.apply_chat_template(samples[1]["messages"], trusted_text=True)["input_ids"]
    assert typed.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # the typed one stays text


def test_loaded_rows_feed_the_processor_and_trl(tmp_path, root, processor):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    samples = load_official_finetune_json(_write(tmp_path, ROWS), root)
    examples = [{"messages": s["messages"], "images": [load_image(p) for p in s["images"]]} for s in samples]
    batch = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)(examples)
    assert batch["pixel_values"].shape == (3, 3, 28, 28)
    assert (batch["input_ids"] == processor.tokenizer.image_start_id).sum() == 3
    supervised = processor.tokenizer.decode(batch["labels"][1][batch["labels"][1] != -100].tolist())
    assert supervised == "OK.<|im_end|>"


def test_a_leading_assistant_turn_is_dropped_like_the_original(tmp_path, root):
    rows = [
        {
            "id": "x",
            "conversations": [
                {"from": "assistant", "value": "hello"},
                {"from": "user", "value": "hi"},
                {"from": "assistant", "value": "yes"},
            ],
        }
    ]
    [sample] = load_official_finetune_json(_write(tmp_path, rows), root)
    assert [m["role"] for m in sample["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize(
    "image, reason",
    [
        ("../outside.png", "outside image_root"),
        ("pics/../../outside.png", "outside image_root"),
        ("{outside}", "outside image_root"),
        ("pics/link.png", "outside image_root"),
        ("http://169.254.169.254/latest/meta-data", "is a URL"),
        ("file:///etc/passwd", "is a URL"),
        ("pics/missing.png", "not found"),
        ("pics/dog.png\u0000", "NUL byte"),
        ("", "empty"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute-outside",
        "symlink-outside",
        "http",
        "file-url",
        "missing",
        "nul",
        "empty",
    ],
)
def test_image_paths_resolve_under_image_root_only(tmp_path, root, image, reason):
    outside = tmp_path / "outside.png"
    os.symlink(outside, root / "pics" / "link.png")
    rows = [
        ROWS[1],
        {
            "id": "bad",
            "conversations": [{"from": "user", "value": f"Picture 1: <img>{image.format(outside=outside)}</img>\nhi"}],
        },
    ]
    with pytest.raises(ValueError, match=rf"data\.json: row 1: conversations\[0\]: .*{reason}"):
        load_official_finetune_json(_write(tmp_path, rows), root)


def test_an_absolute_path_inside_image_root_is_accepted(tmp_path, root):
    inside = os.path.join(root, "pics", "dog.png")
    rows = [{"id": "a", "conversations": [{"from": "user", "value": f"Picture 1: <img>{inside}</img>\nhi"}]}]
    [sample] = load_official_finetune_json(_write(tmp_path, rows), root)
    assert sample["images"] == [os.path.realpath(inside)]


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"conversations": []}, "expected a JSON list of rows"),
        (["not a row"], "row 0: expected an object"),
        ([{"id": "a"}], "row 0: field 'conversations' must be a non-empty list"),
        ([{"conversations": []}], "row 0: field 'conversations' must be a non-empty list"),
        ([{"conversations": [{"from": "human", "value": "x"}]}], r"row 0: conversations\[0\]\.from must be"),
        ([{"conversations": [{"from": "user", "value": 3}]}], r"row 0: conversations\[0\]\.value must be a string"),
        (
            [{"conversations": [{"from": "user", "value": "Picture 2: <img>pics/dog.png</img>\nx"}]}],
            "'Picture 2:' where 'Picture 1:' was expected",
        ),
        (
            [{"conversations": [{"from": "user", "value": "look <img>pics/dog.png</img> here"}]}],
            "not in the form 'Picture k: <img>path</img>",
        ),
        (
            [
                {
                    "conversations": [
                        {"from": "user", "value": "x"},
                        {"from": "assistant", "value": "<img>pics/dog.png</img>"},
                    ]
                }
            ],
            r"conversations\[1\]: images are only supported in user turns",
        ),
        ([{"conversations": [{"from": "assistant", "value": "only me"}]}], "no turns left"),
    ],
)
def test_bad_rows_are_reported_with_index_and_reason(tmp_path, root, rows, message):
    with pytest.raises(ValueError, match=message):
        load_official_finetune_json(_write(tmp_path, rows), root)


def test_invalid_json_and_missing_root_are_reported(tmp_path, root):
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_official_finetune_json(broken, root)
    with pytest.raises(ValueError, match="is not a directory"):
        load_official_finetune_json(_write(tmp_path, ROWS), tmp_path / "nowhere")


# --- writing ---------------------------------------------------------------------------------------------------------


def test_write_then_load_round_trips(tmp_path, root):
    images = [_image(10), _image(11, (8, 40))]
    samples = [
        {
            "id": "gen_0",
            "images": images,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": "Where is <ref>it</ref>?"},
                        {"type": "image"},
                    ],
                },
                {"role": "assistant", "content": "<ref>it</ref><box>(1,2),(3,4)</box>"},
            ],
        },
        {
            "images": [str(root / "pics" / "dog.png")],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Dog?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
            ],
        },
    ]
    path = tmp_path / "written.json"
    write_official_finetune_json(samples, path, root)
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert rows[0]["conversations"][0]["value"] == (
        "Picture 1: <img>images/0_0.png</img>\nWhere is <ref>it</ref>?Picture 2: <img>images/0_1.png</img>\n"
    )
    assert rows[1] == {
        "id": "identity_1",
        "conversations": [
            {"from": "user", "value": "Picture 1: <img>pics/dog.png</img>\nDog?"},
            {"from": "assistant", "value": "Yes."},
        ],
    }

    loaded = load_official_finetune_json(path, root)
    assert loaded[0]["messages"][0]["content"] == samples[0]["messages"][0]["content"]
    assert loaded[0]["messages"][1]["content"] == [{"type": "text", "text": "<ref>it</ref><box>(1,2),(3,4)</box>"}]
    assert loaded[1]["messages"] == samples[1]["messages"]
    for original, stored in zip(images, loaded[0]["images"], strict=True):
        assert np.array_equal(np.asarray(load_image(stored)), np.asarray(original))


@pytest.mark.parametrize(
    "sample, message",
    [
        ({"messages": [{"role": "system", "content": "x"}]}, "role must be 'user' or 'assistant'"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "more image blocks than images"),
        ({"images": [_image(0)], "messages": [{"role": "user", "content": "x"}]}, "have no image block"),
        ({"messages": [{"role": "user", "content": "a <img>b</img>"}]}, "cannot represent"),
        (
            {"images": ["/etc/passwd"], "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "outside image_root",
        ),
        ({"messages": []}, "no messages"),
    ],
)
def test_writer_rejects_what_the_format_cannot_hold(tmp_path, root, sample, message):
    with pytest.raises(ValueError, match=f"sample 0: .*{message}"):
        write_official_finetune_json([sample], tmp_path / "out.json", root)


def test_load_image_decodes_with_the_processor_checks(tmp_path, root):
    assert load_image(root / "pics" / "dog.png").mode == "RGB"
    broken = tmp_path / "broken.png"
    broken.write_bytes((root / "pics" / "dog.png").read_bytes()[:50])
    with pytest.raises(ValueError, match="broken.png"):
        load_image(broken)
    with pytest.raises(ValueError, match="over the limit"):
        load_image(root / "pics" / "dog.png", max_image_pixels=100)
