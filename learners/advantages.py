"""Advantage estimators: one per value of ``algorithm.advantage``, chosen in ``make_estimator``.

Interface the learner wires (one estimator object per run)::

    estimator = make_estimator(kind, group_size=G, ...)  # once, at start-up (kind: "group", ...)
    estimator.load_state_dict(state)                     # on resume; state holds tensors only
    ...                                                  # every step:
    inputs = AdvantageInputs(rewards=shaped, prompt_ids=ids, group_size=G, embeddings=..., ...)
    advantages = estimator(inputs)    # [N] or, for "direct", [N, R]; policy_loss takes either
    metrics.update(estimator.metrics) # "advantage/..." keys, python floats
    state = estimator.state_dict()    # into the checkpoint (safetensors-compatible: tensors only)

* Rows are group-major, as ``trainer.make_batch`` builds them: rows ``g*G .. g*G+G-1`` are the
  ``G`` responses of one group. ``prompt_ids`` are stable across steps (the dataset's prompt id,
  ``TrajectoryGroup.prompt_id``): the stateful estimators key their history on them.
* ``estimator(inputs)`` computes the advantages and *then* records the batch in the estimator's
  history, so a sample's baseline never contains its own reward. Call it once per learner step.
  ``estimator.values(inputs)`` returns the baseline (the value estimate) without touching state.
* ``estimator.needs_embeddings`` / ``needs_tokens`` say which optional inputs must be filled.
* ``estimator.filters_zero_variance`` (also ``zero_variance_filter_applies(kind, G)``) says
  whether dynamic sampling's "drop groups whose rewards are all equal" filter is meaningful. It
  is for the group-relative estimators with ``G >= 2`` only: there an all-equal group gets zero
  advantage. With ``G == 1`` every "group" is all-equal, and the batch/history/kernel/critic
  estimators give an all-equal group a non-zero advantage, so dropping it would waste signal.

Every estimator has a baseline at ``G == 1``: "group" and "rloo" then use the whole batch as the
group (the only other rewards there are), the others do not depend on ``G``.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from async_rl.config import AdvantageKind, Config
from learners.critic import DirectEstimator, StepCritic, delimiter_token_ids, load_latest_critic
from learners.loss import group_advantages

# Guards divisions by a zero standard deviation; the same value as loss.group_advantages.
EPS = 1e-6
# Shrinkage pseudo-count used before the history can estimate one (fewer than two prompts seen
# twice): one prior "sample" of the batch mean, a neutral middle between trusting and ignoring.
DEFAULT_SHRINKAGE = 1.0
# Upper bound of the estimated pseudo-count: when prompts look identical (between-prompt variance
# ~0) the estimate diverges; 1e3 already means "use the batch mean".
MAX_SHRINKAGE = 1e3
# Weight of the batch mean in the kernel baseline: negligible next to any real neighbour (a kernel
# weight is 1 at distance 0), it only decides the baseline of a point with no neighbour at all.
KERNEL_PRIOR_WEIGHT = 1e-3
# Bandwidths tried by the "cv" rule, as multiples of the median heuristic: 1/32 .. 2, log-spaced.
CV_BANDWIDTH_FACTORS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)
# Pairs used for the median distance: a random subsample keeps the median O(1) in the history size.
MEDIAN_MAX_PAIRS = 200_000


@dataclass
class AdvantageInputs:
    """One learner step's batch, as the estimators see it. ``N = n_groups * group_size`` rows.

    rewards: [N] float, shaped rewards (overlong penalty already added), group-major.
    prompt_ids: [N] int64, the prompt's dataset id (stable across steps).
    embeddings: [N, D] float, "kernel" only: the policy's own representation of the prompt, e.g.
        ``mean_pool(last_hidden_state, prompt_mask)``.
    input_ids: [N, L] long, prompt + response right-padded ("direct" only, ``Batch.input_ids``).
    prompt_lengths: [N] long, prompt tokens in each row of ``input_ids`` ("direct" only).
    response_mask: [N, R] bool, response token j of row i is ``input_ids[i, prompt_lengths[i] + j]``.
    """

    rewards: torch.Tensor
    prompt_ids: torch.Tensor
    group_size: int
    embeddings: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    prompt_lengths: torch.Tensor | None = None
    response_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.rewards.shape[0] if self.rewards.dim() == 1 else -1
        if n < 0 or self.group_size < 1 or n % self.group_size != 0:
            raise ValueError(
                f"AdvantageInputs: rewards {tuple(self.rewards.shape)} is not [n_groups * {self.group_size}]"
            )
        if self.prompt_ids.shape != (n,):
            raise ValueError(f"AdvantageInputs: prompt_ids {tuple(self.prompt_ids.shape)}, want [{n}]")
        if self.embeddings is not None and (self.embeddings.dim() != 2 or self.embeddings.shape[0] != n):
            raise ValueError(f"AdvantageInputs: embeddings {tuple(self.embeddings.shape)}, want [{n}, D]")


class AdvantageEstimator(Protocol):
    """What the learner calls. See the module docstring for the call order."""

    filters_zero_variance: bool
    needs_embeddings: bool
    needs_tokens: bool
    metrics: dict[str, float]

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor: ...

    def values(self, inputs: AdvantageInputs) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def zero_variance_filter_applies(kind: AdvantageKind, group_size: int) -> bool:
    """Whether an all-equal group carries no signal under ``kind``: true only for the
    group-relative estimators ("group", "rloo") with ``group_size >= 2``."""
    return kind in (AdvantageKind.GROUP, AdvantageKind.RLOO) and group_size >= 2


# ----------------------------------------------------------------------------- pure functions


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _loo_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the *other* entries along the last dim, [..., n] -> [..., n]; zeros when n == 1."""
    n = x.shape[-1]
    if n == 1:
        return torch.zeros_like(x)
    return (x.sum(dim=-1, keepdim=True) - x) / (n - 1)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): each of the ``G`` samples
    of a prompt uses the mean reward of the other ``G - 1`` as its baseline::

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j  =  G/(G-1) * (r_i - mean_group)

    No division by a standard deviation. rewards: [n, G] -> [n, G]; with ``G == 1`` zeros.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rloo_advantages: rewards must be [n, G], got shape {tuple(rewards.shape)}")
    rewards = _as_float(rewards)
    return rewards - _loo_mean(rewards)


def batch_advantages(rewards: torch.Tensor, *, eps: float = EPS) -> torch.Tensor:
    """REINFORCE++ (Hu 2025) global advantage normalization: one baseline and one scale for the
    whole batch instead of per prompt::

        A_i = (r_i - mean_batch) / (std_batch + eps)      (sample std, as group_advantages)

    rewards: [N] -> [N]; a batch of one row gets zero.
    """
    if rewards.dim() != 1:
        raise ValueError(f"batch_advantages: rewards must be [N], got shape {tuple(rewards.shape)}")
    return group_advantages(rewards.unsqueeze(0), eps=eps).squeeze(0)


def _scale(centered: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Divide by the batch std of the centered rewards (no re-centering, that would replace the
    baseline by the batch mean): keeps advantages near unit scale like the "group" estimator, so a
    learning rate tuned for one transfers. A batch-wide scalar, it does not change the direction."""
    if centered.numel() < 2:
        return centered
    return centered / (centered.std(correction=1) + eps)


def basis_baseline(
    rewards: torch.Tensor,
    prompt_ids: torch.Tensor,
    history_count: torch.Tensor,
    history_mean: torch.Tensor,
    *,
    shrinkage: float,
    calibrate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BASIS-style batchwise value estimate (after Gong et al. 2026, "BASIS: Batchwise Advantage
    Estimation from Single-Rollout Information Sharing"): one rollout per prompt is enough when
    the baseline borrows from the prompt's earlier rollouts and from the rest of the batch.

    For row ``i`` with prompt ``p``::

        n_h, m_h  = weight and mean of p's earlier rewards (history, "offline estimate")
        d_i       = mean over the *other* rows j with history of (r_j - m_h(p_j))
                    (online calibration: the policy moved since the history was recorded)
        n_c, s_c  = count and sum of the other rows of p in this batch
        mu_i      = mean reward of the other rows of the batch (the prior)
        V_i = (n_h * (m_h + d_i) + s_c + kappa * mu_i) / (n_h + n_c + kappa)

    a precision-weighted (empirical-Bayes) mean that shrinks the per-prompt estimate toward the
    batch with ``kappa`` prior pseudo-samples. Nothing in ``V_i`` depends on ``r_i``, so using
    it as a baseline keeps the policy gradient unbiased.

    The paper's abstract names the ingredients (batch information sharing, offline estimation,
    online calibration); the formulas above are this module's reading of them, not its equations.

    rewards, history_count, history_mean: [N] float; prompt_ids: [N]. ``history_mean`` is ignored
    where ``history_count == 0``. Returns ``(V [N] float64, d [N] float64)``.
    """
    if shrinkage < 0:
        raise ValueError(f"basis_baseline: shrinkage must be >= 0, got {shrinkage}")
    r = rewards.to(torch.float64)
    n_h = history_count.to(torch.float64)
    has = n_h > 0
    m_h = torch.where(has, history_mean.to(torch.float64), torch.zeros_like(r))
    _, inverse = torch.unique(prompt_ids, return_inverse=True)
    n_c = torch.bincount(inverse)[inverse].to(torch.float64) - 1.0
    s_c = torch.bincount(inverse, weights=r)[inverse] - r
    drift = torch.zeros_like(r)
    if calibrate and bool(has.any()):
        residual = torch.where(has, r - m_h, torch.zeros_like(r))
        others = has.sum().to(torch.float64) - has.to(torch.float64)
        drift = torch.where(others > 0, (residual.sum() - residual) / others.clamp(min=1.0), drift)
    prior = _loo_mean(r)
    numerator = n_h * (m_h + drift) + s_c + shrinkage * prior
    denominator = n_h + n_c + shrinkage
    value = torch.where(denominator > 0, numerator / denominator.clamp(min=EPS), prior)
    return value, drift


def empirical_bayes_shrinkage(
    count: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor
) -> float | None:
    """Method-of-moments pseudo-count ``kappa = sigma_within^2 / tau_between^2`` from per-prompt
    sufficient statistics (weights, sums, sums of squares; [P] each). ``sigma_within^2`` is the
    pooled variance of one reward around its prompt's mean; ``tau_between^2`` the variance of the
    prompt means minus the part their own sampling noise explains. This is the shrinkage that
    minimizes the expected squared error of the shrunk mean under a normal hierarchical model.
    ``None`` when fewer than two prompts have been seen at least twice."""
    repeated = count > 1.0
    if int(repeated.sum()) < 2:
        return None
    n, s, ss = count[repeated], total[repeated], total_sq[repeated]
    within = float(((ss - s * s / n).sum() / (n - 1.0).sum()).clamp(min=0.0))
    means = s / n
    between = float(means.var(correction=1)) - float((within / n).mean())
    if between <= within / MAX_SHRINKAGE:
        return MAX_SHRINKAGE
    return within / between


def parse_bandwidth(value: str | float) -> str | float:
    """``algorithm.kernel_bandwidth``: "median" (median pairwise distance), "cv" (leave-one-out
    cross-validation over multiples of the median), or a positive number (a fixed bandwidth in
    embedding units; a numeric string is accepted)."""
    if isinstance(value, str):
        if value in ("median", "cv"):
            return value
        try:
            value = float(value)
        except ValueError:
            raise ValueError(
                f"algorithm.kernel_bandwidth={value!r}: use 'median', 'cv' or a positive number"
            ) from None
    if not value > 0:
        raise ValueError(f"algorithm.kernel_bandwidth={value}: a fixed bandwidth must be > 0")
    return float(value)


def _median_distance(sq_dist: torch.Tensor, generator: torch.Generator) -> float:
    """Median of the positive finite pairwise distances (identical embeddings, e.g. the same prompt
    seen twice, say nothing about the scale; the left-out self pairs are inf). 1.0 if there are none."""
    d2 = sq_dist[(sq_dist > 0) & sq_dist.isfinite()]
    if d2.numel() == 0:
        return 1.0
    if d2.numel() > MEDIAN_MAX_PAIRS:
        d2 = d2[torch.randint(d2.numel(), (MEDIAN_MAX_PAIRS,), generator=generator).to(d2.device)]
    return float(d2.median().sqrt())


def _smooth(sq_dist: torch.Tensor, ref_rewards: torch.Tensor, prior: torch.Tensor, h: float) -> torch.Tensor:
    weights = torch.exp(sq_dist / (-2.0 * h * h))  # self pairs hold inf: weight exactly 0
    numerator = weights @ ref_rewards + KERNEL_PRIOR_WEIGHT * prior
    return numerator / (weights.sum(dim=1) + KERNEL_PRIOR_WEIGHT)


def kernel_baseline(
    embeddings: torch.Tensor,
    rewards: torch.Tensor,
    history_embeddings: torch.Tensor,
    history_rewards: torch.Tensor,
    *,
    bandwidth: str | float,
    seed: int = 0,
) -> tuple[torch.Tensor, float]:
    """Kernel-smoothed value estimate (after Gong et al. 2026, "Kernelized Advantage Estimation:
    From Nonparametric Statistics to LLM Reasoning"): the value of a prompt is the
    Nadaraya-Watson average of the rewards of rollouts whose policy embedding is close to it::

        V_i = sum_{j != i} K_h(x_i, x_j) r_j / sum_{j != i} K_h(x_i, x_j),
        K_h(x, y) = exp(-|x - y|^2 / (2 h^2))

    over the history and the current batch, leaving out row ``i`` itself (so ``V_i`` does not
    depend on ``r_i``), with a vanishing ``KERNEL_PRIOR_WEIGHT`` of the batch mean for a row that
    has no neighbour in reach. Repeats of a prompt sit at distance 0 and weigh fully; similar
    prompts weigh by how close they are. (Kernel smoothing of the value is the paper's method;
    the Gaussian kernel, the leave-one-out and the bandwidth rules are choices made here.)

    embeddings: [N, D], rewards: [N], history_embeddings: [M, D], history_rewards: [M].
    bandwidth: see ``parse_bandwidth``. "cv" picks, from ``CV_BANDWIDTH_FACTORS`` times the
    median, the bandwidth with the smallest leave-one-out error on this batch (a choice among a
    few scalars, so a row's own reward affects its baseline only through that O(1/N) choice).
    Returns ``(V [N] float64, h)``.
    """
    rule = parse_bandwidth(bandwidth)
    n = embeddings.shape[0]
    x = embeddings.to(torch.float32)
    refs = torch.cat([history_embeddings.to(x.device, torch.float32), x])
    target = rewards.to(x.device, torch.float32)
    ref_rewards = torch.cat([history_rewards.to(x.device, torch.float32), target])
    m = refs.shape[0] - n
    # float32 is plenty for weights in [0, 1]. The matmul form of cdist can go slightly negative
    # for identical points: clamp at 0. Row i's own column gets inf, i.e. weight 0 (leave-one-out).
    sq_dist = (torch.cdist(x, refs) ** 2).clamp(min=0.0)
    rows = torch.arange(n, device=x.device)
    sq_dist[rows, m + rows] = float("inf")
    prior = _loo_mean(target)
    if isinstance(rule, float):
        h = rule
    else:
        h = _median_distance(sq_dist, torch.Generator().manual_seed(seed))
        if rule == "cv":
            errors = [
                float(((_smooth(sq_dist, ref_rewards, prior, h * f) - target) ** 2).mean())
                for f in CV_BANDWIDTH_FACTORS
            ]
            h *= CV_BANDWIDTH_FACTORS[min(range(len(errors)), key=errors.__getitem__)]
    return _smooth(sq_dist, ref_rewards, prior, h).to(torch.float64), h


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over positions: hidden [N, L, D], mask [N, L] (true = a prompt token) -> [N, D].
    The "kernel" estimator's embedding: the last hidden layer averaged over the prompt tokens."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


# ----------------------------------------------------------------------------- estimators


class _Estimator:
    """Shared plumbing. ``__call__``: baseline, advantages, then record the batch in the history
    (so no baseline ever holds its own sample's reward). Subclasses give ``_baseline``; the default
    advantage is ``(r - V) / std_batch(r - V)`` (``_scale``; off with ``scale=False``)."""

    kind: AdvantageKind
    needs_embeddings = False
    needs_tokens = False
    scale = True

    def __init__(self, group_size: int) -> None:
        if group_size < 1:
            raise ValueError(f"rollout.group_size={group_size}: must be >= 1")
        self.group_size = group_size
        self.filters_zero_variance = zero_variance_filter_applies(self.kind, group_size)
        self.metrics: dict[str, float] = {}

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        if inputs.group_size != self.group_size:
            raise ValueError(
                f"{self.kind.value}: built for group_size={self.group_size}, got {inputs.group_size}"
            )
        value, self.metrics = self._baseline(inputs)
        self.metrics["advantage/baseline_mean"] = float(value.mean())
        advantages = self._advantages(_as_float(inputs.rewards), value)
        self.update(inputs)
        return advantages

    def values(self, inputs: AdvantageInputs) -> torch.Tensor:
        """The baseline ``V`` [N] (the value estimate of each row's prompt); state is untouched."""
        return self._baseline(inputs)[0]

    def _baseline(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def _advantages(self, rewards: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        centered = rewards - value.to(rewards.device, rewards.dtype)
        return _scale(centered) if self.scale else centered

    def update(self, inputs: AdvantageInputs) -> None:
        """Record the batch in the history (no-op for the stateless estimators)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.kind.value} estimator is stateless, got state keys {sorted(state)}")


class GroupEstimator(_Estimator):
    """GRPO (Shao et al. 2024) / DAPO (Yu et al. 2025): ``A_i = (r_i - mean_g) / (std_g + eps)``
    over the ``G`` samples of the prompt (sample std; ``loss.group_advantages``). With ``G == 1``
    the batch is the group, which is the "batch" estimator."""

    kind = AdvantageKind.GROUP

    def _baseline(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = _as_float(inputs.rewards)
        g = self.group_size if self.group_size > 1 else len(rewards)
        return rewards.view(-1, g).mean(dim=1).repeat_interleave(g), {}

    def _advantages(self, rewards: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.group_size == 1:
            return batch_advantages(rewards)
        return group_advantages(rewards.view(-1, self.group_size)).view(-1)


class RlooEstimator(_Estimator):
    """RLOO (Ahmadian et al. 2024): ``A_i = r_i - mean of the other G - 1 rewards of the prompt``
    (``rloo_advantages``), unscaled. With ``G == 1`` the leave-one-out runs over the batch."""

    kind = AdvantageKind.RLOO
    scale = False

    def _baseline(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = _as_float(inputs.rewards)
        g = self.group_size if self.group_size > 1 else len(rewards)
        return _loo_mean(rewards.view(-1, g)).view(-1), {}


class BatchEstimator(_Estimator):
    """REINFORCE++ (Hu 2025): ``A_i = (r_i - mean_batch) / (std_batch + eps)`` for any ``G``
    (``batch_advantages``)."""

    kind = AdvantageKind.BATCH

    def _baseline(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = _as_float(inputs.rewards)
        return rewards.mean().expand_as(rewards).clone(), {}

    def _advantages(self, rewards: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return batch_advantages(rewards)


class BasisEstimator(_Estimator):
    """BASIS-style batchwise estimation (Gong et al. 2026): ``A_i = (r_i - V_i) / std_batch(r - V)``
    with ``V`` from ``basis_baseline``. State: per prompt, the decayed reward weight, sum and sum of
    squares, bounded to ``max_prompts`` prompts (the least recently seen are evicted).

    shrinkage: the prior pseudo-count ``kappa``; ``None`` estimates it from the history
        (``empirical_bayes_shrinkage``), falling back to ``DEFAULT_SHRINKAGE``.
    decay: each step multiplies the history's weights by ``decay`` in (0, 1], so a prompt's
        estimate follows the moving policy (1.0 = never forget).
    calibrate: apply the batch drift correction ``d`` to the history means.
    """

    kind = AdvantageKind.BASIS
    COUNT, TOTAL, TOTAL_SQ, LAST_SEEN = range(4)  # columns of the per-prompt table `stats` [P, 4]

    def __init__(
        self,
        group_size: int,
        *,
        shrinkage: float | None = None,
        decay: float = 1.0,
        calibrate: bool = True,
        max_prompts: int = 1_000_000,
        scale: bool = True,
    ) -> None:
        super().__init__(group_size)
        if shrinkage is not None and shrinkage < 0:
            raise ValueError(f"algorithm.basis_shrinkage={shrinkage}: must be >= 0 (or null to estimate it)")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"algorithm.basis_decay={decay}: must be in (0, 1]")
        if max_prompts < 1:
            raise ValueError(f"algorithm.basis_max_prompts={max_prompts}: must be >= 1")
        self.shrinkage, self.decay, self.calibrate = shrinkage, decay, calibrate
        self.max_prompts, self.scale = max_prompts, scale
        self.load_state_dict({})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids.clone(), "stats": self.stats.clone(), "step": self.step.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ids = state.get("ids", torch.zeros(0, dtype=torch.int64)).to("cpu", torch.int64)
        self.stats = state.get("stats", torch.zeros(0, 4, dtype=torch.float64)).to("cpu", torch.float64)
        self.step = state.get("step", torch.tensor(0)).to("cpu", torch.int64)
        if self.ids.dim() != 1 or self.stats.shape != (self.ids.numel(), 4):
            raise ValueError(f"basis state: ids {tuple(self.ids.shape)} vs stats {tuple(self.stats.shape)}")
        if not bool((self.ids[1:] > self.ids[:-1]).all()):
            raise ValueError("basis state: ids must be sorted and unique")

    def current_shrinkage(self) -> float:
        if self.shrinkage is not None:
            return self.shrinkage
        estimate = empirical_bayes_shrinkage(*self.stats[:, : self.LAST_SEEN].unbind(dim=1))
        return DEFAULT_SHRINKAGE if estimate is None else estimate

    def _baseline(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = inputs.rewards.detach().to("cpu", torch.float64)
        prompt_ids = inputs.prompt_ids.detach().to("cpu", torch.int64)
        # Look each prompt up in the sorted table; an absent prompt reads the zero row at the end.
        pos = torch.searchsorted(self.ids, prompt_ids)
        found = self.ids[pos.clamp(max=len(self.ids) - 1)] == prompt_ids if len(self.ids) else pos < 0
        row = torch.cat([self.stats, self.stats.new_zeros(1, 4)])[torch.where(found, pos, len(self.ids))]
        count, mean = row[:, self.COUNT], row[:, self.TOTAL] / row[:, self.COUNT].clamp(min=EPS)
        kappa = self.current_shrinkage()
        value, drift = basis_baseline(
            rewards, prompt_ids, count, mean, shrinkage=kappa, calibrate=self.calibrate
        )
        metrics = {
            "advantage/basis_shrinkage": kappa,
            "advantage/basis_drift": float(drift.mean()),
            "advantage/basis_seen_frac": float(found.to(torch.float64).mean()),
            "advantage/basis_prompts": float(len(self.ids)),
        }
        return value.to(inputs.rewards.device, _as_float(inputs.rewards).dtype), metrics

    def update(self, inputs: AdvantageInputs) -> None:
        rewards = inputs.rewards.detach().to("cpu", torch.float64)
        new_ids, inverse = torch.unique(
            inputs.prompt_ids.detach().to("cpu", torch.int64), return_inverse=True
        )
        ids = torch.cat([self.ids, new_ids]).unique()  # sorted
        stats = torch.zeros(len(ids), 4, dtype=torch.float64)
        stats[torch.searchsorted(ids, self.ids)] = self.stats
        stats[:, : self.LAST_SEEN] *= self.decay
        rows = torch.searchsorted(ids, new_ids)
        for column, weights in ((self.COUNT, None), (self.TOTAL, rewards), (self.TOTAL_SQ, rewards**2)):
            stats[rows, column] += torch.bincount(inverse, weights, minlength=len(new_ids)).double()
        stats[rows, self.LAST_SEEN] = float(self.step)
        if len(ids) > self.max_prompts:
            # Evict the least recently seen prompts; the table stays sorted by id.
            order = torch.argsort(stats[:, self.LAST_SEEN], descending=True, stable=True)
            keep = order[: self.max_prompts].sort().values
            ids, stats = ids[keep], stats[keep]
        self.ids, self.stats, self.step = ids, stats, self.step + 1


class KernelEstimator(_Estimator):
    """Kernelized advantage estimation (Gong et al. 2026): ``A_i = (r_i - V_i) / std_batch(r - V)``
    with ``V`` from ``kernel_baseline`` over a bounded FIFO history of ``(embedding, reward)``.

    bandwidth: "median", "cv" or a fixed float (``parse_bandwidth``).
    history: rows kept (``algorithm.kernel_history``); 0 = this batch only. Memory is
        ``history * D * 4`` bytes on the embeddings' device.
    """

    kind = AdvantageKind.KERNEL
    needs_embeddings = True

    def __init__(
        self, group_size: int, *, bandwidth: str | float = "cv", history: int = 4096, scale: bool = True
    ) -> None:
        super().__init__(group_size)
        if history < 0:
            raise ValueError(f"algorithm.kernel_history={history}: must be >= 0")
        self.bandwidth = parse_bandwidth(bandwidth)
        self.capacity, self.scale = history, scale
        self.load_state_dict({})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings.cpu().clone(), "rewards": self.rewards.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        embeddings = state.get("embeddings", torch.zeros(0, 0)).to(torch.float32)
        rewards = state.get("rewards", torch.zeros(0, dtype=torch.float64)).to(torch.float64)
        if embeddings.dim() != 2 or embeddings.shape[0] != rewards.shape[0]:
            raise ValueError(
                f"kernel state: embeddings {tuple(embeddings.shape)} vs rewards {tuple(rewards.shape)}"
            )
        # The newest `capacity` rows (a saved state may come from a run with a longer history).
        start = max(len(rewards) - self.capacity, 0)
        self.embeddings, self.rewards = embeddings[start:], rewards[start:]

    def _embeddings(self, inputs: AdvantageInputs) -> torch.Tensor:
        if inputs.embeddings is None:
            raise ValueError("algorithm.advantage=kernel needs AdvantageInputs.embeddings (prompt states)")
        x = inputs.embeddings.detach().to(torch.float32)
        if len(self.rewards) and self.embeddings.shape[1] != x.shape[1]:
            raise ValueError(
                f"kernel estimator: embeddings have D={x.shape[1]}, the saved history D={self.embeddings.shape[1]}"
                " (another model?): start without the saved estimator state"
            )
        history = self.embeddings.to(x.device) if len(self.rewards) else x.new_zeros(0, x.shape[1])
        return torch.cat([history, x])

    def _baseline(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
        x = self._embeddings(inputs)
        m = len(self.rewards)
        value, h = kernel_baseline(
            x[m:], inputs.rewards, x[:m], self.rewards, bandwidth=self.bandwidth, seed=m
        )
        metrics = {"advantage/kernel_bandwidth": h, "advantage/kernel_history": float(m)}
        return value.to(inputs.rewards.device, _as_float(inputs.rewards).dtype), metrics

    def update(self, inputs: AdvantageInputs) -> None:
        x = self._embeddings(inputs)
        rewards = torch.cat([self.rewards.to(x.device), inputs.rewards.detach().to(x.device, torch.float64)])
        start = max(len(rewards) - self.capacity, 0)
        self.embeddings, self.rewards = x[start:], rewards[start:]


def make_estimator(
    kind: AdvantageKind | enum.Enum | str,
    *,
    group_size: int,
    kernel_bandwidth: str | float = "cv",
    kernel_history: int = 4096,
    basis_shrinkage: float | None = None,
    basis_decay: float = 1.0,
    basis_calibrate: bool = True,
    basis_max_prompts: int = 1_000_000,
    critic: StepCritic | None = None,
    step_delimiter_ids: Collection[int] = (),
) -> AdvantageEstimator:
    """The one place an advantage estimator is chosen (``algorithm.advantage``).

    ``kind`` may be this module's ``AdvantageKind``, any enum with the same values (the config's)
    or the string. "direct" needs ``critic`` (``critic.load_latest_critic``) and the token ids that
    end a step (``critic.delimiter_token_ids``); the other knobs are ignored by the estimators
    they do not belong to.
    """
    value = kind.value if isinstance(kind, enum.Enum) else kind
    try:
        kind = AdvantageKind(value)
    except ValueError:
        names = ", ".join(k.value for k in AdvantageKind)
        raise ValueError(f"algorithm.advantage={value!r}: choose one of {names}") from None
    match kind:
        case AdvantageKind.GROUP:
            return GroupEstimator(group_size)
        case AdvantageKind.RLOO:
            return RlooEstimator(group_size)
        case AdvantageKind.BATCH:
            return BatchEstimator(group_size)
        case AdvantageKind.BASIS:
            return BasisEstimator(
                group_size,
                shrinkage=basis_shrinkage,
                decay=basis_decay,
                calibrate=basis_calibrate,
                max_prompts=basis_max_prompts,
            )
        case AdvantageKind.KERNEL:
            return KernelEstimator(group_size, bandwidth=kernel_bandwidth, history=kernel_history)
        case AdvantageKind.DIRECT:
            if critic is None:
                raise ValueError(
                    "algorithm.advantage=direct needs a trained critic: run `async-rl critic` on the saved "
                    "trajectories (learner.save_trajectories=true) and point algorithm.critic_dir at its output"
                )
            return DirectEstimator(group_size, critic=critic, delimiter_ids=step_delimiter_ids)


def estimator_from_config(cfg: Config, tokenizer: Any) -> AdvantageEstimator:
    """``make_estimator`` with the ``algorithm.*`` settings of ``cfg``; for "direct", the newest
    critic under ``algorithm.critic_dir`` (an error names the command that makes one)."""
    alg = cfg.algorithm
    critic = None
    delimiter_ids: Collection[int] = ()
    if alg.advantage is AdvantageKind.DIRECT:
        critic = load_latest_critic(alg.critic_dir)
        if critic is None:
            raise FileNotFoundError(
                f"algorithm.critic_dir={alg.critic_dir}: no critic checkpoint there; train one with "
                f"`async-rl critic store=RUN_DIR/trajectories out={alg.critic_dir}`"
            )
        delimiter_ids = delimiter_token_ids(tokenizer, alg.step_delimiter)
    return make_estimator(
        alg.advantage,
        group_size=cfg.rollout.group_size,
        kernel_bandwidth=alg.kernel_bandwidth_value(),
        kernel_history=alg.kernel_history,
        basis_shrinkage=alg.basis_shrinkage or None,
        basis_decay=alg.basis_decay,
        basis_calibrate=alg.basis_calibrate,
        critic=critic,
        step_delimiter_ids=delimiter_ids,
    )
