"""Shared fixtures: tiny Qwen-VL-shaped configs and a runner for a fresh Python process without `qwenvl`."""

from __future__ import annotations

import os

# Tiny test models are dominated by per-op overhead: one intra-op thread is faster and immune to oversubscription
# (child processes inherit it through the environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TEST_THREADS = int(os.environ["OMP_NUM_THREADS"])
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
torch.set_num_threads(TEST_THREADS)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference" / "qwen-vl"

# Runs first in the child: makes `import qwenvl` fail, so only the files saved next to the weights can be used.
_BLOCK_QWENVL = """
import sys
class _BlockQwenVL:
    def find_spec(self, name, path=None, target=None):
        if name == "qwenvl" or name.startswith("qwenvl."):
            raise ImportError("qwenvl is deliberately not importable in this process")
        return None
sys.meta_path.insert(0, _BlockQwenVL())
"""


@pytest.fixture(autouse=True)
def pinned_threads():
    """Every test starts with the suite's thread count, whatever an earlier test set (two-thread kernels crawl on
    tiny models whenever other processes share the cores)."""
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Trainers create accelerate's process-wide state; reset it so each test can choose its own precision/device."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_config_kwargs(**overrides) -> dict:
    """A ~0.2M-parameter model with the release's structure (vocab 320: specials at 300..)."""
    kwargs = dict(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_channels=16,
        intermediate_size=128,
        seq_length=64,
        visual=dict(image_size=28, patch_size=14, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=64,
                    image_start_id=300, n_queries=4),
        pad_token_id=0,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return kwargs


def split_config_kwargs() -> dict:
    """The tiny model widened until every decoder projection and the LM head are large enough for `QwenVLLinear` to
    split their few-row CPU products over the threads (256 x 256 weights and up; 320 outputs a multiple of 8)."""
    return tiny_config_kwargs(hidden_size=256, kv_channels=64, intermediate_size=512,
                              visual={**tiny_config_kwargs()["visual"], "output_dim": 256})


# The image tags of `tiny_config_kwargs`' vocabulary.
IMG, IMG_END, PAD_IMG = 300, 301, 302


def image_span(n_queries: int = 4) -> list[int]:
    """`<img>`, one `<imgpad>` per adapter query of the tiny config, `</img>`."""
    return [IMG] + [PAD_IMG] * n_queries + [IMG_END]


def tiny_model(seed: int = 0, cls=None, **overrides):
    """A tiny model (`tiny_config_kwargs(**overrides)`) of `cls` (default: QwenVLForConditionalGeneration), seeded,
    in eval mode."""
    from qwenvl import QwenVLConfig, QwenVLForConditionalGeneration

    torch.manual_seed(seed)
    return (cls or QwenVLForConditionalGeneration)(QwenVLConfig(**tiny_config_kwargs(**overrides))).eval()


@pytest.fixture
def tiny_config():
    from qwenvl import QwenVLConfig

    return QwenVLConfig(**tiny_config_kwargs())


@pytest.fixture
def run_isolated(tmp_path):
    """Run Python code in a fresh interpreter in which `qwenvl` cannot be imported; return its stdout."""

    def run(code: str, timeout: int = 240) -> str:
        script = tmp_path / "isolated_child.py"
        script.write_text(_BLOCK_QWENVL + textwrap.dedent(code))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
        env["HF_HUB_OFFLINE"] = "1"
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"isolated process failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    return run


def load_example(name: str):
    """Import `examples/<name>.py` as a module (its `main(argv)` runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    sys.path.insert(0, str(EXAMPLES))  # an example may import a sibling script
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module
