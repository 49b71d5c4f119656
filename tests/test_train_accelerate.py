"""`accelerate launch` with two CPU processes (DDP over gloo) reproduces a one-process run with the same global batch,
and resuming the two-process run from its checkpoint replays the reference losses."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SFT = REPO / "examples" / "sft.py"
DDP_CPU = REPO / "examples" / "accelerate_configs" / "ddp_cpu.yaml"
COLOURS = {"red": (220, 30, 35), "blue": (30, 75, 220), "green": (25, 150, 45), "yellow": (235, 195, 0)}


@pytest.fixture
def finetune_json(tmp_path) -> Path:
    """Eight samples of different lengths (so the token-count normalisation matters)."""
    (tmp_path / "images").mkdir()
    rows = []
    for k, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        Image.new("RGB", (32, 32), rgb).save(tmp_path / "images" / f"{k}.png")
        question = "What colour is the image?" + " Answer briefly." * (k % 3)
        rows.append({"id": str(k), "conversations": [
            {"from": "user", "value": f"Picture 1: <img>images/{k}.png</img>\n{question}"},
            {"from": "assistant", "value": name + " indeed" * (k % 2)}]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    return path


def free_port() -> str:
    """A port for the rendezvous, so that concurrent runs on the machine (default 29500) cannot collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def logged_losses(output_dir: Path) -> dict[int, float]:
    """Losses per step, from the last checkpoint's trainer state."""
    last = max(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.mark.slow
def test_two_process_ddp_and_its_resume_match_the_single_process_run(tmp_path, finetune_json):
    common = ["--data_path", str(finetune_json), "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
              "--stage", "multitask", "--learning_rate", "1e-3", "--use_cpu", "--report_to", "none",
              "--disable_tqdm", "true", "--seed", "0"]
    single = tmp_path / "single"
    run([sys.executable, str(SFT), "--tiny", "--output_dir", str(single), "--per_device_train_batch_size", "4",
         *common], tmp_path)
    reference = logged_losses(single)
    assert sorted(reference) == [1, 2, 3, 4]

    def launch(output_dir: Path, *extra: str) -> None:
        run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU), "--main_process_port",
             free_port(), str(SFT), "--model_name_or_path", str(single / "tiny-base"),
             "--per_device_train_batch_size", "2", "--output_dir", str(output_dir), *common, *extra], tmp_path)

    ddp = tmp_path / "ddp"
    launch(ddp)
    state = json.loads((ddp / "checkpoint-4" / "trainer_state.json").read_text())
    # Each step takes 2 ranks x 2 rows = 4 of the 8 rows, as the one-process batch of 4 does.
    assert state["train_batch_size"] == 2 and state["log_history"][0]["epoch"] == 0.5
    assert logged_losses(ddp) == pytest.approx(reference, rel=1e-5)

    resumed = tmp_path / "resumed"
    shutil.copytree(ddp / "checkpoint-2", resumed / "checkpoint-2")
    launch(resumed, "--resume_from_checkpoint", str(resumed / "checkpoint-2"))
    assert logged_losses(resumed) == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_shipped_fsdp_config_trains_and_saves_full_weights(tmp_path, finetune_json):
    """examples/accelerate_configs/fsdp.yaml on two CPU processes (bf16 and the GPU count swapped for CPU values)."""
    import torch
    from safetensors.torch import load_file

    config = (REPO / "examples" / "accelerate_configs" / "fsdp.yaml").read_text()
    config = config.replace("num_processes: 8", "num_processes: 2")
    config = config.replace("mixed_precision: bf16", "mixed_precision: 'no'")
    (tmp_path / "fsdp_cpu.yaml").write_text(config.replace("use_cpu: false", "use_cpu: true"))
    out = tmp_path / "fsdp"
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp_cpu.yaml"),
         "--main_process_port", free_port(), str(SFT), "--tiny", "--data_path", str(finetune_json),
         "--output_dir", str(out), "--stage", "chat-sft",
         "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
         "--use_cpu", "--report_to", "none", "--disable_tqdm", "true"], tmp_path)

    before = load_file(out / "tiny-base" / "model.safetensors")
    after = load_file(out / "checkpoint-2" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(after[k].shape == before[k].shape for k in before)  # full tensors, not shards
    # chat-sft: the ViT and ln_post/proj are frozen (so is the adapter's fixed pos_embed); everything else trained.
    frozen_parts = ("conv1", "positional_embedding", "ln_pre", "transformer.", "ln_post", "proj", "attn_pool.pos_embed")
    frozen = tuple(f"transformer.visual.{name}" for name in frozen_parts)
    for name in before:
        assert torch.equal(before[name], after[name]) == name.startswith(frozen), name
