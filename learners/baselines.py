"""The baselines behind the advantage estimators, as pure functions over tensors.

``learners/advantages.py`` wraps each in an estimator with state (histories, bandwidths); the
math lives here, with no config, no state and no I/O, so each piece can be checked by hand.
Rewards are ``[N]`` (or ``[G, n]`` where a function says so), embeddings ``[N, D]``.
"""

from __future__ import annotations

import torch

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


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def loo_mean(x: torch.Tensor) -> torch.Tensor:
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
    rewards = as_float(rewards)
    return rewards - loo_mean(rewards)


def batch_advantages(rewards: torch.Tensor, *, eps: float = EPS) -> torch.Tensor:
    """REINFORCE++ (Hu 2025) global advantage normalization: one baseline and one scale for the
    whole batch instead of per prompt::

        A_i = (r_i - mean_batch) / (std_batch + eps)      (sample std, as group_advantages)

    rewards: [N] -> [N]; a batch of one row gets zero.
    """
    if rewards.dim() != 1:
        raise ValueError(f"batch_advantages: rewards must be [N], got shape {tuple(rewards.shape)}")
    return group_advantages(rewards.unsqueeze(0), eps=eps).squeeze(0)


def batch_scale(centered: torch.Tensor, eps: float = EPS) -> torch.Tensor:
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
    prior = loo_mean(r)
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
    prior = loo_mean(target)
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
