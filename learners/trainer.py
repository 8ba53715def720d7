"""One learner step: batch the groups, compute logprobs, apply the DAPO loss, step AdamW.

The loss math itself is in ``learners.loss`` (pure functions); this module owns the
model-facing parts: padding, the forward pass, mini-batches and the optimizer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from async_rl.config import Config
from async_rl.schema import FinishReason, TrajectoryGroup
from learners.advantages import AdvantageEstimator, AdvantageInputs
from learners.baselines import mean_pool
from learners.loss import overlong_penalty, policy_loss


@dataclass
class Batch:
    """``N = groups * G`` rows of prompt + response, right-padded.

    input_ids, attention_mask: [N, L]. Response-aligned tensors are [N, R] (R = longest
    response): ``index[i, j]`` is the position whose logits predict response token j.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor  # [N, R] long
    targets: torch.Tensor  # [N, R] long
    mask: torch.Tensor  # [N, R] bool
    behavior_logprobs: torch.Tensor  # [N, R]
    versions: torch.Tensor  # [N, R] long
    rewards: torch.Tensor  # [N] raw rewards from the actor
    lengths: torch.Tensor  # [N] response lengths
    truncated: torch.Tensor  # [N] bool: finished with reason "length"
    prompt_ids: torch.Tensor  # [N] the dataset's prompt id of each row
    prompt_lengths: torch.Tensor  # [N] prompt tokens at the start of each row
    group_size: int


def make_batch(groups: list[TrajectoryGroup], *, pad_id: int, device: torch.device) -> Batch:
    rows = [(g.prompt_token_ids, r) for g in groups for r in g.responses]
    n = len(rows)
    width = max(len(p) + r.length for p, r in rows)
    resp = max(r.length for _, r in rows)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    index = np.zeros((n, resp), dtype=np.int64)
    targets = np.zeros((n, resp), dtype=np.int64)
    mask = np.zeros((n, resp), dtype=bool)
    behavior = np.zeros((n, resp), dtype=np.float32)
    versions = np.zeros((n, resp), dtype=np.int64)
    for i, (prompt, r) in enumerate(rows):
        p, t = len(prompt), r.length
        input_ids[i, :p] = prompt
        input_ids[i, p : p + t] = r.token_ids
        attention[i, : p + t] = 1
        # Logits at position k predict token k + 1: response token j sits at p + j.
        index[i, :t] = np.arange(p - 1, p + t - 1)
        targets[i, :t] = r.token_ids
        mask[i, :t] = True
        behavior[i, :t] = r.logprobs
        versions[i, :t] = r.versions
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return Batch(
        input_ids=as_t(input_ids),
        attention_mask=as_t(attention),
        index=as_t(index),
        targets=as_t(targets),
        mask=as_t(mask),
        behavior_logprobs=as_t(behavior),
        versions=as_t(versions),
        rewards=torch.tensor([r.reward for _, r in rows], dtype=torch.float32, device=device),
        lengths=torch.tensor([r.length for _, r in rows], dtype=torch.long, device=device),
        truncated=torch.tensor([r.finish_reason is FinishReason.LENGTH for _, r in rows], device=device),
        prompt_ids=torch.tensor([g.prompt_id for g in groups for _ in g.responses], device=device),
        prompt_lengths=torch.tensor([len(p) for p, _ in rows], dtype=torch.long, device=device),
        group_size=len(groups[0].responses),
    )


def token_logprobs(model: torch.nn.Module, batch: Batch, rows: slice, temperature: float) -> torch.Tensor:
    """Logprobs of the response tokens under ``model``: [n_rows, R]. Temperature is applied
    as in sampling, so with the same weights these match the engine's logprobs."""
    ids, att = batch.input_ids[rows], batch.attention_mask[rows]
    logits = model(input_ids=ids, attention_mask=att).logits.float()
    index = batch.index[rows]
    picked = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    logprobs = torch.log_softmax(picked / temperature, dim=-1)
    return logprobs.gather(-1, batch.targets[rows].unsqueeze(-1)).squeeze(-1)


@dataclass
class StepParams:
    eps_low: float
    eps_high: float
    is_cap: float
    temperature: float
    grad_clip: float
    mini_batches: int
    max_new_tokens: int
    overlong_buffer: int
    overlong_penalty: float

    @classmethod
    def from_config(cls, cfg: Config) -> StepParams:
        return cls(
            eps_low=cfg.algorithm.eps_low,
            eps_high=cfg.algorithm.eps_high,
            is_cap=cfg.algorithm.is_cap,
            temperature=cfg.rollout.temperature,
            grad_clip=cfg.trainer.grad_clip,
            mini_batches=cfg.trainer.mini_batches,
            max_new_tokens=cfg.rollout.max_new_tokens,
            overlong_buffer=cfg.algorithm.overlong_buffer,
            overlong_penalty=cfg.algorithm.overlong_penalty,
        )


def advantages_for(
    model: torch.nn.Module, batch: Batch, p: StepParams, estimator: AdvantageEstimator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaped rewards [N] (overlong penalty added at the learner, where the limits live) and
    the advantages of ``estimator`` ([N], or [N, R] for step-level ones)."""
    shaped = batch.rewards
    if p.overlong_buffer:
        shaped = shaped + overlong_penalty(
            batch.lengths, max_len=p.max_new_tokens, buffer=p.overlong_buffer, penalty=p.overlong_penalty
        )
    inputs = AdvantageInputs(
        rewards=shaped,
        prompt_ids=batch.prompt_ids,
        group_size=batch.group_size,
        embeddings=prompt_embeddings(model, batch) if estimator.needs_embeddings else None,
        input_ids=batch.input_ids,
        prompt_lengths=batch.prompt_lengths,
        response_mask=batch.mask,
    )
    return shaped, estimator(inputs)


@torch.no_grad()
def prompt_embeddings(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The policy's own view of each prompt: its last hidden layer averaged over the prompt
    tokens, [N, D] (the kernel estimator's embedding)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    prompt_mask = positions.unsqueeze(0) < batch.prompt_lengths.unsqueeze(1)
    return mean_pool(out.hidden_states[-1].float(), prompt_mask)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    p: StepParams,
    *,
    version: int,
    estimator: AdvantageEstimator,
) -> dict[str, float]:
    """One policy update on ``batch``: ``p.mini_batches`` optimizer steps against the same
    proximal policy (the weights before the first of them)."""
    shaped, adv = advantages_for(model, batch, p, estimator)
    n = batch.input_ids.shape[0]
    g = batch.group_size
    # Mini-batches split at group boundaries.
    bounds = np.linspace(0, n // g, p.mini_batches + 1).round().astype(int) * g
    proximal = None
    if p.mini_batches > 1:
        with torch.no_grad():
            proximal = token_logprobs(model, batch, slice(0, n), p.temperature)
    model.train()
    sums: dict[str, float] = {}
    kl_sum, kl_tokens = 0.0, 0
    for lo, hi in itertools.pairwise(bounds):
        rows = slice(int(lo), int(hi))
        logprobs = token_logprobs(model, batch, rows, p.temperature)
        # With one mini-batch the proximal policy is the current one, before the step: the
        # forward pass we just did gives it exactly, so no second pass is needed.
        prox = logprobs.detach() if proximal is None else proximal[rows]
        kl, tokens = mismatch_kl_sum(batch, rows, prox, version)
        kl_sum, kl_tokens = kl_sum + kl, kl_tokens + tokens
        loss, metrics = policy_loss(
            logprobs,
            prox,
            batch.behavior_logprobs[rows],
            adv[rows],
            batch.mask[rows],
            eps_low=p.eps_low,
            eps_high=p.eps_high,
            is_cap=p.is_cap,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip or float("inf"))
        optimizer.step()
        metrics["grad_norm"] = float(grad_norm)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value / p.mini_batches
    model.eval()
    out = {f"loss/{k}": v for k, v in sums.items()}
    out["reward/shaped_mean"] = float(shaped.mean())
    per_token = adv[batch.mask] if adv.dim() == 2 else adv
    out["reward/advantage_abs_mean"] = float(per_token.abs().mean())
    out |= estimator.metrics
    out["train/tokens"] = float(batch.mask.sum())
    out["rollout/mismatch_kl"] = kl_sum / max(kl_tokens, 1)
    return out


def mismatch_kl_sum(batch: Batch, rows: slice, proximal: torch.Tensor, version: int) -> tuple[float, int]:
    """Sum and count of the k3 estimate of KL(engine || learner) over responses sampled
    entirely by the learner's own version: the numerical mismatch between inference and
    training, with no staleness in it. (A response that spans an update was continued on a
    KV cache the old weights wrote, with resume_kv=keep, so even its new-version tokens
    differ from a fresh forward pass; that is policy lag, which the importance weight
    corrects, not numerical mismatch.)"""
    mask, versions = batch.mask[rows], batch.versions[rows]
    whole = (versions.masked_fill(~mask, version) == version).all(dim=1, keepdim=True)
    same = mask & whole
    log_ratio = (proximal - batch.behavior_logprobs[rows]).masked_fill(~same, 0.0)
    k3 = log_ratio.exp() - 1 - log_ratio
    return float(k3.sum()), int(same.sum())
