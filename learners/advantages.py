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
from learners.baselines import (
    DEFAULT_SHRINKAGE,
    EPS,
    as_float,
    basis_baseline,
    batch_advantages,
    batch_scale,
    empirical_bayes_shrinkage,
    kernel_baseline,
    loo_mean,
    parse_bandwidth,
)
from learners.critic import DirectEstimator, StepCritic, delimiter_token_ids, load_latest_critic
from learners.loss import group_advantages


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


# ----------------------------------------------------------------------------- estimators


class _Estimator:
    """Shared plumbing. ``__call__``: baseline, advantages, then record the batch in the history
    (so no baseline ever holds its own sample's reward). Subclasses give ``_baseline``; the default
    advantage is ``(r - V) / std_batch(r - V)`` (``batch_scale``; off with ``scale=False``)."""

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
        advantages = self._advantages(as_float(inputs.rewards), value)
        self.update(inputs)
        return advantages

    def values(self, inputs: AdvantageInputs) -> torch.Tensor:
        """The baseline ``V`` [N] (the value estimate of each row's prompt); state is untouched."""
        return self._baseline(inputs)[0]

    def _baseline(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def _advantages(self, rewards: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        centered = rewards - value.to(rewards.device, rewards.dtype)
        return batch_scale(centered) if self.scale else centered

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
        rewards = as_float(inputs.rewards)
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
        rewards = as_float(inputs.rewards)
        g = self.group_size if self.group_size > 1 else len(rewards)
        return loo_mean(rewards.view(-1, g)).view(-1), {}


class BatchEstimator(_Estimator):
    """REINFORCE++ (Hu 2025): ``A_i = (r_i - mean_batch) / (std_batch + eps)`` for any ``G``
    (``batch_advantages``)."""

    kind = AdvantageKind.BATCH

    def _baseline(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = as_float(inputs.rewards)
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
        return value.to(inputs.rewards.device, as_float(inputs.rewards).dtype), metrics

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
        return value.to(inputs.rewards.device, as_float(inputs.rewards).dtype), metrics

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
