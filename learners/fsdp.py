"""Data-parallel learner step over ``W`` processes with FSDP2 (``fully_shard``).

Building blocks; the learner process does not use them yet. Layout: the ``W`` learner
ranks form this process's *default* process group (NCCL on GPU, gloo on CPU); rank 0 is the learner process that owns the sockets, the coordinator and the
weight-sync group, ranks 1.. only train. So on rank 0 the weight-sync group must be a second,
non-default group: ``weight_sync.group.SyncGroup`` currently (re)initialises the default group,
which would tear down the FSDP world. Per step:

1. ``broadcast_groups``: rank 0 sends the step's ``TrajectoryGroup``s to every rank, encoded by
   ``async_rl.schema`` (checked on decode, never pickled). Every rank builds the same full
   ``Batch`` with ``trainer.make_batch``.
2. ``sharded_train_step``: the math of ``trainer.train_step`` with the rows split by groups.
3. ``full_parameters``: every rank takes part in the all-gather; rank 0 gets the full weights
   and broadcasts them to the actors over the weight-sync group, as the one-process learner does.

Why the result equals one process. ``policy_loss`` is a token mean: with ``N`` response tokens
in a mini-batch and ``n_r`` of them on rank ``r``, the one-process gradient is
``(1/N) sum_t grad loss_t``. Rank ``r``'s local loss is ``(1/n_r) sum_{t in r} loss_t`` and FSDP
averages gradients over the ``W`` ranks, so each rank scales its loss by ``W * n_r / N``:
``(1/W) sum_r (W n_r / N)(1/n_r) sum_{t in r} grad loss_t = (1/N) sum_t grad loss_t``. Without the
scale, a rank with few tokens would weigh as much as one with many. Advantages are computed on
the full batch on every rank (batch-wise estimators such as ``batch`` and ``basis`` need every
reward, and stateful estimators then keep the same history everywhere). Metrics are token-weighted
across ranks, so every rank returns what ``train_step`` returns on the whole batch.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from async_rl.schema import SchemaError, TrajectoryGroup, decode, encode
from learners.advantages import AdvantageEstimator
from learners.loss import policy_loss
from learners.trainer import Batch, StepParams, advantages_for, mismatch_kl_sum, token_logprobs

logger = logging.getLogger(__name__)


def shard_model(model: torch.nn.Module, *, device_type: str, reshard_after_forward: bool = True) -> Any:
    """Shard ``model`` over the default process group with ``fully_shard``, in place.

    Each transformer block (the classes in the Hugging Face model's ``_no_split_modules``) is its
    own FSDP unit, so one block's full weights are gathered at a time; the root unit holds the
    rest (embeddings, final norm, a tied LM head). Parameter names do not change, so the weight
    header the actors check stays the one-process header. Build the optimizer after this call:
    it must see the sharded parameters.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def split_groups(n_groups: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` group ranges, one per rank, sizes differing by at most one."""
    bounds = [n_groups * r // world_size for r in range(world_size + 1)]
    return list(itertools.pairwise(bounds))


def _mini_batches(n_groups: int, mini_batches: int) -> list[tuple[int, int]]:
    """Group ranges of the mini-batches, exactly as ``train_step`` splits the batch."""
    bounds = np.linspace(0, n_groups, mini_batches + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]


def sharded_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    p: StepParams,
    *,
    version: int,
    estimator: AdvantageEstimator,
) -> dict[str, float]:
    """``train_step`` on an FSDP-sharded ``model``: every rank passes the same full ``batch``
    and trains on its share of the groups of each mini-batch. Returns the metrics of the whole
    batch, the same on every rank. Each mini-batch needs at least one group per rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shaped, adv = advantages_for(model, batch, p, estimator)
    g = batch.group_size
    spans = _mini_batches(batch.input_ids.shape[0] // g, p.mini_batches)
    if min(hi - lo for lo, hi in spans) < world:
        raise ValueError(
            f"a mini-batch of {min(hi - lo for lo, hi in spans)} groups cannot give each of "
            f"trainer.num_devices={world} ranks a group; raise trainer.batch_groups or lower "
            "trainer.mini_batches"
        )
    # Rank r's rows in each mini-batch: a contiguous run of whole groups.
    local = []
    for lo, hi in spans:
        first, last = split_groups(hi - lo, world)[rank]
        local.append(slice((lo + first) * g, (lo + last) * g))
    proximal = None
    if p.mini_batches > 1:
        # The proximal policy is the weights before the first optimizer step of this batch.
        with torch.no_grad():
            proximal = [token_logprobs(model, batch, rows, p.temperature) for rows in local]
    model.train()
    sums: dict[str, float] = {}
    kl = torch.zeros(2, dtype=torch.float64, device=batch.mask.device)  # [sum, tokens], global
    for m, ((lo, hi), rows) in enumerate(zip(spans, local)):
        logprobs = token_logprobs(model, batch, rows, p.temperature)
        prox = logprobs.detach() if proximal is None else proximal[m]
        kl_local = mismatch_kl_sum(batch, rows, prox, version)
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
        local_tokens = int(batch.mask[rows].sum())
        step_tokens = int(batch.mask[lo * g : hi * g].sum())
        optimizer.zero_grad(set_to_none=True)
        # The token-mean scale of the module doc: FSDP's average over ranks then gives the
        # one-process gradient of this mini-batch.
        (loss * (world * local_tokens / max(step_tokens, 1))).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip or float("inf"))
        optimizer.step()
        metrics = _token_weighted(metrics, local_tokens, step_tokens, kl, kl_local)
        metrics["grad_norm"] = _to_float(grad_norm)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value / p.mini_batches
    model.eval()
    out = {f"loss/{k}": v for k, v in sums.items()}
    out["reward/shaped_mean"] = float(shaped.mean())
    per_token = adv[batch.mask] if adv.dim() == 2 else adv
    out["reward/advantage_abs_mean"] = float(per_token.abs().mean())
    out |= estimator.metrics
    out["train/tokens"] = float(batch.mask.sum())
    out["rollout/mismatch_kl"] = float(kl[0] / kl[1].clamp(min=1))
    return out


def _token_weighted(
    metrics: dict[str, float],
    local_tokens: int,
    step_tokens: int,
    kl: torch.Tensor,
    kl_local: tuple[float, int],
) -> dict[str, float]:
    """Token means over the whole mini-batch from each rank's token means (one all-reduce), and
    the mismatch-KL sum and count added into ``kl``."""
    keys = sorted(metrics)  # the same order on every rank
    values = [metrics[k] * local_tokens for k in keys] + [kl_local[0], kl_local[1]]
    total = torch.tensor(values, dtype=torch.float64, device=kl.device)
    dist.all_reduce(total)
    kl += total[-2:]
    return {k: float(v) / max(step_tokens, 1) for k, v in zip(keys, total[:-2].tolist())}


def _to_float(value: torch.Tensor) -> float:
    from torch.distributed.tensor import DTensor

    return float(value.full_tensor() if isinstance(value, DTensor) else value)


def full_parameters(model: torch.nn.Module, *, to_cpu: bool = False) -> dict[str, torch.Tensor]:
    """The full weights, in ``named_parameters`` order, on rank 0 (other ranks get ``{}``).

    A collective: every rank must call it, in the same order as the others. One parameter is
    gathered at a time, but rank 0 keeps them all, so it holds one full copy of the model
    (on its device, or in host memory with ``to_cpu``) until the broadcast is done.
    """
    from torch.distributed.tensor import DTensor

    keep = dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            if keep:
                out[name] = full.cpu() if to_cpu else full
    return out


def broadcast_groups(
    groups: list[TrajectoryGroup] | None, *, device: torch.device, src: int = 0
) -> list[TrajectoryGroup]:
    """Rank ``src``'s ``groups`` on every rank. Each group travels as its ``schema.encode`` bytes
    and is checked by ``schema.decode`` on arrival: nothing is pickled. Three broadcasts: the
    count, the byte length of each group, the bytes. ``device``: cuda for NCCL, cpu for gloo."""
    sending = dist.get_rank() == src
    if sending:
        assert groups is not None, "the source rank must pass its groups"
        frames = [encode(group) for group in groups]
        count = torch.tensor([len(frames)], dtype=torch.int64, device=device)
    else:
        count = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(count, src=src)
    if sending:
        lengths = torch.tensor([len(f) for f in frames], dtype=torch.int64, device=device)
    else:
        lengths = torch.zeros(int(count), dtype=torch.int64, device=device)
    dist.broadcast(lengths, src=src)
    if sending:
        payload = torch.from_numpy(np.frombuffer(b"".join(frames), dtype=np.uint8).copy()).to(device)
    else:
        payload = torch.empty(int(lengths.sum()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src)
    if sending:
        assert groups is not None
        return groups
    data = payload.cpu().numpy().tobytes()
    offsets = [0, *itertools.accumulate(lengths.tolist())]
    out = []
    for lo, hi in itertools.pairwise(offsets):
        msg = decode(data[lo:hi])
        if not isinstance(msg, TrajectoryGroup):
            raise SchemaError(f"broadcast_groups: expected a trajectory group, got {type(msg).__name__}")
        out.append(msg)
    return out
