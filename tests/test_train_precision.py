"""bf16 is used only where the machine runs it faster than fp32 (`qwenvl.train.precision`)."""

from __future__ import annotations

import logging

import pytest
from transformers import TrainingArguments

import qwenvl.train.precision as precision
import qwenvl.train.recipe as recipe


def test_the_speedup_is_measured_once_per_device_and_is_positive():
    precision.bf16_matmul_speedup.cache_clear()
    first = precision.bf16_matmul_speedup("cpu")
    assert first > 0
    assert precision.bf16_matmul_speedup("cpu") == first  # cached: one measurement per process
    assert precision.bf16_matmul_speedup.cache_info().hits >= 1


@pytest.mark.parametrize(("speedup", "pays"), [(0.012, False), (1.0, False), (1.24, False), (1.25, True), (6.5, True)])
def test_bf16_pays_off_from_a_clear_speedup_only(monkeypatch, speedup, pays):
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda device="cpu": speedup)
    assert precision.bf16_pays_off("cpu") is pays
    assert precision.resolve_bf16("auto") is pays
    assert precision.resolve_bf16(True) is True and precision.resolve_bf16(False) is False


def test_a_recipe_value_other_than_true_false_or_auto_is_refused():
    with pytest.raises(ValueError, match='bf16 must be true, false or "auto", got \'yes\''):
        precision.resolve_bf16("yes")


@pytest.mark.parametrize("pays", [False, True])
def test_training_with_bf16_on_a_cpu_without_bf16_kernels_warns(monkeypatch, caplog, tmp_path, pays):
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda device="cpu": 6.5 if pays else 0.012)
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to=[])
    with caplog.at_level(logging.WARNING, logger=recipe.logger.name):
        recipe.prepare_training_arguments(args)
    warned = "bf16 matmuls run at 0.012x the speed of fp32 ones" in caplog.text
    assert warned is not pays
    assert args.remove_unused_columns is False
