"""PPO building blocks: masked statistics, KL-shaped rewards, GAE, clipped losses and KL controllers.

All functions are pure torch and work on right-padded response tensors of shape `(batch, response_length)` with a
`mask` that is 1 (or `True`) on response tokens and 0 after the end of each response. Masked-out positions never
contribute to a statistic, a loss or an advantage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


KL_ESTIMATORS = ("k1", "k3", "abs", "mse")


def _zero_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` where `mask` is set, else 0. Uses `where` rather than `x * mask` so that inf/NaN at padded positions (e.g.
    log-probabilities of pad tokens) cannot turn into NaN, in the forward or the backward pass."""
    if mask.shape != x.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the values have shape {tuple(x.shape)}")
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is set: `sum(x * m) / sum(m)`, over `dim` or over all elements.

    A slice with an empty mask gives 0 (not NaN), so that an all-padding minibatch cannot poison a loss.
    """
    x = _zero_outside(x, mask)
    count = mask.to(x.dtype)
    if dim is None:
        return x.sum() / count.sum().clamp(min=1)
    return x.sum(dim) / count.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked elements of `x`: `mean_m((x - mean_m(x))^2)`, times `n / (n - 1)` when `unbiased`."""
    n = mask.to(x.dtype).sum()
    if n < (2 if unbiased else 1):
        raise ValueError(
            f"masked_var needs at least {2 if unbiased else 1} masked element(s) "
            f"({'unbiased' if unbiased else 'biased'} estimate), got {int(n)}"
        )
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered**2, mask)
    if unbiased:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the masked elements of `x` to unit variance: `(x - mean) / sqrt(var + eps)`.

    With `shift_mean=False` the mean is added back, so only the scale changes (used for rewards, whose sign carries
    meaning). Positions outside the mask are set to 0 so that they cannot leak into later sums.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_outside(whitened, mask)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probabilities of the sampled tokens.

    With `d = ref_logprobs - logprobs` (the log-ratio reference / policy):
    - `"k1"`: `-d = logp - ref`, unbiased but can be negative per token;
    - `"k3"`: `exp(d) - d - 1`, unbiased and always >= 0 (the estimator GRPO uses);
    - `"abs"`: `|logp - ref|`;
    - `"mse"`: `0.5 * (logp - ref)^2` (k2, biased but low-variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        d = -log_ratio
        return torch.expm1(d) - d
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"Unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def last_true_indices(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last set position of each row of a 2-D mask; raises if a row is empty."""
    mask = mask.bool()
    empty = ~mask.any(dim=-1)
    if empty.any():
        raise ValueError(f"rows {empty.nonzero().flatten().tolist()} of the response mask have no response token")
    positions = torch.arange(mask.size(-1), device=mask.device)
    return torch.where(mask, positions, -1).amax(dim=-1)


def compute_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-shaped per-token rewards (Ziegler et al. 2019): `r_t = -kl_coef * kl_t`, plus `score` on the last token.

    `score` has shape `(batch,)` and is added at the last masked position of each row (the EOS token, or the last
    sampled token of a truncated response). Returns `(rewards, kl)`, both zero outside the mask; `kl` is the
    unscaled per-token estimate from [`kl_penalty`], for logging and for the adaptive KL controller.
    """
    if score.dim() != 1 or score.size(0) != logprobs.size(0):
        raise ValueError(f"score must have shape ({logprobs.size(0)},), got {tuple(score.shape)}")
    kl = _zero_outside(kl_penalty(logprobs, ref_logprobs, estimator), mask)
    rewards = -kl_coef * kl
    last = last_true_indices(mask)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards, kl


def leave_one_out_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """`scores` minus, for each response, the mean score of the other responses to the same prompt (RLOO: Kool et
    al. 2019; Ahmadian et al. 2024).

    `scores` has shape `(prompts * group_size,)` with each prompt's responses consecutive. What remains says how much
    better a response is than its siblings, so a prompt on which every answer scores high (a one-word answer under
    a likelihood reward) no longer looks like a good action; each response's baseline excludes it, so it is unbiased.
    """
    if group_size < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 responses per prompt, got {group_size}")
    if scores.dim() != 1 or scores.size(0) % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    groups = scores.view(-1, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()


def _check_right_padded(mask: torch.Tensor) -> None:
    m = mask.bool()
    reopened = m[:, 1:] & ~m[:, :-1]
    if reopened.any():
        rows = reopened.any(dim=-1).nonzero().flatten().tolist()
        raise ValueError(f"the response mask must be 1s followed by 0s (right padding); rows {rows} are not")


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    `delta_t = r_t + gamma * V_{t+1} - V_t` and `A_t = delta_t + gamma * lam * A_{t+1}`, where `V_{t+1}` and
    `A_{t+1}` are 0 past the last response token (the episode ends there). Returns `(advantages, returns)` with
    `returns = A + V`; both are 0 outside the mask. The results are targets, so no gradient flows through them.
    """
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must have the same shape")
    _check_right_padded(mask)
    rewards, values = _zero_outside(rewards, mask), _zero_outside(values, mask)
    m = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * m[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    returns = _zero_outside(advantages + values, mask)
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate: `mean_m(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))` with `r = exp(logp - old_logp)`.

    Returns `(loss, clipfrac, approx_kl)`: `clipfrac` is the fraction of tokens where the clipped term is the larger
    one (so its gradient is 0), and `approx_kl = mean_m((r - 1) - log r)` estimates KL(old || new). The two
    statistics are detached.
    """
    log_ratio = _zero_outside(logprobs - old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: `0.5 * mean_m(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))`.

    Clipping keeps the critic from moving far from the rollout values in one update. Returns `(loss, clipfrac)`,
    `clipfrac` being the (detached) fraction of tokens where the clipped error is the larger one.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return loss, clipfrac


def _rows_in_float32(logits: torch.Tensor, chunk_rows: int):
    """Yield `(start, chunk)` over the flattened rows of `logits`, upcasting half-precision chunks to float32.

    Working chunk by chunk bounds the extra memory to `chunk_rows * vocab` floats instead of a full copy of the
    (batch, length, vocab) logits, which matters with Qwen's 151k vocabulary.
    """
    flat = logits.reshape(-1, logits.size(-1))
    upcast = flat.dtype in (torch.float16, torch.bfloat16)
    for start in range(0, flat.size(0), chunk_rows):
        chunk = flat[start : start + chunk_rows]
        yield start, chunk.float() if upcast else chunk


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Log-probability of each label: `logits[label] - logsumexp(logits)`, without materialising `log_softmax`.

    `logits` is `(..., vocab)` and `labels` `(...)` with valid token ids (mask padded positions afterwards). Half
    precision logits are computed in float32 and the result is float32, because PPO ratios `exp(logp - old_logp)`
    are sensitive to rounding.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)} without the vocab dim"
        )
    flat_labels = labels.reshape(-1, 1)
    out_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    out = torch.empty(flat_labels.size(0), dtype=out_dtype, device=logits.device)
    for start, chunk in _rows_in_float32(logits, chunk_rows):
        chunk_labels = flat_labels[start : start + chunk.size(0)]
        out[start : start + chunk.size(0)] = chunk.gather(-1, chunk_labels).squeeze(-1) - torch.logsumexp(chunk, -1)
    return out.view(labels.shape)


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Entropy of the softmax distribution at each position: `logsumexp(z) - sum(softmax(z) * z)`.

    Computed chunk by chunk (in float32 for half-precision logits), returning shape `logits.shape[:-1]`.
    """
    out_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    out = torch.empty(logits.shape[:-1].numel(), dtype=out_dtype, device=logits.device)
    for start, chunk in _rows_in_float32(logits, chunk_rows):
        probs = torch.softmax(chunk, dim=-1)
        out[start : start + chunk.size(0)] = torch.logsumexp(chunk, -1) - (probs * chunk).sum(-1)
    return out.view(logits.shape[:-1])


class RunningMoments:
    """Mean and standard deviation of every value seen so far (Chan et al.'s parallel update, one batch at a time).

    PPO uses it to put reward-model scores on a unit scale before they become returns, so that a critic starting at 0
    does not spend its updates chasing the scores' offset (the demo's likelihood reward model scores about -22: value
    loss ~135 raw, ~0.15 standardised; docs/findings.md).
    """

    def __init__(self, eps: float = 1e-8):
        self.mean, self.var, self.count, self.eps = 0.0, 1.0, 0, eps

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_var = float(values.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        squares = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = squares / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 0.0) ** 0.5 + self.eps

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std


class FixedKLController:
    """KL coefficient that never changes; `update` exists so both controllers share one interface."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Proportional KL controller of Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences".

    After each batch: `e = clip(KL / target - 1, -0.2, 0.2)` and `beta <- beta * (1 + e * n_steps / horizon)`, so the
    coefficient grows when the policy drifts past `target` nats and shrinks when it stays below.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be positive")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def first_true_indices(bools: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Index of the first `True` along the last dimension; rows without any give the length of that dimension."""
    length = bools.size(-1)
    positions = torch.arange(length, dtype=dtype, device=bools.device)
    return torch.where(bools.bool(), positions, length).amin(dim=-1).to(dtype)


def truncate_after_eos(
    responses: torch.Tensor, eos_ids: int | Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut sampled responses `(batch, length)` after their first stop token.

    Every token after the first id in `eos_ids` (Qwen stops on both `<|im_end|>` and `<|endoftext|>`) becomes
    `pad_id`. The stop token itself is kept, since choosing to stop is part of the policy. Returns
    `(truncated, mask)`, `mask` being `True` up to and including the stop token; it must be kept because
    `pad_id` usually equals an EOS id, so the end cannot be recovered from the tokens alone. Rows without a stop
    token are kept whole.
    """
    eos = torch.as_tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), device=responses.device)
    is_eos = torch.isin(responses, eos)
    end = first_true_indices(is_eos)  # == length when there is no stop token
    positions = torch.arange(responses.size(-1), device=responses.device)
    mask = positions.unsqueeze(0) <= end.unsqueeze(-1)
    truncated = torch.where(mask, responses, torch.full_like(responses, pad_id))
    return truncated, mask
