"""The weight protocol, both halves: the learner's sender and the actor's receiver.

The sender flattens parameters, in order, into flat buckets of at most ``bucket_mb`` per
dtype and broadcasts each from rank 0. The ``WeightHeader`` (version, names, shapes,
dtypes, bucket layout) goes first on the control channel; the receiver checks it against
its own parameters, receives the buckets and copies each slice into place. The same code
runs on gloo (CPU tensors) and NCCL (CUDA tensors).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

from async_rl.schema import WeightHeader

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan(params: Mapping[str, torch.Tensor], *, version: int, epoch: int, bucket_mb: int) -> WeightHeader:
    """The header for ``params``: buckets are runs of consecutive same-dtype parameters."""
    names = list(params)
    limit = bucket_mb << 20
    buckets: list[tuple[str, int, int, int]] = []
    start = 0
    for i in range(1, len(names) + 1):
        first = params[names[start]]
        if i < len(names):
            nxt = params[names[i]]
            numel = sum(params[n].numel() for n in names[start:i])
            fits = (numel + nxt.numel()) * first.element_size() <= limit
            if nxt.dtype == first.dtype and fits:
                continue
        numel = sum(params[n].numel() for n in names[start:i])
        buckets.append((_dtype_name(first.dtype), numel, start, i))
        start = i
    return WeightHeader(
        version=version,
        epoch=epoch,
        names=names,
        shapes=[list(params[n].shape) for n in names],
        dtypes=[_dtype_name(params[n].dtype) for n in names],
        buckets=buckets,
    )


def send(params: Mapping[str, torch.Tensor], header: WeightHeader, device: torch.device) -> float:
    """Rank 0: broadcast every bucket. Returns the seconds spent."""
    start = time.perf_counter()
    tensors = list(params.values())
    with torch.no_grad():
        for _, _, first, last in header.buckets:
            flat = torch.cat([t.detach().reshape(-1) for t in tensors[first:last]]).to(device)
            dist.broadcast(flat, src=0)
    return time.perf_counter() - start


def check_compatible(header: WeightHeader, params: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` if the header does not describe ``params``."""
    if header.names != list(params):
        missing = set(header.names) ^ set(params)
        raise ValueError(f"weight header names differ from the engine's parameters: {sorted(missing)[:5]}")
    for name, shape, dtype in zip(header.names, header.shapes, header.dtypes):
        if list(params[name].shape) != shape or dtype not in _DTYPES:
            raise ValueError(
                f"weight header: {name} is {shape} {dtype}, engine has {list(params[name].shape)}"
            )


def receive(header: WeightHeader, params: Mapping[str, torch.Tensor], device: torch.device) -> float:
    """Ranks > 0: receive every bucket and copy it into ``params`` in place.

    Returns the seconds spent. ``params`` must pass ``check_compatible``.
    """
    start = time.perf_counter()
    tensors = list(params.values())
    with torch.no_grad():
        for dtype, numel, first, last in header.buckets:
            flat = torch.empty(numel, dtype=_DTYPES[dtype], device=device)
            dist.broadcast(flat, src=0)
            offset = 0
            for t in tensors[first:last]:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
    return time.perf_counter() - start
