"""Specification of the PPO math in `qwenvl.rl.core`, checked against values computed by hand."""

import math

import pytest
import torch

from qwenvl.rl.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    first_true_indices,
    kl_penalty,
    leave_one_out_baseline,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    truncate_after_eos,
    value_loss,
)


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


X = t([[1.0, 2.0, 30.0], [4.0, 50.0, 60.0]])
MASK = torch.tensor([[True, True, False], [True, False, False]])  # selects 1, 2, 4


# ---------------------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------------------


def test_masked_mean_over_all_elements_and_per_row():
    assert masked_mean(X, MASK).item() == pytest.approx(7 / 3)
    assert masked_mean(X, MASK, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(X, MASK.float(), dim=0).tolist() == pytest.approx([2.5, 2.0, 0.0])  # empty column -> 0


def test_masked_mean_ignores_inf_and_nan_outside_the_mask():
    x = X.clone()
    x[0, 2], x[1, 1] = float("inf"), float("nan")
    assert masked_mean(x, MASK).item() == pytest.approx(7 / 3)


def test_masked_mean_rejects_a_mask_of_another_shape():
    with pytest.raises(ValueError, match="mask has shape"):
        masked_mean(X, MASK[:, :2])


def test_masked_var_biased_and_unbiased():
    # values 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 14/3
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(14 / 9)
    assert masked_var(X, MASK).item() == pytest.approx(7 / 3)
    assert masked_var(X, MASK).item() == pytest.approx(X[MASK].var().item())


def test_masked_var_needs_enough_elements():
    one = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, one)
    assert masked_var(X, one, unbiased=False).item() == 0.0


def test_masked_whiten_standardises_the_masked_values_and_zeroes_the_rest():
    whitened = masked_whiten(X, MASK)
    std = math.sqrt(7 / 3)
    expected = [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]]
    assert whitened.tolist() == [pytest.approx(row) for row in expected]
    assert whitened[MASK].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert whitened[MASK].var().item() == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_without_mean_shift_only_rescales():
    whitened = masked_whiten(X, MASK, shift_mean=False)
    assert whitened[MASK].mean().item() == pytest.approx(7 / 3)
    assert whitened[MASK].var().item() == pytest.approx(1.0, abs=1e-6)
    assert whitened[~MASK].tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------------
# KL estimators and KL-shaped rewards
# ---------------------------------------------------------------------------------------------------------------------

LOGP = t([-1.0, -2.0])
REF = t([-1.5, -1.0])  # ref - logp = [-0.5, 1.0]


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", [0.5, -1.0]),  # logp - ref
        ("k3", [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]),  # exp(d) - d - 1 with d = ref - logp
        ("abs", [0.5, 1.0]),
        ("mse", [0.125, 0.5]),  # 0.5 * (logp - ref)^2
    ],
)
def test_kl_estimators(estimator, expected):
    assert kl_penalty(LOGP, REF, estimator).tolist() == pytest.approx(expected)


def test_kl_estimators_are_zero_when_policy_equals_reference_and_k3_is_never_negative():
    for estimator in ("k1", "k3", "abs", "mse"):
        assert kl_penalty(LOGP, LOGP, estimator).tolist() == [0.0, 0.0]
    d = torch.linspace(-5, 5, 101, dtype=torch.float64)
    assert (kl_penalty(torch.zeros_like(d), d, "k3") >= 0).all()


def test_unknown_kl_estimator_is_rejected():
    with pytest.raises(ValueError, match="Unknown KL estimator 'k2'"):
        kl_penalty(LOGP, REF, "k2")


def test_compute_rewards_penalises_every_response_token_and_adds_the_score_at_the_last_one():
    logprobs = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, float("-inf")]])  # row 1 ends after 2 tokens
    ref = t([[-1.5, -1.0, -0.5], [-2.0, -0.5, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = compute_rewards(t([1.0, 2.0]), logprobs, ref, mask, kl_coef=0.1, estimator="k1")
    assert kl.tolist() == [pytest.approx([0.5, -1.0, 0.0]), pytest.approx([1.0, -0.5, 0.0])]
    assert rewards.tolist() == [pytest.approx([-0.05, 0.1, 1.0]), pytest.approx([-0.1, 0.05 + 2.0, 0.0])]


def test_compute_rewards_with_k3_and_a_tensor_coefficient():
    logprobs, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    rewards, kl = compute_rewards(t([0.0]), logprobs, ref, torch.ones(1, 2), kl_coef=torch.tensor(0.5), estimator="k3")
    assert kl.tolist() == [pytest.approx(kl_penalty(LOGP, REF, "k3").tolist())]
    assert rewards.tolist() == [pytest.approx((-0.5 * kl[0]).tolist())]


def test_compute_rewards_rejects_an_empty_response_and_a_misshaped_score():
    with pytest.raises(ValueError, match=r"rows \[1\] of the response mask have no response token"):
        compute_rewards(t([1.0, 1.0]), X, X, torch.tensor([[1, 0, 0], [0, 0, 0]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="score must have shape"):
        compute_rewards(t([[1.0], [1.0]]), X, X, MASK, kl_coef=0.1)


def test_leave_one_out_baseline_subtracts_the_mean_of_the_other_responses_to_the_same_prompt():
    scores = t([1.0, 2.0, 6.0, -3.0, -3.0, -3.0])  # two prompts, three responses each
    centred = leave_one_out_baseline(scores, group_size=3)
    torch.testing.assert_close(centred, t([1 - 4.0, 2 - 3.5, 6 - 1.5, 0.0, 0.0, 0.0]))
    # A score shared by every response to a prompt (how hard the prompt is) leaves nothing behind.
    torch.testing.assert_close(leave_one_out_baseline(scores + t([10.0] * 3 + [-7.0] * 3), 3), centred)


def test_leave_one_out_baseline_rejects_groups_that_do_not_fit():
    with pytest.raises(ValueError, match="at least 2 responses"):
        leave_one_out_baseline(t([1.0, 2.0]), group_size=1)
    with pytest.raises(ValueError, match=r"shape \(5,\) do not split into groups of 2"):
        leave_one_out_baseline(t([1.0] * 5), group_size=2)


# ---------------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------------


def gae_by_hand(rewards, values, gamma, lam):
    """Textbook GAE on one unpadded episode (python floats); the value after the last step is 0."""
    advantages, next_value, running = [0.0] * len(rewards), 0.0, 0.0
    for step in reversed(range(len(rewards))):
        delta = rewards[step] + gamma * next_value - values[step]
        running = delta + gamma * lam * running
        advantages[step], next_value = running, values[step]
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


def test_gae_two_steps_worked_example():
    # gamma = lam = 1: delta_1 = 1 - 0.2 = 0.8, delta_0 = 0 + 0.2 - 0.5 = -0.3, A_0 = -0.3 + 0.8 = 0.5,
    # and returns are the undiscounted reward-to-go (1, 1).
    advantages, returns = compute_gae(t([[0.0, 1.0]]), t([[0.5, 0.2]]), torch.ones(1, 2), gamma=1.0, lam=1.0)
    assert advantages.tolist() == [pytest.approx([0.5, 0.8])]
    assert returns.tolist() == [pytest.approx([1.0, 1.0])]


def test_gae_matches_a_hand_loop_per_row_and_ignores_positions_after_the_end():
    rewards = [[0.1, -0.2, 0.3, 1.0], [0.5, 2.0, 99.0, 99.0]]
    values = [[0.4, 0.3, 0.2, 0.1], [1.0, -1.0, 50.0, float("nan")]]  # garbage after the end of row 1
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = compute_gae(t(rewards), t(values), mask, gamma=0.9, lam=0.8)
    for row, length in enumerate((4, 2)):
        expected_adv, expected_ret = gae_by_hand(rewards[row][:length], values[row][:length], 0.9, 0.8)
        assert advantages[row, :length].tolist() == pytest.approx(expected_adv)
        assert returns[row, :length].tolist() == pytest.approx(expected_ret)
        assert advantages[row, length:].tolist() == [0.0] * (4 - length)
        assert returns[row, length:].tolist() == [0.0] * (4 - length)


def test_gae_limits_lambda_zero_is_td_error_and_lambda_one_is_monte_carlo():
    rewards, values, mask = t([[1.0, 2.0, 3.0]]), t([[0.5, 0.5, 0.5]]), torch.ones(1, 3)
    td, _ = compute_gae(rewards, values, mask, gamma=0.5, lam=0.0)
    assert td.tolist() == [pytest.approx([1.0 + 0.25 - 0.5, 2.0 + 0.25 - 0.5, 3.0 - 0.5])]
    mc, returns = compute_gae(rewards, values, mask, gamma=0.5, lam=1.0)
    reward_to_go = [1.0 + 0.5 * 2.0 + 0.25 * 3.0, 2.0 + 0.5 * 3.0, 3.0]
    assert returns.tolist() == [pytest.approx(reward_to_go)]
    assert mc.tolist() == [pytest.approx([g - 0.5 for g in reward_to_go])]


def test_gae_requires_right_padded_masks_and_returns_targets_without_gradient():
    with pytest.raises(ValueError, match=r"rows \[0\] are not"):
        compute_gae(t([[1.0, 1.0, 1.0]]), t([[0.0, 0.0, 0.0]]), torch.tensor([[1, 0, 1]]), gamma=1.0, lam=1.0)
    values = t([[0.5, 0.2]]).requires_grad_()
    advantages, returns = compute_gae(t([[0.0, 1.0]]), values, torch.ones(1, 2), gamma=1.0, lam=1.0)
    assert not advantages.requires_grad and not returns.requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# Clipped losses
# ---------------------------------------------------------------------------------------------------------------------


def test_policy_loss_clips_the_ratio_only_where_it_would_help_the_objective():
    # token: ratio, advantage -> loss term (eps = 0.2)
    #   0: 1.5, +1 -> max(-1.5, -1.2) = -1.2  clipped (ratio above 1 + eps with a positive advantage)
    #   1: 0.5, +1 -> max(-0.5, -0.8) = -0.5  not clipped (pessimistic side)
    #   2: 1.1, -1 -> max( 1.1,  1.1) =  1.1  inside the range
    #   3: 0.5, -1 -> max( 0.5,  0.8) =  0.8  clipped (ratio below 1 - eps with a negative advantage)
    #   4: padding, ignored even with an infinite log-probability
    ratios = [1.5, 0.5, 1.1, 0.5]
    old = t([[-1.0] * 5])
    logprobs = torch.cat([old[:, :4] + torch.log(t([ratios])), t([[float("inf")]])], dim=1).requires_grad_()
    advantages = t([[1.0, 1.0, -1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clipfrac, approx_kl = policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 4)
    loss.backward()
    # d/dlogp of -A * r is -A * r / n on unclipped tokens and 0 on clipped or padded ones
    assert logprobs.grad.tolist() == [pytest.approx([0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0])]
    assert not clipfrac.requires_grad and not approx_kl.requires_grad


def test_policy_loss_at_the_rollout_policy_is_minus_the_mean_advantage():
    old = t([[-0.3, -2.0, -1.1]])
    loss, clipfrac, approx_kl = policy_loss(old.clone(), old, t([[1.0, -2.0, 4.0]]), torch.ones(1, 3), cliprange=0.2)
    assert loss.item() == pytest.approx(-1.0)
    assert clipfrac.item() == 0.0 and approx_kl.item() == 0.0


def test_value_loss_with_values_inside_and_outside_the_clip_range():
    # old values 0, eps = 0.2:
    #   0: V 0.5 -> clipped 0.2, R 1: max(0.25, 0.64) = 0.64  clipped error is larger
    #   1: V 0.1 (inside),   R 1: max(0.81, 0.81) = 0.81
    #   2: V -0.5 -> -0.2,   R 0: max(0.25, 0.04) = 0.25
    #   3: padding, ignored
    values = t([[0.5, 0.1, -0.5, 7.0]]).requires_grad_()
    old_values = torch.zeros(1, 4, dtype=torch.float64)
    returns = t([[1.0, 1.0, 0.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    loss.backward()
    # token 0 uses the clipped value (no gradient); the others get 0.5 * 2 * (V - R) / 3
    assert values.grad.tolist() == [pytest.approx([0.0, (0.1 - 1.0) / 3, -0.5 / 3, 0.0])]


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits
# ---------------------------------------------------------------------------------------------------------------------


def test_logprobs_from_logits_hand_values_and_agreement_with_log_softmax():
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    assert logprobs_from_logits(logits, torch.tensor([[1, 0]])).tolist() == [
        pytest.approx([math.log(0.75), math.log(0.25)])
    ]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)
    torch.testing.assert_close(logprobs_from_logits(logits, labels, chunk_rows=4), expected)


def test_logprobs_from_half_precision_logits_are_computed_in_float32():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 50, generator=gen) * 5).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 4), generator=gen)
    result = logprobs_from_logits(logits, labels, chunk_rows=3)
    assert result.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(result, expected)


def test_logprobs_from_logits_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="do not match logits"):
        logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_from_logits():
    uniform = torch.zeros(2, 3, 7, dtype=torch.float64)
    assert entropy_from_logits(uniform).tolist() == [[pytest.approx(math.log(7))] * 3] * 2
    two_way = t([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    assert entropy_from_logits(two_way).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    peaked = t([[100.0, 0.0, 0.0]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-40)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 9, generator=gen).to(torch.bfloat16)
    expected = torch.distributions.Categorical(logits=logits.float()).entropy()
    torch.testing.assert_close(entropy_from_logits(logits, chunk_rows=3), expected)


# ---------------------------------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_proportionally_with_a_clipped_error():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=6.0, n_steps=256)  # on target: unchanged
    assert controller.value == pytest.approx(0.2)
    controller.update(current_kl=7.5, n_steps=256)  # error 0.25 -> clipped to 0.2
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    value = controller.value
    controller.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert controller.value == pytest.approx(value * (1 - 0.1 * 100 / 10000))


def test_adaptive_kl_controller_rejects_non_positive_target_and_fixed_controller_never_moves():
    with pytest.raises(ValueError, match="must be positive"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    fixed = FixedKLController(0.05)
    fixed.update(current_kl=100.0, n_steps=1000)
    assert fixed.value == 0.05


# ---------------------------------------------------------------------------------------------------------------------
# Rollout helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_first_true_indices_gives_the_row_length_when_nothing_is_true():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    assert first_true_indices(bools).tolist() == [1, 3, 0]


def test_truncate_after_eos_keeps_the_first_stop_token_and_pads_the_rest():
    responses = torch.tensor([[5, 7, 2, 9, 2], [5, 3, 8, 2, 9], [1, 1, 1, 1, 1], [2, 4, 4, 4, 4]])
    truncated, mask = truncate_after_eos(responses, eos_ids=(2, 3), pad_id=0)
    assert truncated.tolist() == [[5, 7, 2, 0, 0], [5, 3, 0, 0, 0], [1, 1, 1, 1, 1], [2, 0, 0, 0, 0]]
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_truncate_after_eos_mask_is_exact_when_pad_equals_eos():
    # Qwen pads with <|endoftext|>, which is also a stop token: only the returned mask tells where responses end.
    truncated, mask = truncate_after_eos(torch.tensor([[4, 6, 2, 2], [4, 2, 7, 8]]), eos_ids=2, pad_id=2)
    assert truncated.tolist() == [[4, 6, 2, 2], [4, 2, 2, 2]]
    assert mask.int().tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_tokens_after_eos_do_not_change_rewards_or_advantages():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 6, 2, 7, 8], [5, 2, 9, 9, 9]])
    gen = torch.Generator().manual_seed(3)
    logprobs, ref, values = (-torch.rand(2, 5, generator=gen, dtype=torch.float64) for _ in range(3))

    def advantages_for(logprobs, ref, values):
        _, mask = truncate_after_eos(responses, eos, pad)
        rewards, _ = compute_rewards(t([1.0, -1.0]), logprobs, ref, mask, kl_coef=0.05, estimator="k3")
        return rewards, *compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)

    clean = advantages_for(logprobs, ref, values)
    after_eos = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    noisy = advantages_for(
        logprobs.masked_fill(after_eos, -50.0), ref.masked_fill(after_eos, 3.0), values.masked_fill(after_eos, 1e6)
    )
    for a, b in zip(clean, noisy, strict=True):
        torch.testing.assert_close(a, b)
    assert clean[0][0, 2].item() == pytest.approx(1.0 - 0.05 * kl_penalty(logprobs[0, 2], ref[0, 2], "k3").item())


def test_running_moments_match_the_moments_of_everything_seen():
    values = torch.randn(103, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 7.0 - 20.0
    moments = RunningMoments()
    for chunk in values.split([1, 16, 50, 36]):
        moments.update(chunk)
    assert moments.count == 103
    assert moments.mean == pytest.approx(values.mean().item())
    assert moments.std == pytest.approx(values.std(unbiased=False).item())
    normalized = moments.normalize(values)
    assert normalized.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert normalized.std(unbiased=False).item() == pytest.approx(1.0)
    moments.update(torch.empty(0))  # nothing seen, nothing changed
    assert moments.count == 103
