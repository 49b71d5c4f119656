"""Training with the HF Trainer: overfitting mixed tasks, loss normalisation under gradient accumulation, the example
scripts' hub-ready checkpoints, and resuming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from qwenvl.testing import build_tiny_model_and_processor
from qwenvl.train import LengthGroupedBatchOrder, QwenVLDataCollator, QwenVLTrainer, apply_stage

from conftest import load_example




def scene(color: str, shape: str) -> Image.Image:
    image = Image.new("RGB", (56, 56), "white")
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)((8, 16, 40, 48), fill=color)
    return image


RED_SQUARE, BLUE_CIRCLE = scene("red", "square"), scene("blue", "circle")
GREEN_CIRCLE, YELLOW_SQUARE = scene("green", "circle"), scene("yellow", "square")


def chat(images: list[Image.Image], *turns: tuple[str, str]) -> dict:
    messages = []
    for k, (question, answer) in enumerate(turns):
        blocks = [{"type": "image"} for _ in images] if k == 0 else []
        messages += [{"role": "user", "content": blocks + [{"type": "text", "text": question}]},
                     {"role": "assistant", "content": answer}]
    return {"images": images, "messages": messages}


# Captioning, VQA (the same question on two images: only the pixels tell the answers apart), referring grounding,
# grounded captioning and a two-image, two-turn dialogue.
MIXED = [
    chat([RED_SQUARE], ("Describe the image in English:", "A red square on a white background.")),
    chat([BLUE_CIRCLE], ("Describe the image in English:", "A blue circle on a white background.")),
    chat([GREEN_CIRCLE], ("What color is the circle? Answer:", "green")),
    chat([BLUE_CIRCLE], ("What color is the circle? Answer:", "blue")),
    chat([YELLOW_SQUARE],
         ("<ref>the yellow square</ref>", "<ref>the yellow square</ref><box>(142,285),(732,874)</box>")),
    chat([RED_SQUARE], ("<ref>the red square</ref>", "<ref>the red square</ref><box>(142,285),(732,874)</box>")),
    chat([GREEN_CIRCLE, YELLOW_SQUARE], ("Which picture shows a circle? Answer:", "Picture 1"),
         ("And its color? Answer:", "green")),
    chat([YELLOW_SQUARE], ("Generate the caption in English with grounding:",
                           "<ref>A yellow square</ref><box>(142,285),(732,874)</box> on white.")),
]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", remove_unused_columns=False,
                  disable_tqdm=True, seed=0, logging_steps=1)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def test_tiny_model_overfits_eight_mixed_samples(tmp_path):
    model, processor = build_tiny_model_and_processor(seed=0)
    apply_stage(model, "multitask", verbose=False)
    collator = QwenVLDataCollator(processor)
    args = training_args(tmp_path, per_device_train_batch_size=8, max_steps=50, learning_rate=1e-2,
                         lr_scheduler_type="constant", logging_steps=5)
    QwenVLTrainer(model=model, args=args, train_dataset=MIXED, data_collator=collator,
                  processing_class=processor).train()
    with torch.no_grad():
        loss = model.eval()(**collator(MIXED)).loss
    assert loss < 0.05


class GradientRecorder(TrainerCallback):
    """Keeps the accumulated gradients seen right before each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def one_step(tmp_path, batch_size: int, accumulation: int, chunked_loss: bool = False
             ) -> tuple[float, dict[str, torch.Tensor]]:
    model, processor = build_tiny_model_and_processor(seed=0)
    apply_stage(model, "multitask", verbose=False)
    if chunked_loss:
        model.enable_chunked_loss(chunk_size=7)
    recorder = GradientRecorder()
    args = training_args(tmp_path / f"b{batch_size}-{chunked_loss}", per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=accumulation, max_steps=1, train_sampling_strategy="sequential",
                         max_grad_norm=0.0)
    trainer = QwenVLTrainer(model=model, args=args, train_dataset=MIXED, data_collator=QwenVLDataCollator(processor),
                            processing_class=processor, callbacks=[recorder])
    trainer.train()
    return trainer.state.log_history[0]["loss"], recorder.grads[0]


def test_four_accumulation_steps_of_batch_2_equal_one_batch_of_8(tmp_path):
    loss_accumulated, grads_accumulated = one_step(tmp_path, batch_size=2, accumulation=4)
    loss_full, grads_full = one_step(tmp_path, batch_size=8, accumulation=1)

    assert loss_accumulated == pytest.approx(loss_full, rel=1e-5)
    assert grads_accumulated.keys() == grads_full.keys()
    for name in grads_full:
        torch.testing.assert_close(grads_accumulated[name], grads_full[name], rtol=1e-4, atol=1e-6, msg=name)

    # The micro-batches hold different numbers of supervised tokens, so averaging per-micro-batch means (the naive
    # normalisation) would give a different loss: the equality above is not a coincidence.
    model, processor = build_tiny_model_and_processor(seed=0)
    collator = QwenVLDataCollator(processor)
    with torch.no_grad():
        micro = [model(**collator(MIXED[i : i + 2])).loss for i in range(0, 8, 2)]
        full = model(**collator(MIXED)).loss
    assert float(full) == pytest.approx(loss_full, rel=1e-5)
    assert abs(float(torch.stack(micro).mean()) - float(full)) > 1e-3


def test_the_chunked_loss_trains_as_the_full_logits_do_under_gradient_accumulation(tmp_path):
    # Trainer passes `num_items_in_batch`; the chunked loss must normalise by it exactly as the full-logits loss does.
    loss_chunked, grads_chunked = one_step(tmp_path, batch_size=2, accumulation=4, chunked_loss=True)
    loss_full, grads_full = one_step(tmp_path, batch_size=8, accumulation=1)

    assert loss_chunked == pytest.approx(loss_full, rel=1e-5)
    assert grads_chunked.keys() == grads_full.keys()
    for name in grads_full:
        torch.testing.assert_close(grads_chunked[name], grads_full[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture
def caption_data(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    rows = []
    for k, (image, caption) in enumerate([(RED_SQUARE, "A red square."), (BLUE_CIRCLE, "A blue circle."),
                                          (GREEN_CIRCLE, "A green circle."), (YELLOW_SQUARE, "A yellow square.")]):
        image.save(tmp_path / "images" / f"{k}.png")
        rows.append({"image": f"images/{k}.png", "caption": caption})
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


@pytest.fixture
def finetune_json(tmp_path) -> Path:
    """An original Qwen-VL finetune JSON file with two-image and grounding conversations."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for k, image in enumerate([RED_SQUARE, BLUE_CIRCLE, GREEN_CIRCLE, YELLOW_SQUARE]):
        image.save(tmp_path / "images" / f"s{k}.png")
    rows = [
        {"id": "0", "conversations": [
            {"from": "user", "value": "Picture 1: <img>images/s0.png</img>\nDescribe the image in English:"},
            {"from": "assistant", "value": "A red square."}]},
        {"id": "1", "conversations": [
            {"from": "user", "value": "Picture 1: <img>images/s1.png</img>\nPicture 2: <img>images/s2.png</img>\n"
                                      "Which one is green? Answer:"},
            {"from": "assistant", "value": "Picture 2"},
            {"from": "user", "value": "And the other?"},
            {"from": "assistant", "value": "blue"}]},
        {"id": "2", "conversations": [
            {"from": "user", "value": "Picture 1: <img>images/s3.png</img>\n<ref>the yellow square</ref>"},
            {"from": "assistant", "value": "<ref>the yellow square</ref><box>(142,285),(732,874)</box>"}]},
        {"id": "3", "conversations": [
            {"from": "user", "value": "Picture 1: <img>images/s2.png</img>\nWhat color is the circle? Answer:"},
            {"from": "assistant", "value": "green"}]},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    return path


def losses(output_dir: Path) -> dict[int, float]:
    """Losses per step, from the last checkpoint's trainer state."""
    last = max(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def test_sft_script_writes_hub_ready_checkpoints_that_reload_without_qwenvl(tmp_path, finetune_json, run_isolated):
    out = tmp_path / "sft"
    load_example("sft").main([
        "--tiny", "--data_path", str(finetune_json), "--output_dir", str(out), "--stage", "multitask",
        "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu",
        "--report_to", "none", "--disable_tqdm", "true", "--pad_to_multiple_of", "8",
    ])
    checkpoint = out / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "configuration_qwenvl.py",
            "modeling_qwenvl.py", "processing_qwenvl.py", "tokenization_qwenvl.py", "image_processing_qwenvl.py",
            "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
            "README.md"} <= files
    card = (checkpoint / "README.md").read_text()
    assert "trust_remote_code=True" in card and "stage 2, multi-task" in card
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()

    printed = run_isolated(f"""
        import torch
        from PIL import Image
        from transformers import AutoModelForCausalLM, AutoProcessor
        path = {str(checkpoint)!r}
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        image = Image.new("RGB", (40, 40), (220, 30, 35))
        response, history = model.chat(processor, "Describe the image in English:", images=[image],
                                       max_new_tokens=3, do_sample=False)
        print(type(model).__name__, type(processor).__name__, isinstance(response, str))
    """)
    assert printed.split() == ["QwenVLForConditionalGeneration", "QwenVLProcessor", "True"]


def test_resuming_from_a_checkpoint_reproduces_the_reference_losses(tmp_path, finetune_json):
    sft = load_example("sft")
    common = ["--tiny", "--data_path", str(finetune_json), "--max_steps", "4", "--save_steps", "2",
              "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
              "--logging_steps", "1", "--stage", "multitask", "--learning_rate", "1e-3"]
    reference_dir = tmp_path / "reference"
    sft.main(common + ["--output_dir", str(reference_dir)])
    reference = losses(reference_dir)
    assert sorted(reference) == [1, 2, 3, 4]

    # A run that stopped after step 2 left only checkpoint-2; resuming it must replay steps 3 and 4 exactly.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(reference_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    sft.main(common + ["--output_dir", str(resumed_dir), "--resume_from_checkpoint", str(resumed_dir / "checkpoint-2")])
    resumed = losses(resumed_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == pytest.approx(reference, rel=1e-6)


def test_sft_script_groups_by_length_and_trains_bf16_weights(tmp_path, finetune_json):
    trainer = load_example("sft").main([
        "--tiny", "--data_path", str(finetune_json), "--output_dir", str(tmp_path / "bf16"), "--dtype", "bfloat16",
        "--train_sampling_strategy", "group_by_length", "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
    ])
    assert trainer.model.dtype == torch.bfloat16
    assert trainer._get_train_sampler().lengths == trainer.train_dataset["length"]
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_pretrain_script_trains_only_the_adapter_on_captions(tmp_path, caption_data):
    out = tmp_path / "stage1"
    load_example("pretrain").main([
        "--tiny", "--data_path", str(caption_data), "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
        "--learning_rate", "1e-2", "--save_strategy", "no",
    ])
    before, after = load_file(out / "tiny-base" / "model.safetensors"), load_file(out / "model.safetensors")
    adapter = ("transformer.visual.attn_pool.", "transformer.visual.ln_post.", "transformer.visual.proj")
    for name, tensor in before.items():
        trains = name.startswith(adapter) and not name.endswith("pos_embed")
        assert torch.equal(tensor, after[name]) != trains, name
    assert "stage 1, adapter pre-training" in (out / "README.md").read_text()


def test_length_grouped_batch_order_visits_every_row_once_in_batches_of_like_lengths():
    lengths = [10] * 40 + [100] * 40 + [55] * 23  # three tasks, 103 rows: one short batch of 7
    order = list(LengthGroupedBatchOrder(lengths, batch_size=8, generator=torch.Generator().manual_seed(0),
                                         window=13))
    assert sorted(order) == list(range(len(lengths)))
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert len(batches[-1]) == 7  # the short batch comes last, so the DataLoader's cuts meet the batches
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sum(s == 0 for s in spreads) >= 10  # only the batches at the two length changes mix lengths
    # Batches are shuffled, not sorted: long and short batches alternate over the epoch.
    firsts = [lengths[b[0]] for b in batches[:-1]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    again = list(LengthGroupedBatchOrder(lengths, batch_size=8, generator=torch.Generator().manual_seed(0),
                                         window=13))
    assert again == order


def test_group_by_length_works_on_chat_rows_and_cuts_padding(tmp_path):
    model, processor = build_tiny_model_and_processor(seed=0)
    apply_stage(model, "multitask", verbose=False)
    collator = QwenVLDataCollator(processor)
    rows = MIXED * 4
    widths = []

    def recording_collator(features):
        batch = collator(features)
        widths.append(batch["input_ids"].shape[1])
        return batch

    recording_collator.encode = collator.encode
    args = training_args(tmp_path, per_device_train_batch_size=4, max_steps=8, learning_rate=1e-3,
                         train_sampling_strategy="group_by_length")
    trainer = QwenVLTrainer(model=model, args=args, train_dataset=rows, data_collator=recording_collator,
                            processing_class=processor)
    trainer.train()
    own = sorted(len(collator.encode(row).input_ids) for row in rows)
    # Grouped: the padded widths sum to barely more than the rows' own lengths (random batches pad to each max).
    assert sum(w * 4 for w in widths) <= 1.15 * sum(own)
