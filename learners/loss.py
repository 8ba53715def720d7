"""DAPO objective with importance correction for stale samples (see ARCHITECTURE.md, "The objective").

Pure functions over tensors: no config objects, no collectives, no I/O. For token ``t`` of
response ``i`` with behaviour logprob ``b`` (the engine that sampled it), proximal logprob ``p``
(the learner's weights before this step) and current logprob ``l``::

    is_weight = min(exp(p - b), is_cap)          # behaviour -> proximal, truncated, no grad
    ratio     = exp(l - p)                       # PPO ratio against the proximal policy
    loss_t    = -is_weight * min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)
    loss      = sum_t loss_t / number of response tokens in the step     (token-level mean)

With ``p == b`` (synchronous mode) every ``is_weight`` is 1 and this is the DAPO loss.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "masked_mean", "overlong_penalty", "policy_loss"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true.

    x: [...], mask: same shape (bool). Returns a 0-d tensor; 0 when the mask is empty, so an
    all-padding batch reports zeros instead of NaN. Masked-out entries of ``x`` may be anything,
    including inf or NaN: they are selected away, never multiplied by zero.
    """
    count = mask.sum()
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / count.clamp(min=1)


def _check_mask(mask: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as bool, rejecting float masks that are not 0/1 (weights are not supported)."""
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("policy_loss: mask must be bool or contain only 0 and 1 (1 = train on the token)")
    return mask != 0


def policy_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    is_cap: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance-corrected decoupled-clip policy loss, averaged over all response tokens.

    Args:
        logprobs: [B, T] log pi_theta(token) under the current weights; carries the gradient.
        proximal_logprobs: [B, T] log pi_prox(token), the learner's weights before this step.
        behavior_logprobs: [B, T] log pi_behav(token), reported by the engine that sampled it.
        advantages: [B] (one per response, broadcast over tokens) or [B, T].
        mask: [B, T] bool or 0/1 float; true for response tokens to train on. Values at masked
            positions of every other input are ignored, so padding may hold -inf.
        eps_low: lower clip range, ratio is clipped at ``1 - eps_low`` (DAPO: 0.2).
        eps_high: upper clip range, ratio is clipped at ``1 + eps_high`` (DAPO: 0.28).
        is_cap: truncation of the behaviour -> proximal importance weight (> 0).

    Returns:
        ``(loss, metrics)``: ``loss`` is a 0-d tensor, ``sum(loss_t) / n_tokens``; with no
        unmasked token it is an exact 0 that is still connected to ``logprobs`` so that
        ``backward()`` works (and yields zero gradients). ``metrics`` holds python floats,
        each a mean over unmasked tokens (0.0 when there are none):

        * ``clip_frac_low``: fraction with A < 0 and ratio < 1 - eps_low (low clip active).
        * ``clip_frac_high``: fraction with A > 0 and ratio > 1 + eps_high (high clip active).
        * ``is_weight_mean``: mean of the truncated importance weight.
        * ``is_truncated_frac``: fraction with exp(p - b) > is_cap.
        * ``behavior_proximal_kl``: KL(behaviour || proximal) on the sampled tokens, with the
          k3 estimator ``(exp(p - b) - 1) - (p - b)``. Tokens are drawn from the behaviour
          policy and exp(p - b) = pi_prox / pi_behav, so this is unbiased for the KL and, unlike
          the plain ``b - p`` estimator, never negative per token (x - 1 >= log x).
        * ``ratio_mean``: mean of ratio = exp(l - p).
        * ``loss``: the returned loss as a float.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"policy_loss: logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, tensor in (
        ("proximal_logprobs", proximal_logprobs),
        ("behavior_logprobs", behavior_logprobs),
        ("mask", mask),
    ):
        if tensor.shape != shape:
            raise ValueError(
                f"policy_loss: {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} like logprobs"
            )
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"policy_loss: advantages has shape {tuple(advantages.shape)}, "
            f"expected [B] = {tuple(shape[:1])} or [B, T] = {tuple(shape)}"
        )
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"policy_loss: eps_low must be in [0, 1), got {eps_low}")
    if eps_high < 0.0:
        raise ValueError(f"policy_loss: eps_high must be >= 0, got {eps_high}")
    if is_cap <= 0.0:
        raise ValueError(f"policy_loss: is_cap must be > 0, got {is_cap}")

    token_mask = _check_mask(mask)
    # Compute in at least float32: exp() of a bf16 log-difference is off by up to ~0.4%,
    # which is larger than the policy changes the clip is meant to resolve.
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.detach().to(dtype).expand(shape)
    zeros = torch.zeros(shape, dtype=dtype, device=logprobs.device)

    # Select masked positions away *before* exp(): padding may hold -inf, and exp(inf) * 0 is NaN
    # in the forward pass and in the gradient. Masked tokens get log_ratio 0 (ratio 1) and A 0.
    proximal = proximal_logprobs.detach().to(dtype)
    log_is_weight = torch.where(token_mask, proximal - behavior_logprobs.detach().to(dtype), zeros)
    log_ratio = torch.where(token_mask, logprobs.to(dtype) - proximal, zeros)
    advantages = torch.where(token_mask, advantages, zeros)

    # The importance weight corrects for sampling from an older policy; it is a constant of the
    # step (no gradient), truncated so one very stale token cannot dominate the batch.
    is_weight = log_is_weight.exp().clamp(max=is_cap)
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    # Pessimistic bound: the min keeps the unclipped term whenever it is the worse of the two,
    # so the clip only removes the incentive to move the ratio further in the advantage's direction.
    surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    per_token_loss = -is_weight * surrogate

    # With no unmasked token the sum is an exact 0 that is still connected to logprobs (through
    # the where), so backward() and DDP hooks run. Not (logprobs * 0).sum(): padding may be -inf.
    n_tokens = max(int(token_mask.sum()), 1)
    loss = torch.where(token_mask, per_token_loss, zeros).sum() / n_tokens

    with torch.no_grad():
        clip_low = (advantages < 0) & (ratio < 1.0 - eps_low)
        clip_high = (advantages > 0) & (ratio > 1.0 + eps_high)
        is_truncated = log_is_weight.exp() > is_cap
        # k3 estimator of KL(behaviour || proximal), see the docstring.
        kl_k3 = log_is_weight.exp() - 1.0 - log_is_weight
        metrics = {
            "clip_frac_low": masked_mean(clip_low.to(dtype), token_mask).item(),
            "clip_frac_high": masked_mean(clip_high.to(dtype), token_mask).item(),
            "is_weight_mean": masked_mean(is_weight, token_mask).item(),
            "is_truncated_frac": masked_mean(is_truncated.to(dtype), token_mask).item(),
            "behavior_proximal_kl": masked_mean(kl_k3, token_mask).item(),
            "ratio_mean": masked_mean(ratio, token_mask).item(),
            "loss": loss.item(),
        }
    return loss, metrics


def group_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """GRPO/DAPO group-normalized advantages ``(r - mean_group) / (std_group + eps)``.

    rewards: [N, G], one row per prompt, ``G`` sampled responses each. Returns [N, G] float
    (float32 unless ``rewards`` is float64).

    ``std_group`` is the *sample* standard deviation (Bessel's correction, divides by G - 1), as
    ``torch.std`` does and as verl's GRPO/DAPO advantage uses, so results match that reference.
    A group of equal rewards gets zeros. With ``G == 1`` there is no baseline and the sample std
    is undefined, so the advantages are zeros (such a sample carries no learning signal).
    """
    if rewards.dim() != 2:
        raise ValueError(f"group_advantages: rewards must be [N, G], got shape {tuple(rewards.shape)}")
    if eps <= 0.0:
        raise ValueError(f"group_advantages: eps must be > 0 (it guards division by a zero std), got {eps}")
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if rewards.shape[1] == 1:
        return torch.zeros_like(rewards)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=1)
    return (rewards - mean) / (std + eps)


def overlong_penalty(
    lengths: torch.Tensor, *, max_len: int, buffer: int, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment (paper eq. 13), added to the reward of each response.

    lengths: [N] integer response lengths in tokens. Returns [N] float32::

        0                                          if len <= max_len - buffer
        ((max_len - buffer) - len) / buffer * penalty   if max_len - buffer < len <= max_len
        -penalty                                   if len > max_len

    The ramp is continuous: it reaches ``-penalty`` exactly at ``len == max_len``. ``buffer == 0``
    disables the shaping (all zeros).
    """
    if lengths.dim() != 1:
        raise ValueError(f"overlong_penalty: lengths must be [N], got shape {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"overlong_penalty: lengths must be an integer tensor, got {lengths.dtype}")
    if max_len <= 0:
        raise ValueError(f"overlong_penalty: max_len must be > 0, got {max_len}")
    if not 0 <= buffer <= max_len:
        raise ValueError(f"overlong_penalty: buffer must be in [0, max_len={max_len}], got {buffer}")
    if penalty < 0.0:
        raise ValueError(f"overlong_penalty: penalty must be >= 0 (it is subtracted), got {penalty}")

    if buffer == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    soft_start = max_len - buffer
    length = lengths.to(torch.float32)
    ramp = (soft_start - length) / buffer * penalty
    shaped = torch.where(length > soft_start, ramp, torch.zeros_like(length))
    return torch.where(length > max_len, torch.full_like(length, -penalty), shaped)
