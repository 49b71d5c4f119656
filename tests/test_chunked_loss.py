"""The chunked training loss (`enable_chunked_loss`): the full-logits loss and gradients without the full logits."""

from __future__ import annotations

import pytest
import torch

from qwenvl import QwenVLConfig, QwenVLForConditionalGeneration
from qwenvl.modeling_qwenvl import chunked_causal_lm_loss

from conftest import tiny_config_kwargs


def tiny_model() -> QwenVLForConditionalGeneration:
    torch.manual_seed(0)
    return QwenVLForConditionalGeneration(QwenVLConfig(**tiny_config_kwargs())).train()


def text_batch(prompt_tokens: int = 7) -> dict:
    """Three rows of 20 text tokens; the first `prompt_tokens` of each and the tail of row 1 carry no label."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 290, (3, 20), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt_tokens] = -100
    labels[1, 15:] = -100
    return {"input_ids": input_ids, "labels": labels}


def loss_and_grads(model, batch: dict, **kwargs) -> tuple[torch.Tensor, object, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out, grads


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(50)])
def test_same_loss_and_gradients_as_the_full_logits_and_no_logits_returned(num_items_in_batch):
    model, batch = tiny_model(), text_batch()
    loss_full, out_full, grads_full = loss_and_grads(model, batch, num_items_in_batch=num_items_in_batch)
    model.enable_chunked_loss(chunk_size=5)
    loss_chunked, out_chunked, grads_chunked = loss_and_grads(model, batch, num_items_in_batch=num_items_in_batch)

    assert out_full.logits.shape == (3, 20, model.config.vocab_size)
    assert out_chunked.logits is None
    torch.testing.assert_close(loss_chunked, loss_full)
    assert grads_chunked.keys() == grads_full.keys() and "lm_head.weight" in grads_full
    for name in grads_full:
        torch.testing.assert_close(grads_chunked[name], grads_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_head_sees_only_labelled_positions_a_chunk_at_a_time():
    model, batch = tiny_model(), text_batch()
    model.enable_chunked_loss(chunk_size=8)
    rows_per_call = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows_per_call.append(args[0].shape))
    model(**batch).loss.backward()

    # Position t predicts token t + 1: 3 rows x (20 - 7) labels, minus row 1's five unlabelled ones.
    labelled = 3 * 13 - 5
    forward_calls = rows_per_call[: len(rows_per_call) // 2]  # each chunk runs again in backward
    assert [shape[0] for shape in forward_calls] == [8, 8, 8, 8, 2]
    assert sum(shape[0] for shape in forward_calls) == labelled
    assert all(len(shape) == 2 for shape in rows_per_call)  # (positions, hidden): never (batch, length, vocab)


def test_evaluation_and_generation_keep_the_logits():
    model, batch = tiny_model(), text_batch()
    model.enable_chunked_loss()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (3, 20, model.config.vocab_size) and torch.isfinite(out.loss)
    prompt = batch["input_ids"][:1, :5]
    generated = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=1)
    assert generated.shape == (1, 8)


def test_default_chunk_holds_about_32m_logits_and_bad_sizes_are_refused():
    model = tiny_model()
    model.enable_chunked_loss()
    assert model.loss_chunk_size == 2**25 // model.config.vocab_size
    with pytest.raises(ValueError, match="chunk_size must be a positive number of positions, got 0"):
        model.enable_chunked_loss(chunk_size=0)
    model.disable_chunked_loss()
    assert model.train()(**text_batch()).logits is not None


def test_pre_shifted_labels_and_a_batch_without_labels():
    model = tiny_model()
    hidden = torch.randn(2, 6, model.config.hidden_size, requires_grad=True)
    labels = torch.randint(0, model.config.vocab_size, (2, 6))
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    from_labels = chunked_causal_lm_loss(model.lm_head, hidden, labels, chunk_size=4)
    from_shifted = chunked_causal_lm_loss(model.lm_head, hidden, None, chunk_size=4, shift_labels=shifted)
    torch.testing.assert_close(from_labels, from_shifted)

    # No labelled position: 0 / 0, as transformers' mean cross-entropy gives, and still a graph to call backward on.
    empty = chunked_causal_lm_loss(model.lm_head, hidden, torch.full_like(labels, -100), chunk_size=4)
    assert torch.isnan(empty)
    empty.backward()


def test_the_training_recipe_turns_it_on_for_full_and_lora_training(tmp_path):
    from transformers import TrainingArguments

    from qwenvl.train import ModelArguments, setup_trainable

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    batch = text_batch()
    for model_args in (ModelArguments(stage="multitask", chunked_loss=True),
                       ModelArguments(use_lora=True, lora_r=4, chunked_loss=True)):
        reference = tiny_model()
        expected = reference(**batch).loss
        model, _ = setup_trainable(tiny_model(), model_args, args)
        out = model.train()(**batch)
        assert out.logits is None, model_args
        torch.testing.assert_close(out.loss, expected)
        out.loss.backward()
