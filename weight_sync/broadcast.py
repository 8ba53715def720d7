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


class Buffers:
    """Flat bucket buffers kept from one sync to the next, one per (dtype, device).

    A fresh 64 MB tensor per bucket is mapped, page-faulted and zeroed by the kernel every
    time; reusing one buffer (sized to the largest bucket) costs nothing after the first sync.
    Each side of the protocol owns one ``Buffers`` for the life of its process.
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        buf = self._flat.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._flat[key] = buf
        return buf[:numel]


def _direct(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """A bucket of one contiguous tensor already on ``device`` travels as itself."""
    if len(tensors) == 1 and tensors[0].is_contiguous() and tensors[0].device == device:
        return tensors[0]
    return None


def send(
    params: Mapping[str, torch.Tensor],
    header: WeightHeader,
    device: torch.device,
    buffers: Buffers | None = None,
) -> float:
    """Rank 0: broadcast every bucket. Returns the seconds spent."""
    start = time.perf_counter()
    buffers = buffers or Buffers()
    tensors = list(params.values())
    with torch.no_grad():
        for _, numel, first, last in header.buckets:
            members = [t.detach() for t in tensors[first:last]]
            flat = _direct(members, device)
            if flat is None:
                flat = buffers.get(members[0].dtype, numel, device)
                torch.cat([t.reshape(-1).to(device) for t in members], out=flat)
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


def receive(
    header: WeightHeader,
    params: Mapping[str, torch.Tensor],
    device: torch.device,
    buffers: Buffers | None = None,
) -> float:
    """Ranks > 0: receive every bucket and copy it into ``params`` in place.

    Returns the seconds spent. ``params`` must pass ``check_compatible``.
    """
    start = time.perf_counter()
    buffers = buffers or Buffers()
    tensors = list(params.values())
    with torch.no_grad():
        for dtype, numel, first, last in header.buckets:
            members = tensors[first:last]
            direct = _direct(members, device) if members[0].dtype == _DTYPES[dtype] else None
            if direct is not None:
                dist.broadcast(direct, src=0)  # straight into the parameter
                continue
            flat = buffers.get(_DTYPES[dtype], numel, device)
            dist.broadcast(flat, src=0)
            offset = 0
            for t in members:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
    return time.perf_counter() - start
