"""Hand-computed tests for learners/loss.py.

Inputs are built from chosen ratios and importance weights: logprobs = proximal + ln(ratio) and
behavior = proximal - ln(w_raw), so exp(l - p) = ratio and exp(p - b) = w_raw. Every expected
value below is worked out by hand in the comments, never with the implementation's formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from learners.loss import group_advantages, masked_mean, overlong_penalty, policy_loss

# DAPO paper defaults; 1 - eps_low = 0.8 and 1 + eps_high = 1.28 are the clip bounds used below.
EPS_LOW = 0.2
EPS_HIGH = 0.28
# Large enough that no test below truncates unless it means to.
NO_CAP = 100.0
# Arbitrary, distinct proximal logprobs: the loss depends only on differences.
PROXIMAL_BASE = [-1.0, -2.0, -0.5, -3.0, -1.5]


def make_inputs(
    ratios: list[list[float]],
    raw_is_weights: list[list[float]] | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [B, T] requiring grad, proximal [B, T], behavior [B, T]) with the given ratios."""
    rows, cols = len(ratios), len(ratios[0])
    proximal = torch.tensor([PROXIMAL_BASE[:cols]] * rows, dtype=dtype)
    log_ratio = torch.tensor([[math.log(r) for r in row] for row in ratios], dtype=dtype)
    logprobs = (proximal + log_ratio).requires_grad_(True)
    if raw_is_weights is None:
        behavior = proximal.clone()
    else:
        log_w = torch.tensor([[math.log(w) for w in row] for row in raw_is_weights], dtype=dtype)
        behavior = proximal - log_w
    return logprobs, proximal, behavior


def run(
    logprobs: torch.Tensor,
    proximal: torch.Tensor,
    behavior: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    is_cap: float = NO_CAP,
) -> tuple[torch.Tensor, dict[str, float]]:
    return policy_loss(
        logprobs, proximal, behavior, advantages, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, is_cap=is_cap
    )


def t64(values: list[float] | list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------- policy_loss


def test_unclipped_branch_inside_band() -> None:
    # ratios 1.1, 0.9, 1.0 are all inside [0.8, 1.28]; A = 2 for the row, w = 1.
    # loss_t = -r * A = -2.2, -1.8, -2.0; sum = -6.0; 3 tokens -> loss = -2.0.
    logprobs, proximal, behavior = make_inputs([[1.1, 0.9, 1.0]])
    loss, metrics = run(logprobs, proximal, behavior, t64([2.0]), torch.ones(1, 3, dtype=torch.bool))
    assert loss.item() == pytest.approx(-2.0, abs=1e-12)
    assert metrics["loss"] == pytest.approx(-2.0, abs=1e-12)
    assert metrics["clip_frac_low"] == 0.0
    assert metrics["clip_frac_high"] == 0.0
    # (1.1 + 0.9 + 1.0) / 3 = 1.0
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-12)
    loss.backward()
    # d loss_t / d l_t = -w * A * r / n = -2 * r / 3 -> -2.2/3, -1.8/3, -2.0/3
    expected_grad = t64([[-2.2 / 3, -1.8 / 3, -2.0 / 3]])
    torch.testing.assert_close(logprobs.grad, expected_grad, rtol=0, atol=1e-12)


def test_clip_high_low_and_pessimistic_min() -> None:
    # token 0: A=+1, r=1.5 > 1.28 -> min(1.5, 1.28) = 1.28, clip high active, loss_t = -1.28, grad 0
    # token 1: A=-1, r=0.5 < 0.8  -> min(-0.5, -0.8) = -0.8, clip low active, loss_t = +0.8, grad 0
    # token 2: A=+1, r=0.5 < 0.8  -> min(0.5, 0.8) = 0.5, unclipped kept,     loss_t = -0.5
    # token 3: A=-1, r=1.5 > 1.28 -> min(-1.5, -1.28) = -1.5, unclipped kept, loss_t = +1.5
    # sum = -1.28 + 0.8 - 0.5 + 1.5 = 0.52; 4 tokens -> loss = 0.13
    logprobs, proximal, behavior = make_inputs([[1.5, 0.5, 0.5, 1.5]])
    advantages = t64([[1.0, -1.0, 1.0, -1.0]])
    loss, metrics = run(logprobs, proximal, behavior, advantages, torch.ones(1, 4))
    assert loss.item() == pytest.approx(0.13, abs=1e-12)
    # one token of four clipped on each side
    assert metrics["clip_frac_high"] == pytest.approx(0.25)
    assert metrics["clip_frac_low"] == pytest.approx(0.25)
    # (1.5 + 0.5 + 0.5 + 1.5) / 4 = 1.0
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-12)
    loss.backward()
    # unclipped tokens: -w * A * r / n -> token 2: -1 * 1 * 0.5 / 4 = -0.125; token 3: -1 * -1 * 1.5 / 4 = 0.375
    expected_grad = t64([[0.0, 0.0, -0.125, 0.375]])
    torch.testing.assert_close(logprobs.grad, expected_grad, rtol=0, atol=1e-12)


def test_masked_tokens_contribute_nothing() -> None:
    # Same four tokens as above plus one masked token per row; the loss stays 0.13.
    mask = torch.tensor([[True, True, True, True, False]])
    advantages = t64([[1.0, -1.0, 1.0, -1.0, 3.0]])
    logprobs, proximal, behavior = make_inputs([[1.5, 0.5, 0.5, 1.5, 1.0]])
    loss, _ = run(logprobs, proximal, behavior, advantages, mask)
    assert loss.item() == pytest.approx(0.13, abs=1e-12)

    # Wild values at the masked position: huge ratio, huge weight, huge advantage, then padding
    # values (-inf logprobs, NaN advantage) that must be selected away, not multiplied by zero.
    for wild_l, wild_b, wild_a in ((50.0, -80.0, 1e6), (-math.inf, -math.inf, math.nan)):
        wild_logprobs = logprobs.detach().clone()
        wild_logprobs[0, 4] = wild_l
        wild_logprobs.requires_grad_(True)
        wild_behavior = behavior.clone()
        wild_behavior[0, 4] = wild_b
        wild_advantages = advantages.clone()
        wild_advantages[0, 4] = wild_a
        wild_loss, wild_metrics = run(wild_logprobs, proximal, wild_behavior, wild_advantages, mask)
        assert wild_loss.item() == pytest.approx(0.13, abs=1e-12)
        assert wild_metrics["clip_frac_high"] == pytest.approx(0.25)
        assert wild_metrics["is_weight_mean"] == pytest.approx(1.0)
        assert wild_metrics["behavior_proximal_kl"] == pytest.approx(0.0, abs=1e-12)
        wild_loss.backward()
        assert wild_logprobs.grad is not None
        assert torch.isfinite(wild_logprobs.grad).all()
        assert wild_logprobs.grad[0, 4].item() == 0.0


def test_float_mask_matches_bool_mask() -> None:
    logprobs, proximal, behavior = make_inputs([[1.5, 0.5, 0.9], [1.1, 0.7, 1.3]])
    advantages = t64([1.0, -0.5])
    bool_mask = torch.tensor([[True, True, False], [True, False, True]])
    loss_bool, _ = run(logprobs, proximal, behavior, advantages, bool_mask)
    loss_float, _ = run(logprobs, proximal, behavior, advantages, bool_mask.double())
    assert loss_bool.item() == loss_float.item()
    with pytest.raises(ValueError, match="mask"):
        run(logprobs, proximal, behavior, advantages, bool_mask.double() * 0.5)


def test_importance_weight_cap() -> None:
    # raw weights exp(p - b) = 3, 0.5, 1 with is_cap = 2 -> w = 2, 0.5, 1 (first one truncated).
    # r = 1, A = 1 everywhere -> loss_t = -w = -2, -0.5, -1; sum = -3.5; loss = -3.5 / 3 = -1.1666...
    logprobs, proximal, behavior = make_inputs([[1.0, 1.0, 1.0]], raw_is_weights=[[3.0, 0.5, 1.0]])
    loss, metrics = run(logprobs, proximal, behavior, t64([1.0]), torch.ones(1, 3), is_cap=2.0)
    assert loss.item() == pytest.approx(-1.1666666666666667, abs=1e-12)
    # mean of the truncated weights: (2 + 0.5 + 1) / 3 = 1.1666...
    assert metrics["is_weight_mean"] == pytest.approx(1.1666666666666667, abs=1e-12)
    assert metrics["is_truncated_frac"] == pytest.approx(1 / 3)
    # k3 per token, x = p - b: (e^x - 1) - x
    #   x = ln 3   -> 2 - 1.0986122887 = 0.9013877113
    #   x = ln 0.5 -> -0.5 + 0.6931471806 = 0.1931471806
    #   x = 0      -> 0
    # mean = 1.0945348919 / 3 = 0.3648449640
    assert metrics["behavior_proximal_kl"] == pytest.approx(0.3648449640, abs=1e-9)
    loss.backward()
    # unclipped, r = 1: grad = -w * A * r / 3 = -2/3, -0.5/3, -1/3 (the truncated weight is used)
    torch.testing.assert_close(logprobs.grad, t64([[-2 / 3, -0.5 / 3, -1 / 3]]), rtol=0, atol=1e-12)


def test_hand_gradient_one_token_each_branch() -> None:
    # token 0: w = 0.5, A = 2, r = 1.1 (unclipped) -> d/dl = -w * A * r / n = -0.5 * 2 * 1.1 / 2 = -0.55
    # token 1: w = 0.5, A = 2, r = 1.5 (clip high) -> clipped value is a constant -> d/dl = 0
    logprobs, proximal, behavior = make_inputs([[1.1, 1.5]], raw_is_weights=[[0.5, 0.5]])
    loss, _ = run(logprobs, proximal, behavior, t64([2.0]), torch.ones(1, 2))
    # loss = (-0.5 * 2 * 1.1 + -0.5 * 2 * 1.28) / 2 = (-1.1 - 1.28) / 2 = -1.19
    assert loss.item() == pytest.approx(-1.19, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, t64([[-0.55, 0.0]]), rtol=0, atol=1e-12)
    # the weight is a constant of the step: no gradient flows to proximal or behaviour
    assert not proximal.requires_grad and not behavior.requires_grad


def test_gradcheck_float64() -> None:
    # Ratios are kept away from the clip bounds 0.8 and 1.28 so finite differences never straddle
    # a kink of the min/clip. Mixed signs of A, raw weights above and below the cap, one masked token.
    ratios = [[1.1, 0.5, 1.5, 0.95], [1.4, 0.7, 1.05, 0.6]]
    logprobs, proximal, behavior = make_inputs(
        ratios, raw_is_weights=[[0.5, 3.0, 1.2, 0.9], [1.0, 0.8, 2.5, 1.1]]
    )
    advantages = t64([[1.0, -1.0, -0.5, 2.0], [0.7, 1.3, -2.0, -0.4]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, True]])

    def loss_of(lp: torch.Tensor) -> torch.Tensor:
        return policy_loss(
            lp, proximal, behavior, advantages, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, is_cap=2.0
        )[0]

    assert torch.autograd.gradcheck(loss_of, (logprobs,), eps=1e-6, atol=1e-8)


def test_token_level_mean_not_mean_of_row_means() -> None:
    # row 0: one response token (A = 4), two padding tokens; row 1: three tokens (A = 1). r = w = 1.
    # loss_t: row 0 -> -4; row 1 -> -1, -1, -1.
    # token-level: (-4 - 3) / 4 tokens = -1.75
    # mean of row means would be (-4 / 1 + -3 / 3) / 2 = -2.5 (a different number)
    logprobs, proximal, behavior = make_inputs([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    loss, _ = run(logprobs, proximal, behavior, t64([4.0, 1.0]), mask)
    assert loss.item() == pytest.approx(-1.75, abs=1e-12)
    assert loss.item() != pytest.approx(-2.5)


def test_advantages_per_response_broadcast_matches_per_token() -> None:
    logprobs, proximal, behavior = make_inputs(
        [[1.5, 0.5, 0.9, 1.2], [1.1, 0.7, 1.3, 0.85]],
        raw_is_weights=[[1.2, 0.8, 3.0, 1.0], [1.0, 1.0, 0.5, 2.0]],
    )
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    per_response = t64([0.75, -1.25])
    per_token = per_response.unsqueeze(1).expand(2, 4).clone()
    loss_b, metrics_b = run(logprobs, proximal, behavior, per_response, mask, is_cap=2.0)
    loss_bt, metrics_bt = run(logprobs, proximal, behavior, per_token, mask, is_cap=2.0)
    assert loss_b.item() == loss_bt.item()
    assert metrics_b == metrics_bt


def test_all_masked_returns_zero_with_grad() -> None:
    logprobs, proximal, behavior = make_inputs([[1.5, 0.5], [1.1, 0.9]])
    loss, metrics = run(logprobs, proximal, behavior, t64([1.0, -1.0]), torch.zeros(2, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    assert loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.zeros(2, 2, dtype=torch.float64))
    assert all(value == 0.0 for value in metrics.values())

    # An all-padding batch whose logprobs are -inf must still give 0, not NaN (-inf * 0).
    padded = torch.full((2, 2), -math.inf, dtype=torch.float64, requires_grad=True)
    loss, _ = run(padded, proximal, behavior, t64([1.0, -1.0]), torch.zeros(2, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    torch.testing.assert_close(padded.grad, torch.zeros(2, 2, dtype=torch.float64))


def test_sync_case_reduces_to_dapo() -> None:
    # proximal == behavior -> w = 1 everywhere. Plain DAPO clipped loss by hand:
    # r = 1.1, A = +1 -> -1.1 (inside band)
    # r = 1.5, A = +1 -> -1.28 (clip high)
    # r = 0.5, A = -1 -> +0.8 (clip low)
    # sum = -1.58; 3 tokens -> -0.52666...
    logprobs, proximal, behavior = make_inputs([[1.1, 1.5, 0.5]], dtype=torch.float32)
    loss, metrics = run(logprobs, proximal, behavior, torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-0.5266666666666667, abs=1e-6)
    assert metrics["is_weight_mean"] == 1.0
    assert metrics["is_truncated_frac"] == 0.0
    assert metrics["behavior_proximal_kl"] == 0.0
    assert metrics["clip_frac_high"] == pytest.approx(1 / 3)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 3)


def test_bad_shapes_and_arguments_raise() -> None:
    logprobs, proximal, behavior = make_inputs([[1.0, 1.0, 1.0]])
    mask = torch.ones(1, 3)
    with pytest.raises(ValueError, match="proximal_logprobs"):
        run(logprobs, proximal[:, :2], behavior, t64([1.0]), mask)
    with pytest.raises(ValueError, match="behavior_logprobs"):
        run(logprobs, proximal, behavior.T, t64([1.0]), mask)
    with pytest.raises(ValueError, match="mask"):
        run(logprobs, proximal, behavior, t64([1.0]), torch.ones(3))
    with pytest.raises(ValueError, match="advantages"):
        run(logprobs, proximal, behavior, t64([1.0, 2.0]), mask)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        run(logprobs[0], proximal[0], behavior[0], t64([1.0]), mask[0])
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(logprobs, proximal, behavior, t64([1.0]), mask, eps_low=1.0, eps_high=0.28, is_cap=2.0)
    with pytest.raises(ValueError, match="is_cap"):
        policy_loss(logprobs, proximal, behavior, t64([1.0]), mask, eps_low=0.2, eps_high=0.28, is_cap=0.0)


def test_masked_mean() -> None:
    x = torch.tensor([[1.0, 2.0, math.inf], [4.0, math.nan, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    # (1 + 2 + 4 + 6) / 4 = 3.25; the inf and NaN are masked out
    assert masked_mean(x, mask).item() == 3.25
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------------------- group_advantages


def test_group_advantages_hand_values_sample_std() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 4.0]])
    advantages = group_advantages(rewards)
    # row 0: mean 0.5, deviations +-0.5, sum of squares 1.0, sample var 1/3, std 0.5773502692
    #        -> +-0.5 / 0.5773502692 = +-0.8660254 (the population std, 0.5, would give +-1)
    # row 1: all equal -> deviations 0 -> 0 / (0 + eps) = 0
    # row 2: mean 1, deviations -1, -1, -1, 3, sum of squares 12, sample var 4, std 2
    #        -> -0.5, -0.5, -0.5, 1.5
    expected = torch.tensor(
        [
            [0.8660254, -0.8660254, -0.8660254, 0.8660254],
            [0.0, 0.0, 0.0, 0.0],
            [-0.5, -0.5, -0.5, 1.5],
        ]
    )
    torch.testing.assert_close(advantages, expected, rtol=0, atol=5e-6)
    assert advantages.dtype == torch.float32


def test_group_advantages_integer_rewards_and_single_sample_groups() -> None:
    # integer rewards are promoted: [[3, 1]] -> mean 2, deviations +-1, sample std sqrt(2) = 1.4142136
    # -> +-1 / 1.4142136 = +-0.7071068
    advantages = group_advantages(torch.tensor([[3, 1]]))
    torch.testing.assert_close(advantages, torch.tensor([[0.7071068, -0.7071068]]), rtol=0, atol=5e-6)
    # G == 1: no baseline, zeros (not NaN from a G - 1 = 0 divisor)
    single = group_advantages(torch.tensor([[1.0], [0.0], [5.0]]))
    torch.testing.assert_close(single, torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"\[N, G\]"):
        group_advantages(torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------------- overlong_penalty


def test_overlong_penalty_region_boundaries() -> None:
    # max_len 20, buffer 4 -> soft region starts after 16.
    # 10 -> 0; 16 (exactly max_len - buffer) -> 0; 17 -> (16 - 17) / 4 = -0.25; 18 -> -0.5;
    # 20 (exactly max_len) -> (16 - 20) / 4 = -1.0; 21 (beyond) -> -1.0
    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    penalties = overlong_penalty(lengths, max_len=20, buffer=4)
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    torch.testing.assert_close(penalties, expected, rtol=0, atol=0)
    # penalty 2 scales the ramp and the cap: 17 -> -0.5, 20 -> -2, 30 -> -2
    scaled = overlong_penalty(torch.tensor([16, 17, 20, 30]), max_len=20, buffer=4, penalty=2.0)
    torch.testing.assert_close(scaled, torch.tensor([0.0, -0.5, -2.0, -2.0]), rtol=0, atol=0)


def test_overlong_penalty_buffer_zero_disables() -> None:
    penalties = overlong_penalty(torch.tensor([5, 20, 25]), max_len=20, buffer=0)
    torch.testing.assert_close(penalties, torch.zeros(3), rtol=0, atol=0)


def test_overlong_penalty_validates_arguments() -> None:
    lengths = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_len=10, buffer=11)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_len=10, buffer=-1)
    with pytest.raises(ValueError, match="max_len"):
        overlong_penalty(lengths, max_len=0, buffer=0)
    with pytest.raises(ValueError, match="penalty"):
        overlong_penalty(lengths, max_len=10, buffer=2, penalty=-1.0)
    with pytest.raises(ValueError, match="integer"):
        overlong_penalty(torch.tensor([1.0, 2.0]), max_len=10, buffer=2)
    with pytest.raises(ValueError, match=r"\[N\]"):
        overlong_penalty(torch.tensor([[1, 2]]), max_len=10, buffer=2)
