"""One learner step: batch the groups, compute logprobs, apply the DAPO loss, step AdamW.

The loss math itself is in ``learners.loss`` (pure functions); this module owns the
model-facing parts: padding, the forward pass, mini-batches and the optimizer.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from async_rl.config import Config
from async_rl.schema import FinishReason, TrajectoryGroup
from learners.advantages import AdvantageEstimator, AdvantageInputs
from learners.baselines import mean_pool
from learners.logprobs import final_hidden, pack_micro_batches, sequence_logprobs
from learners.loss import overlong_penalty, policy_loss

# Rows of a batch: a range, or an index tensor (a micro-batch packed by length).
RowSelection = slice | torch.Tensor
# The learner's weights and optimizer state, whatever model.dtype: in bfloat16 most updates of
# a small learning rate round away (1e-6 relative is below its 8-bit mantissa).
MASTER_DTYPE = torch.float32


class StepTimer:
    """Where a step's time goes: wall seconds per phase, summed over the calls of one step.
    On CUDA every phase boundary synchronizes, so a phase is charged its own kernels."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        self._cuda = device.type == "cuda"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """``time/step_<phase>_s`` for every phase timed."""
        return {f"time/step_{name}_s": s for name, s in self.seconds.items()}


class _NoTimer(StepTimer):
    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


_NO_TIMER = _NoTimer()


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
    mask: torch.Tensor  # [N, R] bool: tokens to train on (sampled response tokens)
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
    batch = pack_rows([(p, r.token_ids) for p, r in rows], pad_id=pad_id, device=device)
    behavior = np.zeros(tuple(batch.mask.shape), dtype=np.float32)
    versions = np.zeros(tuple(batch.mask.shape), dtype=np.int64)
    sampled = np.zeros(tuple(batch.mask.shape), dtype=bool)
    for i, (_, r) in enumerate(rows):
        behavior[i, : r.length] = r.logprobs
        versions[i, : r.length] = r.versions
        sampled[i, : r.length] = r.sampled_mask
    # Observation tokens (multi-turn episodes) are context only: out of the loss, the importance
    # weights and the mismatch metric, which all read ``mask``.
    batch.mask &= torch.from_numpy(sampled).to(device)
    batch.behavior_logprobs = torch.from_numpy(behavior).to(device)
    batch.versions = torch.from_numpy(versions).to(device)
    batch.rewards = torch.tensor([r.reward for _, r in rows], dtype=torch.float32, device=device)
    batch.truncated = torch.tensor([r.finish_reason is FinishReason.LENGTH for _, r in rows], device=device)
    batch.prompt_ids = torch.tensor([g.prompt_id for g in groups for _ in g.responses], device=device)
    batch.group_size = len(groups[0].responses)
    return batch


def pack_rows(rows: Sequence[tuple[Any, Any]], *, pad_id: int, device: torch.device) -> Batch:
    """Right-padded rows of (prompt ids, response ids): the token fields of a ``Batch``. The
    trajectory fields (behaviour logprobs, versions, rewards) are zeros; ``make_batch`` fills
    them. The supervised warm start uses this directly."""
    n = len(rows)
    width = max(len(p) + len(r) for p, r in rows)
    resp = max(max(len(r) for _, r in rows), 1)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    index = np.zeros((n, resp), dtype=np.int64)
    targets = np.zeros((n, resp), dtype=np.int64)
    mask = np.zeros((n, resp), dtype=bool)
    for i, (prompt, response) in enumerate(rows):
        p, t = len(prompt), len(response)
        input_ids[i, :p] = prompt
        input_ids[i, p : p + t] = response
        attention[i, : p + t] = 1
        # Logits at position k predict token k + 1: response token j sits at p + j.
        index[i, :t] = np.arange(p - 1, p + t - 1)
        targets[i, :t] = response
        mask[i, :t] = True
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return Batch(
        input_ids=as_t(input_ids),
        attention_mask=as_t(attention),
        index=as_t(index),
        targets=as_t(targets),
        mask=as_t(mask),
        behavior_logprobs=torch.zeros(n, resp, device=device),
        versions=torch.zeros(n, resp, dtype=torch.long, device=device),
        rewards=torch.zeros(n, device=device),
        lengths=torch.tensor([len(r) for _, r in rows], dtype=torch.long, device=device),
        truncated=torch.zeros(n, dtype=torch.bool, device=device),
        prompt_ids=torch.zeros(n, dtype=torch.long, device=device),
        prompt_lengths=torch.tensor([len(p) for p, _ in rows], dtype=torch.long, device=device),
        group_size=1,
    )


def token_logprobs(
    model: torch.nn.Module, batch: Batch, rows: RowSelection, temperature: float
) -> torch.Tensor:
    """Logprobs of the response tokens of ``rows`` under ``model``: [n_rows, R]. Temperature is
    applied as in sampling, so with the same weights these match the engine's logprobs. The
    rows are cut to their longest, and no [rows, R, vocab] tensor is ever made
    (``learners.logprobs``)."""
    width = int((batch.prompt_lengths[rows] + batch.lengths[rows]).max())
    return sequence_logprobs(
        model,
        batch.input_ids[rows, :width],
        batch.index[rows],
        batch.targets[rows],
        batch.mask[rows],
        temperature,
    )


def micro_batches(batch: Batch, rows: slice, budget: int) -> list[torch.Tensor]:
    """The rows of ``rows`` as micro-batches of at most ``budget`` padded tokens each (index
    tensors into the batch); a row longer than the budget is a micro-batch of its own."""
    widths = (batch.prompt_lengths[rows] + batch.lengths[rows]).tolist()
    first = rows.start or 0
    device = batch.input_ids.device
    return [
        torch.tensor([first + i for i in pack], device=device) for pack in pack_micro_batches(widths, budget)
    ]


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
    # Padded tokens per forward/backward pass (trainer.micro_batch_tokens); gradients accumulate.
    micro_batch_tokens: int = 4096
    # "" or a torch dtype name: autocast the forward and backward passes to it.
    autocast_dtype: str = ""

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
            micro_batch_tokens=cfg.trainer.micro_batch_tokens,
            # Compute in model.dtype on float32 master weights, unless said otherwise.
            autocast_dtype=cfg.trainer.autocast_dtype
            or ("" if cfg.model.dtype == "float32" else cfg.model.dtype),
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
        embeddings=prompt_embeddings(model, batch, p.micro_batch_tokens)
        if estimator.needs_embeddings
        else None,
        input_ids=batch.input_ids,
        prompt_lengths=batch.prompt_lengths,
        response_mask=batch.mask,
    )
    return shaped, estimator(inputs)


@torch.no_grad()
def prompt_embeddings(model: torch.nn.Module, batch: Batch, budget: int) -> torch.Tensor:
    """The policy's own view of each prompt: its final hidden states averaged over the prompt
    tokens, [N, D] (the kernel estimator's embedding), in micro-batches of ``budget`` tokens."""
    out = torch.zeros(0)
    for rows in micro_batches(batch, slice(0, batch.input_ids.shape[0]), budget):
        width = int(batch.prompt_lengths[rows].max())
        with final_hidden(model) as box:
            model(input_ids=batch.input_ids[rows, :width], use_cache=False)
        positions = torch.arange(width, device=batch.input_ids.device)
        prompt_mask = positions.unsqueeze(0) < batch.prompt_lengths[rows].unsqueeze(1)
        pooled = mean_pool(box["hidden"].float(), prompt_mask)
        if not out.numel():
            out = pooled.new_zeros(batch.input_ids.shape[0], pooled.shape[1])
        out[rows] = pooled
    return out


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    p: StepParams,
    *,
    version: int,
    estimator: AdvantageEstimator,
    timer: StepTimer = _NO_TIMER,
) -> dict[str, float]:
    """One policy update on ``batch``: ``p.mini_batches`` optimizer steps against the same
    proximal policy (the weights before the first of them). Each mini-batch runs as
    micro-batches of at most ``p.micro_batch_tokens`` padded tokens whose gradients add up to
    the gradient of the token mean over the whole mini-batch. ``timer`` gets the phases:
    advantages, proximal, logprobs, loss, backward, optimizer, metrics."""
    with timer.phase("advantages"):
        shaped, adv = advantages_for(model, batch, p, estimator)
    with timer.phase("proximal"):
        proximal = proximal_logprobs(model, batch, p) if p.mini_batches > 1 else None
    model.train()
    sums: dict[str, float] = {}
    kl_sum, kl_tokens = 0.0, 0
    for rows in mini_batch_rows(batch, p.mini_batches):
        optimizer.zero_grad(set_to_none=True)
        tokens = int(batch.mask[rows].sum())
        acc = accumulate_gradients(
            model,
            batch,
            micro_batches(batch, rows, p.micro_batch_tokens),
            adv,
            proximal,
            p,
            version,
            tokens,
            timer=timer,
        )
        with timer.phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip or float("inf"))
            optimizer.step()
        metrics = {k: v / max(tokens, 1) for k, v in acc.token_sums.items()} | {"grad_norm": float(grad_norm)}
        kl_sum, kl_tokens = kl_sum + acc.kl_sum, kl_tokens + acc.kl_tokens
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value / p.mini_batches
    model.eval()
    with timer.phase("metrics"):
        return step_metrics(sums, shaped, adv, batch, estimator, kl_sum, kl_tokens)


def mini_batch_rows(batch: Batch, mini_batches: int) -> list[slice]:
    """Row ranges of the mini-batches, split at group boundaries."""
    g = batch.group_size
    bounds = np.linspace(0, batch.input_ids.shape[0] // g, mini_batches + 1).round().astype(int) * g
    return [slice(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]


@torch.no_grad()
def proximal_logprobs(model: torch.nn.Module, batch: Batch, p: StepParams) -> torch.Tensor:
    """[N, R] logprobs under the weights before the step (the proximal policy), by micro-batch."""
    out = torch.zeros(batch.mask.shape, dtype=torch.float32, device=batch.mask.device)
    with autocast(p.autocast_dtype, batch.input_ids.device):
        for rows in micro_batches(batch, slice(0, batch.input_ids.shape[0]), p.micro_batch_tokens):
            out[rows] = token_logprobs(model, batch, rows, p.temperature)
    return out


@dataclass
class Accumulated:
    """What one pass of gradient accumulation measured: each loss metric summed over tokens
    (the metric of a micro-batch times its token count), and the mismatch-KL sum and count."""

    token_sums: dict[str, float]
    kl_sum: float
    kl_tokens: int


def accumulate_gradients(
    model: torch.nn.Module,
    batch: Batch,
    micro: list[torch.Tensor],
    adv: torch.Tensor,
    proximal: torch.Tensor | None,
    p: StepParams,
    version: int,
    step_tokens: int,
    scale: float = 1.0,
    padding: int = 0,
    timer: StepTimer = _NO_TIMER,
) -> Accumulated:
    """Backward of ``scale * sum(loss_t) / step_tokens`` over the micro-batches ``micro`` (row
    index tensors). ``policy_loss`` gives each micro-batch's token mean; weighting it by its
    share of ``step_tokens`` makes the accumulated gradient that of the token mean over the
    whole mini-batch, however it was cut. ``proximal`` None: the proximal policy is the current
    one (one mini-batch), taken from this very forward pass. ``padding`` extra passes of zero
    weight follow (an FSDP rank with fewer micro-batches than another keeps the collectives
    in step)."""
    sums: dict[str, float] = {}
    kl_sum, kl_tokens = 0.0, 0
    for rows in micro:
        with timer.phase("logprobs"), autocast(p.autocast_dtype, batch.input_ids.device):
            logprobs = token_logprobs(model, batch, rows, p.temperature)
        with timer.phase("loss"):
            prox = logprobs.detach() if proximal is None else proximal[rows]
            kl, kl_n = mismatch_kl_sum(batch, rows, prox, version)
            kl_sum, kl_tokens = kl_sum + kl, kl_tokens + kl_n
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
            tokens = int(batch.mask[rows].sum())
        with timer.phase("backward"):
            (loss * (scale * tokens / max(step_tokens, 1))).backward()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value * tokens
    for _ in range(padding):
        with autocast(p.autocast_dtype, batch.input_ids.device):
            logprobs = token_logprobs(model, batch, micro[0][:1], p.temperature)
        (logprobs.sum() * 0.0).backward()
    return Accumulated(sums, kl_sum, kl_tokens)


def step_metrics(
    sums: dict[str, float],
    shaped: torch.Tensor,
    adv: torch.Tensor,
    batch: Batch,
    estimator: AdvantageEstimator,
    kl_sum: float,
    kl_tokens: int,
) -> dict[str, float]:
    """The metrics of one step from the per-mini-batch means ``sums`` (already averaged over
    mini-batches) and the batch."""
    out = {f"loss/{k}": v for k, v in sums.items()}
    out["reward/shaped_mean"] = float(shaped.mean())
    per_token = adv[batch.mask] if adv.dim() == 2 else adv
    out["reward/advantage_abs_mean"] = float(per_token.abs().mean())
    out |= estimator.metrics
    out["train/tokens"] = float(batch.mask.sum())
    out["rollout/mismatch_kl"] = kl_sum / max(kl_tokens, 1)
    return out


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device`` ("" = off)."""
    if not dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def mismatch_kl_sum(
    batch: Batch, rows: RowSelection, proximal: torch.Tensor, version: int
) -> tuple[float, int]:
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
