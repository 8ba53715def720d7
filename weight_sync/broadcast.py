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
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch

from async_rl.schema import WeightHeader
from weight_sync.group import SyncGroup

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan(
    params: Mapping[str, torch.Tensor],
    *,
    version: int,
    epoch: int,
    bucket_mb: int,
    wire_dtype: torch.dtype | None = None,
) -> WeightHeader:
    """The header for ``params``: buckets are runs of consecutive same-dtype parameters.

    ``wire_dtype``: the dtype the receivers hold (the engines' ``model.dtype``); floating-point
    parameters of another dtype (the learner's float32 master weights) are cast to it as they
    are sent. None: every parameter travels in its own dtype."""
    names = list(params)
    dtypes = [_wire(params[n].dtype, wire_dtype) for n in names]
    limit = bucket_mb << 20
    buckets: list[tuple[str, int, int, int]] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i < len(names):
            numel = sum(params[n].numel() for n in names[start : i + 1])
            fits = numel * dtypes[start].itemsize <= limit
            if dtypes[i] == dtypes[start] and fits:
                continue
        numel = sum(params[n].numel() for n in names[start:i])
        buckets.append((_dtype_name(dtypes[start]), numel, start, i))
        start = i
    return WeightHeader(
        version=version,
        epoch=epoch,
        names=names,
        shapes=[list(params[n].shape) for n in names],
        dtypes=[_dtype_name(d) for d in dtypes],
        buckets=buckets,
    )


def _wire(dtype: torch.dtype, wire_dtype: torch.dtype | None) -> torch.dtype:
    return wire_dtype if wire_dtype is not None and dtype.is_floating_point else dtype


class Buffers:
    """Flat bucket buffers kept from one sync to the next, two per (dtype, device).

    A fresh 64 MB tensor per bucket is mapped, page-faulted and zeroed by the kernel every
    time; reusing buffers (sized to the largest bucket) costs nothing after the first sync.
    There are two slots so that one bucket is packed or unpacked while the other is on the
    wire. Each side of the protocol owns one ``Buffers`` for the life of its process.
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}

    def get(self, dtype: torch.dtype, numel: int, device: torch.device, slot: int = 0) -> torch.Tensor:
        key = (dtype, device, slot)
        buf = self._flat.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._flat[key] = buf
        return buf[:numel]


def flat_like(
    params: Mapping[str, torch.Tensor], device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Uninitialised tensors shaped like ``params``, views of one flat buffer per dtype, laid
    out in order: every bucket of them is one contiguous span and travels without a copy."""
    out: dict[str, torch.Tensor] = {}
    for dtype in dict.fromkeys(t.dtype for t in params.values()):
        names = [n for n, t in params.items() if t.dtype == dtype]
        dev = device or params[names[0]].device
        flat = torch.empty(sum(params[n].numel() for n in names), dtype=dtype, device=dev)
        offset = 0
        for n in names:
            numel = params[n].numel()
            out[n] = flat[offset : offset + numel].view(params[n].shape)
            offset += numel
    return {n: out[n] for n in params}


def flatten_parameters_(model: torch.nn.Module) -> None:
    """Move ``model``'s parameters, in place, into one flat buffer per dtype (in
    ``named_parameters`` order). The ``Parameter`` objects stay the same, so an optimizer built
    before or after still holds them; the learner's buckets then go out with no packing copy."""
    params = dict(model.named_parameters())
    views = flat_like(params)
    with torch.no_grad():
        for name, p in params.items():
            views[name].copy_(p)
            p.data = views[name]


def _span(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The bucket as one flat tensor aliasing ``tensors``, if they lie back to back in one
    storage on ``device`` (``flat_like``, ``flatten_parameters_``, or a single tensor); else None."""
    first = tensors[0]
    size = first.element_size()
    end = first.data_ptr()
    for t in tensors:
        if t.device != device or t.dtype != dtype or not t.is_contiguous() or t.data_ptr() != end:
            return None
        end += t.numel() * size
    if len(tensors) == 1:
        return first.detach().view(-1)
    storage = first.untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() for t in tensors):
        return None
    numel = (end - first.data_ptr()) // size
    return first.new_empty(0).set_(storage, first.storage_offset(), (numel,), (1,))


def send(
    group: SyncGroup,
    params: Mapping[str, torch.Tensor],
    header: WeightHeader,
    device: torch.device,
    buffers: Buffers | None = None,
) -> float:
    """Rank 0: broadcast every bucket. Returns the seconds spent.

    A bucket whose tensors lie back to back in memory, in the header's dtype, is sent as it
    is. Any other is packed (and cast: float32 master weights to the engines' bfloat16) into
    one of two buffers while the previous bucket is on the wire."""
    start = time.perf_counter()
    buffers = buffers or Buffers()
    tensors = list(params.values())
    in_flight: deque[Any] = deque()
    with torch.no_grad():
        for i, (dtype, numel, first, last) in enumerate(header.buckets):
            members = [t.detach() for t in tensors[first:last]]
            flat = _span(members, device, _DTYPES[dtype])
            if flat is None:
                while len(in_flight) >= 2:  # the bucket that used this slot has left
                    group.wait(in_flight.popleft())
                flat = buffers.get(_DTYPES[dtype], numel, device, slot=i % 2)
                source = _span(members, device, members[0].dtype)
                if source is not None:  # back to back in another dtype: one casting copy
                    flat.copy_(source)
                else:
                    torch.cat([t.reshape(-1).to(device, _DTYPES[dtype]) for t in members], out=flat)
            in_flight.append(group.broadcast(flat, async_op=True))
        while in_flight:
            group.wait(in_flight.popleft())
    return time.perf_counter() - start


def check_compatible(header: WeightHeader, params: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` if the header does not describe ``params`` exactly: names, shapes
    and dtypes, and buckets that cover every tensor once, in order, with the right sizes."""
    if header.names != list(params):
        missing = set(header.names) ^ set(params)
        raise ValueError(f"weight header names differ from the engine's parameters: {sorted(missing)[:5]}")
    for name, shape, dtype in zip(header.names, header.shapes, header.dtypes):
        t = params[name]
        if list(t.shape) != shape or dtype not in _DTYPES or _DTYPES[dtype] != t.dtype:
            raise ValueError(
                f"weight header: {name} is {shape} {dtype}, engine has {list(t.shape)} {t.dtype}"
            )
    tensors = list(params.values())
    expected_first = 0
    for dtype, numel, first, last in header.buckets:
        members = tensors[first:last] if 0 <= first < last <= len(tensors) else []
        if first != expected_first or not members:
            raise ValueError(
                f"weight header: bucket [{first}, {last}) does not follow [.., {expected_first})"
            )
        if any(_dtype_name(t.dtype) != dtype for t in members) or sum(t.numel() for t in members) != numel:
            raise ValueError(f"weight header: bucket [{first}, {last}) declares {numel} {dtype} elements")
        expected_first = last
    if expected_first != len(tensors):
        raise ValueError(f"weight header: buckets cover {expected_first} of {len(tensors)} tensors")


def receive(
    group: SyncGroup,
    header: WeightHeader,
    params: Mapping[str, torch.Tensor],
    device: torch.device,
    buffers: Buffers | None = None,
) -> float:
    """Ranks > 0: receive every bucket and copy it into ``params`` in place.

    Returns the seconds spent. ``params`` must pass ``check_compatible``. A bucket whose
    tensors lie back to back in memory (``flat_like``) is received straight into them; any
    other lands in one of two buffers and is copied out while the next one is on the wire.
    """
    start = time.perf_counter()
    buffers = buffers or Buffers()
    tensors = list(params.values())
    # (work, flat buffer, tensors to copy it into) for each bucket on the wire
    in_flight: deque[tuple[Any, torch.Tensor, list[torch.Tensor]]] = deque()

    def land() -> None:
        work, flat, members = in_flight.popleft()
        group.wait(work)
        offset = 0
        for t in members:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    with torch.no_grad():
        for i, (dtype, numel, first, last) in enumerate(header.buckets):
            members = tensors[first:last]
            flat = _span(members, device, _DTYPES[dtype])
            if flat is not None:
                in_flight.append((group.broadcast(flat, async_op=True), flat, []))
                continue
            while len(in_flight) >= 2:  # the bucket that used this slot is unpacked
                land()
            flat = buffers.get(_DTYPES[dtype], numel, device, slot=i % 2)
            in_flight.append((group.broadcast(flat, async_op=True), flat, members))
        while in_flight:
            land()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the local copies out of the last buckets: no peer involved
    return time.perf_counter() - start
