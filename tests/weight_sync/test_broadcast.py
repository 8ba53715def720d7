"""weight_sync.broadcast: the bucket layout, the zero-copy spans, the packed path with two
buffers in flight, and the header checks, on a real two-rank gloo ``SyncGroup`` over loopback.

Every tensor of the sender holds values computed from its name and position, so a slice landed
in the wrong tensor, a bucket unpacked from the wrong buffer slot, or a stale buffer shows.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
import torch

from async_rl.schema import WeightHeader
from weight_sync import broadcast
from weight_sync.group import SyncGroup, connect_store, host_store

# With 1 MiB buckets: 14 float32 tensors of 96 KiB make two buckets (10 fit in 1 MiB), the
# bfloat16 pair one, a 1.2 MB tensor one of its own, and a small last tensor one more.
_SHAPES: list[tuple[str, tuple[int, ...], torch.dtype]] = [
    *((f"f{i}", (192, 128), torch.float32) for i in range(14)),
    ("h0", (96, 256), torch.bfloat16),
    ("h1", (96, 256), torch.bfloat16),
    ("big", (600, 512), torch.float32),  # 1.2 MB: a bucket of its own
    ("tail", (7,), torch.float32),
]


def _values(version: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, shape, dtype) in enumerate(_SHAPES):
        n = torch.Size(shape).numel()
        out[name] = (
            (torch.arange(n, dtype=torch.float64) % 251 + 1000 * i + 10_000 * version).to(dtype).view(shape)
        )
    return out


def _separate() -> dict[str, torch.Tensor]:
    """Separate allocations, like an unflattened model."""
    return {name: torch.full(shape, -1.0, dtype=dtype) for name, shape, dtype in _SHAPES}


def _sender(port: int, layout: str, versions: int, errors: Any) -> None:
    try:
        store = connect_store("127.0.0.1", port, 30)
        group = SyncGroup(store, epoch=0, rank=0, world_size=2, backend="gloo", timeout_s=30)
        params = _separate()
        wire = None
        if layout == "flat":
            params = broadcast.flat_like(params)
        elif layout == "master":  # the learner: flat float32 masters, sent as bfloat16
            params = broadcast.flat_like({n: t.float() for n, t in params.items()})
            wire = torch.bfloat16
        elif layout == "strided":  # non-contiguous sources: transposed views of the values
            params = {n: torch.empty(t.shape[::-1], dtype=t.dtype).t() for n, t in params.items()}
        buffers = broadcast.Buffers()
        for version in range(1, versions + 1):
            for name, t in _values(version).items():
                params[name].copy_(t)
            header = broadcast.plan(params, version=version, epoch=0, bucket_mb=1, wire_dtype=wire)
            broadcast.send(group, params, header, torch.device("cpu"), buffers)
        group.close()
    except BaseException as err:  # reported to the test, which fails on it
        errors.put(repr(err))
        raise


def _run(
    sender_layout: str, receiver_params: dict[str, torch.Tensor], versions: int = 2
) -> list[WeightHeader]:
    store = host_store("127.0.0.1", 0, 30)
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    proc = ctx.Process(target=_sender, args=(store.port, sender_layout, versions, errors))
    proc.start()
    headers = []
    try:
        group = SyncGroup(store, epoch=0, rank=1, world_size=2, backend="gloo", timeout_s=30)
        buffers = broadcast.Buffers()
        for version in range(1, versions + 1):
            header = broadcast.plan(receiver_params, version=version, epoch=0, bucket_mb=1)
            broadcast.check_compatible(header, receiver_params)
            broadcast.receive(group, header, receiver_params, torch.device("cpu"), buffers)
            for name, want in _values(version).items():
                assert torch.equal(receiver_params[name], want.to(receiver_params[name].dtype)), (
                    version,
                    name,
                )
            headers.append(header)
        group.close()
        proc.join(timeout=30)
        assert proc.exitcode == 0, errors.get(timeout=1) if not errors.empty() else proc.exitcode
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
    return headers


def test_plan_splits_by_dtype_and_size() -> None:
    header = broadcast.plan(_separate(), version=3, epoch=1, bucket_mb=1)
    # (dtype, numel, first, last): 10 x 24576 float32 fill 1 MiB (983,040 bytes <= 1,048,576;
    # an 11th would not fit), then the other 4, then the bfloat16 pair, then big alone, then tail.
    assert header.buckets == [
        ("float32", 10 * 24576, 0, 10),
        ("float32", 4 * 24576, 10, 14),
        ("bfloat16", 2 * 24576, 14, 16),
        ("float32", 307200, 16, 17),
        ("float32", 7, 17, 18),
    ]


@pytest.mark.slow
def test_packed_path_delivers_every_tensor_over_two_versions() -> None:
    """Separate tensors on both sides: every multi-tensor bucket is packed into one of two
    buffers and unpacked while the next one is on the wire. Two versions: the second reuses
    the buffers, so a slot unpacked before its bucket landed would leave version 1 values."""
    received = _separate()
    headers = _run("separate", received)
    assert [h.version for h in headers] == [1, 2]


@pytest.mark.slow
def test_spans_land_in_place_from_strided_sources() -> None:
    """The receiver's staging is ``flat_like``: each bucket is received straight into it.
    The sender's tensors are transposed views (not contiguous), so it packs them."""
    staging = broadcast.flat_like(_separate())
    first = next(iter(staging.values()))
    storage = first.untyped_storage().data_ptr()
    assert all(
        t.untyped_storage().data_ptr() == storage for t in staging.values() if t.dtype == torch.float32
    )
    _run("strided", staging)


def test_span_aliases_back_to_back_tensors_only() -> None:
    views = broadcast.flat_like(_separate())
    f32 = [views[f"f{i}"] for i in range(14)]
    span = broadcast._span(f32, torch.device("cpu"), torch.float32)
    assert span is not None and span.numel() == 14 * 24576
    span.fill_(7.0)  # writes through to the views
    assert all(torch.all(t == 7.0) for t in f32)
    assert broadcast._span(f32[::-1], torch.device("cpu"), torch.float32) is None  # wrong order
    assert broadcast._span([f32[0], f32[2]], torch.device("cpu"), torch.float32) is None  # a gap
    assert broadcast._span(f32, torch.device("cpu"), torch.bfloat16) is None  # wrong dtype
    sep = _separate()
    assert broadcast._span([sep["f0"], sep["f1"]], torch.device("cpu"), torch.float32) is None


def test_flatten_parameters_keeps_parameters_and_values() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = [id(p) for p in model.parameters()]
    broadcast.flatten_parameters_(model)
    params = dict(model.named_parameters())
    assert [id(p) for p in model.parameters()] == objects
    assert all(torch.equal(params[n], before[n]) for n in before)
    span = broadcast._span(list(params.values()), torch.device("cpu"), torch.float32)
    assert span is not None and span.numel() == 12 + 4 + 8 + 2
    loss = model(torch.ones(1, 3)).sum()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert all(torch.equal(params[n], params[n].data) for n in params)
    assert torch.equal(span, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def _header(**change: Any) -> tuple[WeightHeader, dict[str, torch.Tensor]]:
    params = _separate()
    header = broadcast.plan(params, version=1, epoch=0, bucket_mb=1)
    for key, value in change.items():
        setattr(header, key, value)
    return header, params


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dtypes": ["bfloat16"] * 18}, "f0 is .* bfloat16, engine has .* torch.float32"),
        ({"shapes": [[192, 127]] + [list(s) for _, s, _ in _SHAPES[1:]]}, r"f0 is \[192, 127\]"),
        ({"buckets": [("float32", 14 * 24576 + 1, 0, 14)]}, r"bucket \[0, 14\) declares"),
        ({"buckets": [("float32", 10 * 24576, 0, 10)]}, "buckets cover 10 of 18"),
        ({"buckets": [("float32", 24576, 1, 2)]}, r"bucket \[1, 2\) does not follow"),
        ({"buckets": [("float32", 24576, 0, 99)]}, r"bucket \[0, 99\) does not follow"),
    ],
)
def test_check_compatible_names_the_mismatch(change: dict[str, Any], message: str) -> None:
    header, params = _header(**change)
    with pytest.raises(ValueError, match=message):
        broadcast.check_compatible(header, params)


@pytest.mark.slow
def test_float32_masters_reach_bfloat16_engines_cast_on_the_way() -> None:
    """model.dtype=bfloat16: the learner's float32 master weights (one flat buffer) go out as
    bfloat16, cast bucket by bucket; the engine's bfloat16 staging receives them in place and
    plans the same bucket layout from its own parameters."""
    staging = broadcast.flat_like({n: t.to(torch.bfloat16) for n, t in _separate().items()})
    headers = _run("master", staging)
    assert {d for h in headers for d in h.dtypes} == {"bfloat16"}
