"""Hostile input: ``decode`` and ``check_group`` under fuzzing, then a live ``LearnerServer``
flooded with random, mutated, multi-frame and oversized messages on both of its sockets.

The oracle everywhere: an input either decodes to a message that satisfies every schema
invariant (and re-encodes to the same bytes) or raises ``SchemaError``. Nothing else.
"""

from __future__ import annotations

import logging
import math
import random
import struct
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_rl import schema
from async_rl.schema import (
    MAX_ABS_REWARD,
    MAX_LEASES_PER_MESSAGE,
    MAX_STRING_CHARS,
    SCHEMA_VERSION,
    Ack,
    Bye,
    FinishReason,
    Heartbeat,
    JoinGroup,
    Lease,
    LeaseGrant,
    LeaseRequest,
    Message,
    Register,
    Registered,
    Rejected,
    Response,
    SchemaError,
    SyncDone,
    TrajectoryGroup,
    Wait,
    WeightHeader,
    check_group,
    decode,
    encode,
)
from async_rl.transport import LearnerServer

# A decode takes microseconds: 300 examples keep each property to a few seconds on a shared
# 2-core box. No per-example deadline (a loaded machine makes it flaky); a hang trips the timeout.
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.timeout(60)

_INT_MAX = 2**62  # schema._int's default upper bound

# --------------------------------------------------------------------------- valid messages

_text = st.text(max_size=12)
_id = st.integers(0, _INT_MAX)


@st.composite
def _responses(draw: st.DrawFn) -> Response:
    n = draw(st.integers(0, 6))

    def ints(hi: int) -> np.ndarray:
        return np.array(draw(st.lists(st.integers(0, hi), min_size=n, max_size=n)), dtype=np.int32)

    logprobs = draw(st.lists(st.floats(-(2.0**100), 0.0, width=32), min_size=n, max_size=n))
    return Response(
        token_ids=ints(2**31 - 1),
        logprobs=np.array(logprobs, dtype=np.float32),
        versions=ints(50),
        reward=draw(st.floats(-MAX_ABS_REWARD, MAX_ABS_REWARD)),
        finish_reason=draw(st.sampled_from(FinishReason)),
    )


@st.composite
def _groups(draw: st.DrawFn) -> TrajectoryGroup:
    prompt = draw(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=6))
    return TrajectoryGroup(
        lease_id=draw(_id),
        prompt_id=draw(_id),
        actor_id=draw(_text),
        prompt_token_ids=np.array(prompt, dtype=np.int32),
        responses=draw(st.lists(_responses(), min_size=1, max_size=4)),
    )


@st.composite
def _weight_headers(draw: st.DrawFn) -> WeightHeader:
    n = draw(st.integers(0, 4))
    names = draw(st.lists(_text, min_size=n, max_size=n))
    shapes = draw(st.lists(st.lists(st.integers(0, 4096), max_size=3), min_size=n, max_size=n))
    dtypes = draw(st.lists(st.sampled_from(["float32", "bfloat16"]), min_size=n, max_size=n))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    buckets = [(dtypes[0] if n else "float32", draw(_id), lo, hi) for lo, hi in zip([0, *cuts], cuts)]
    return WeightHeader(draw(_id), draw(_id), names, shapes, dtypes, buckets)


_config = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)

_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Register, _text, _id, _id, _text),
    st.builds(Registered, _text, _id, st.dictionaries(_text, _config, max_size=3), _text, _text),
    st.builds(Rejected, _text),
    st.builds(LeaseRequest, _text, st.integers(1, MAX_LEASES_PER_MESSAGE)),
    st.builds(LeaseGrant, st.lists(st.builds(Lease, _id, _id, _id, _text, _text), max_size=3)),
    st.builds(Wait, st.floats(allow_nan=False, allow_infinity=False), _text),
    st.builds(Ack, st.lists(st.integers(0, 2**64 - 1), max_size=4)),
    st.builds(Heartbeat, _text, _id, _id),
    st.builds(Bye, _text, _text),
    st.builds(SyncDone, _text, _id, st.floats(0, 1e5), st.floats(0, 1e5)),
    st.builds(
        JoinGroup, _id, st.integers(1, 1 << 20), st.integers(2, 1 << 20), _text, st.integers(1, 65535), _text
    ),
    _weight_headers(),
    _groups(),
)


def _assert_valid(msg: Message) -> None:
    """Every invariant ``decode`` promises about what it returns."""
    assert isinstance(msg, get_args(Message))
    fields = [v for k, v in vars(msg).items() if k != "config"]  # a config is free-form
    for value in fields:
        assert not isinstance(value, bool), "the schema has no boolean fields"
        if isinstance(value, int):
            assert 0 <= value <= 2**64 - 1
        if isinstance(value, str):
            assert len(value) <= MAX_STRING_CHARS
    if isinstance(msg, TrajectoryGroup):
        assert msg.prompt_token_ids.dtype == np.int32 and len(msg.prompt_token_ids) >= 1
        assert (msg.prompt_token_ids >= 0).all()
        assert len(msg.responses) >= 1
        for r in msg.responses:
            assert r.token_ids.dtype == np.int32 and r.versions.dtype == np.int32
            assert r.logprobs.dtype == np.float32
            assert len(r.token_ids) == len(r.logprobs) == len(r.versions) == r.length
            assert (r.token_ids >= 0).all() and (r.versions >= 0).all()
            assert np.isfinite(r.logprobs).all() and (r.logprobs <= 0).all()
            assert math.isfinite(r.reward) and abs(r.reward) <= MAX_ABS_REWARD
            assert isinstance(r.finish_reason, FinishReason)
    if isinstance(msg, WeightHeader):
        assert len(msg.names) == len(msg.shapes) == len(msg.dtypes)
        assert all(type(s) is int and s >= 0 for shape in msg.shapes for s in shape)
        assert all(0 <= first <= last <= len(msg.names) for _, _, first, last in msg.buckets)
    if isinstance(msg, Ack):
        assert all(type(i) is int and i >= 0 for i in msg.lease_ids)


def _decode_or_reject(data: bytes) -> Message | None:
    """The fuzz oracle: a valid message (which round trips) or SchemaError; None for the latter."""
    try:
        msg = decode(data)
    except SchemaError as err:
        assert str(err), "a rejection names its reason"
        assert len(str(err)) < 300, "peer-controlled values are shortened in error messages"
        return None
    _assert_valid(msg)
    wire = encode(msg)
    assert encode(decode(wire)) == wire
    return msg


# --------------------------------------------------------------------------- hostile inputs

_wire_ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
_hostile_values = st.one_of(
    st.none(),
    st.booleans(),
    _wire_ints,
    st.sampled_from([-1, 2**31, 2**32, 2**40, 2**62 + 1, 2**64 - 1]),
    st.floats(),  # NaN and +-inf included
    st.text(max_size=8),
    st.binary(max_size=24),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=3), _wire_ints, max_size=2),
    st.just(msgpack.ExtType(7, b"x")),
    st.builds(dict, st.just([(1, "int key")])),  # fresh each time: the test mutates bodies in place
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key/index path into a decoded wire body (the body itself excluded)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


_DELETE = object()


def _set(body: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        body = body[key]
    if value is _DELETE:
        del body[path[-1]]
    else:
        body[path[-1]] = value


@given(st.binary(max_size=2048))
@_FUZZ
def test_random_bytes_decode_or_raise_schema_error(data: bytes) -> None:
    _decode_or_reject(data)


@given(st.dictionaries(st.sampled_from(["v", "k", "actor_id", "n", "lease_ids", "x"]), _hostile_values))
@_FUZZ
def test_random_maps_decode_or_raise_schema_error(body: dict[str, Any]) -> None:
    # Plausible-looking maps get past msgpack and exercise the field checks.
    body.setdefault("v", SCHEMA_VERSION)
    _decode_or_reject(msgpack.packb(body, use_bin_type=True))


@given(_messages)
@_FUZZ
def test_valid_messages_round_trip(msg: Message) -> None:
    wire = encode(msg)
    out = _decode_or_reject(wire)
    assert out is not None, "a message built by the schema must decode"
    assert encode(out) == wire


@given(_messages, st.data())
@_FUZZ
def test_truncated_messages_are_rejected(msg: Message, data: st.DataObject) -> None:
    wire = encode(msg)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(SchemaError):
        decode(wire[:cut])


@given(_messages, st.data())
@_FUZZ
def test_byte_flips_decode_or_raise_schema_error(msg: Message, data: st.DataObject) -> None:
    wire = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    _decode_or_reject(bytes(wire))


@given(_messages, st.data())
@_FUZZ
def test_mutated_fields_decode_or_raise_schema_error(msg: Message, data: st.DataObject) -> None:
    body = msgpack.unpackb(encode(msg), raw=False)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(body))
        path = data.draw(st.sampled_from(paths)) if paths else ("extra",)
        if isinstance(path[-1], str) and data.draw(st.booleans()):
            _set(body, path, _DELETE)
        else:
            _set(body, path, data.draw(_hostile_values))
    _decode_or_reject(msgpack.packb(body, use_bin_type=True))


# Mutations every one of which makes a trajectory invalid: each must be rejected.
def _r0(key: str, value: Any) -> Any:
    def apply(body: dict[str, Any]) -> None:
        body["responses"][0][key] = value

    return apply


def _top(key: str, value: Any) -> Any:
    def apply(body: dict[str, Any]) -> None:
        if value is _DELETE:
            body.pop(key)
        else:
            body[key] = value

    return apply


def _resize(key: str, delta_bytes: int) -> Any:
    def apply(body: dict[str, Any]) -> None:
        raw = body["responses"][0][key]
        body["responses"][0][key] = (
            raw[: len(raw) + delta_bytes] if delta_bytes < 0 else raw + b"\0" * delta_bytes
        )

    return apply


def _first_array_value(key: str, value: float, dtype: str) -> Any:
    def apply(body: dict[str, Any]) -> None:
        r0 = body["responses"][0]
        r0[key] = np.array([value], dtype=dtype).tobytes() + r0[key][4:]

    return apply


_BREAKS_A_GROUP = {
    "huge declared length": _r0("len", 2**40),
    "declared length past the cap": _r0("len", schema.MAX_TOKENS_PER_SEQUENCE + 1),
    "negative length": _r0("len", -1),
    "length as a float": _r0("len", 1.0),
    "length as a bool": _r0("len", True),
    "tokens shorter than len": _resize("tokens", -4),
    "logprobs longer than len": _resize("logprobs", 4),
    "versions of odd byte length": _resize("versions", 1),
    "NaN logprob": _first_array_value("logprobs", math.nan, "<f4"),
    "inf logprob": _first_array_value("logprobs", -math.inf, "<f4"),
    "positive logprob": _first_array_value("logprobs", 0.5, "<f4"),
    "negative token id": _first_array_value("tokens", -3, "<i4"),
    "negative version": _first_array_value("versions", -1, "<i4"),
    "reward inf as float32": _r0("reward", 1e300),
    "reward NaN": _r0("reward", math.nan),
    "unknown finish reason": _r0("finish", "exploded" * 10_000),
    "array as a list of numbers": _r0("tokens", [1, 2]),
    "empty prompt": _top("prompt", b""),
    "prompt of odd byte length": _top("prompt", b"\x01\x00\x00"),
    "no responses": _top("responses", []),
    "response not a map": _top("responses", [[1, 2]]),
    "negative lease id": _top("lease_id", -1),
    "lease id past 2**62": _top("lease_id", 2**64 - 1),
    "actor id as bytes": _top("actor_id", b"a0"),
    "unknown kind": _top("k", "trajectory2"),
    "kind as a huge list": _top("k", list(range(100_000))),
    "schema version from the future": _top("v", SCHEMA_VERSION + 1),
    "schema version as a string": _top("v", str(SCHEMA_VERSION)),
    "schema version as a float": _top("v", float(SCHEMA_VERSION)),
    "schema version as a bool": _top("v", True),
    "no schema version": _top("v", _DELETE),
    "missing field": _top("prompt_id", _DELETE),
    "timestamp extension": _top("prompt_id", msgpack.Timestamp(0, 0)),
}


@given(_groups(), st.sampled_from(sorted(_BREAKS_A_GROUP)))
@_FUZZ
def test_each_named_mutation_is_rejected(group: TrajectoryGroup, mutation: str) -> None:
    # Several mutations rewrite or resize the first response's arrays: give it one token.
    group.responses[0] = Response(
        np.array([1], np.int32), np.array([-1.0], np.float32), np.array([0], np.int32), 0.0, FinishReason.STOP
    )
    body = msgpack.unpackb(encode(group), raw=False)
    _BREAKS_A_GROUP[mutation](body)
    with pytest.raises(SchemaError) as err:
        decode(msgpack.packb(body, use_bin_type=True))
    assert len(str(err.value)) < 300


# --------------------------------------------------------------------------- allocation


def _peak_bytes_while_decoding(data: bytes) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(SchemaError):
            decode(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _array32(n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n)


# {"v": SCHEMA_VERSION, "k": "ack", "lease_ids": ...}
_ACK_HEAD = b"\x83\xa1v" + bytes([SCHEMA_VERSION]) + b"\xa1k\xa3ack\xa9lease_ids"


def test_huge_declared_lengths_are_rejected_before_allocating() -> None:
    # 2**32 - 1 elements declared in a 5-byte header: nothing to back it.
    assert _peak_bytes_while_decoding(_ACK_HEAD + _array32(2**32 - 1)) < 64 << 10
    # A declared length past the longest schema list, with enough bytes behind it that the
    # claim looks plausible: msgpack would presize an 8-byte slot per claimed element.
    n = schema.MAX_PARAMS + 1
    assert _peak_bytes_while_decoding(_ACK_HEAD + _array32(n) + b"\xc0" * n) < 64 << 10
    # Same for maps.
    assert _peak_bytes_while_decoding(_ACK_HEAD + b"\xdf" + struct.pack(">I", 2**31)) < 64 << 10


def test_many_small_containers_hit_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # One-byte empty maps cost 64-byte dicts: a budget stops that long before the end of the
    # message. The real budget is 2 * MAX_PARAMS; a small one keeps the test fast.
    monkeypatch.setattr(schema, "_MAX_CONTAINERS", 1000)
    nested = _ACK_HEAD + _array32(4) + (_array32(5000) + b"\x80" * 5000) * 4
    with pytest.raises(SchemaError, match="lists and maps"):
        decode(nested)
    decode(encode(Ack(list(range(900)))))  # a flat list is one container


def test_peer_values_in_errors_are_shortened() -> None:
    huge_kind = msgpack.packb({"v": SCHEMA_VERSION, "k": ["x" * 1000] * 10_000})
    with pytest.raises(SchemaError, match="unknown message kind") as err:
        decode(huge_kind)
    assert len(str(err.value)) < 200


# --------------------------------------------------------------------------- check_group


@given(_groups(), st.integers(1, 2**31), st.integers(0, 60), st.integers(1, 5))
@_FUZZ
def test_check_group_rejects_exactly_the_bad_groups(
    group: TrajectoryGroup, vocab_size: int, max_version: int, group_size: int
) -> None:
    arrays = [group.prompt_token_ids] + [r.token_ids for r in group.responses]
    too_big = any(len(a) and int(a.max()) >= vocab_size for a in arrays)
    future = any(r.length and int(r.versions.max()) > max_version for r in group.responses)
    wrong_size = len(group.responses) != group_size
    try:
        check_group(group, vocab_size=vocab_size, max_version=max_version, group_size=group_size)
    except SchemaError as err:
        # Checked in this order; the message names the first problem.
        first = "group_size" if wrong_size else "vocab size" if too_big else "future" if future else None
        assert first is not None and first in str(err)
    else:
        assert not (too_big or future or wrong_size)


def _group_of(prompt: list[int], *responses: tuple[list[int], list[int]]) -> TrajectoryGroup:
    def response(tokens: list[int], versions: list[int]) -> Response:
        n = len(tokens)
        return Response(
            np.array(tokens, np.int32),
            np.full(n, -1.0, np.float32),
            np.array(versions, np.int32),
            1.0,
            FinishReason.STOP,
        )

    return TrajectoryGroup(1, 2, "a0", np.array(prompt, np.int32), [response(t, v) for t, v in responses])


@pytest.mark.parametrize(
    ("group", "message"),
    [
        (_group_of([1, 9], ([1], [0]), ([2], [0])), r"^prompt: token id 9 >= vocab size 8$"),
        (_group_of([1], ([1], [0]), ([2, 8], [0, 0])), r"^response 1: token id 8 >= vocab size 8$"),
        (
            _group_of([1], ([1], [0]), ([2], [4])),
            r"^response 1: version 4 is from the future \(learner at 3\)$",
        ),
        (_group_of([1], ([1], [0])), r"^group has 1 responses, rollout.group_size=2$"),
    ],
)
def test_check_group_names_what_is_wrong(group: TrajectoryGroup, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        check_group(group, vocab_size=8, max_version=3, group_size=2)


def test_check_group_bounds_response_length_by_max_new_tokens() -> None:
    # A valid-looking group with responses longer than the learner lets actors sample would
    # otherwise be batched (and could exhaust memory); exactly the limit is fine.
    group = _group_of([1], ([1, 2, 3], [0, 0, 0]), ([2], [0]))
    check_group(group, vocab_size=8, max_version=3, group_size=2, max_response_tokens=3)
    with pytest.raises(SchemaError, match=r"^a response has 3 tokens, rollout.max_new_tokens=2$"):
        check_group(group, vocab_size=8, max_version=3, group_size=2, max_response_tokens=2)


# --------------------------------------------------------------------------- live sockets

_MAX_MB = 1
_ACTOR = "fuzz-actor"


def _seed_messages() -> list[bytes]:
    r = Response(
        np.array([3, 4], np.int32),
        np.array([-0.5, -1.0], np.float32),
        np.array([0, 0], np.int32),
        1.0,
        FinishReason.STOP,
    )
    group = TrajectoryGroup(7, 8, _ACTOR, np.array([1, 2, 3], np.int32), [r, r])
    msgs: list[Message] = [
        Register(_ACTOR, SCHEMA_VERSION, 123, "host"),
        LeaseRequest(_ACTOR, 4),
        Heartbeat(_ACTOR, 0, 2),
        Bye(_ACTOR, "done"),
        group,
    ]
    return [encode(m) for m in msgs]


_LIVE_HOSTILE_VALUES = [
    None,
    True,
    -1,
    2**40,
    2**64 - 1,
    1.5,
    math.nan,
    "",
    "x" * 300,
    b"\xff" * 9,
    [1],
    {"a": 1},
]


def _hostile(rng: random.Random, seeds: list[bytes]) -> bytes:
    """One random, truncated, byte-flipped, field-mutated or valid message."""
    base = rng.choice(seeds)
    match rng.randrange(5):
        case 0:
            return rng.randbytes(rng.randrange(300))
        case 1:
            return base[: rng.randrange(len(base))]
        case 2:
            flipped = bytearray(base)
            for _ in range(rng.randint(1, 3)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            return bytes(flipped)
        case 3:
            body = msgpack.unpackb(base, raw=False)
            body[rng.choice([*body, "v", "k"])] = rng.choice(_LIVE_HOSTILE_VALUES)
            return msgpack.packb(body, use_bin_type=True)
        case _:
            return base


def _is_malformed(data: bytes) -> bool:
    try:
        decode(data)
    except SchemaError:
        return True
    return False


@dataclass
class _Peer:
    ctx: zmq.Context
    control: zmq.Socket
    trajectory: zmq.Socket

    def close(self) -> None:
        self.control.close()
        self.trajectory.close()
        self.ctx.term()


def _connect(server: LearnerServer, routing_id: str) -> _Peer:
    ctx = zmq.Context()
    control = ctx.socket(zmq.DEALER)
    control.setsockopt(zmq.ROUTING_ID, routing_id.encode())
    trajectory = ctx.socket(zmq.PUSH)
    for sock in (control, trajectory):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 10_000)  # a stuck server fails the test instead of hanging it
    control.connect(server.control_endpoint)
    trajectory.connect(server.trajectory_endpoint)
    return _Peer(ctx, control, trajectory)


@pytest.fixture
def server() -> Iterator[LearnerServer]:
    srv = LearnerServer("127.0.0.1", 0, 0, high_water_mark=1000, max_message_mb=_MAX_MB)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def peer(server: LearnerServer) -> Iterator[_Peer]:
    p = _connect(server, _ACTOR)
    try:
        yield p
    finally:
        p.close()


@dataclass
class _Tally:
    valid_control: int = 0
    valid_trajectory: int = 0
    malformed: int = 0


def _drain(server: LearnerServer, expected: _Tally, got: _Tally, timeout_s: float = 10.0) -> None:
    """Poll until the server has seen everything sent so far, exactly."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        control, trajectories = server.poll(0.05)
        got.valid_control += len(control)
        got.valid_trajectory += len(trajectories)
        got.malformed = server.malformed
        if got == expected:
            return
    raise AssertionError(f"server saw {got}, expected {expected}")


def test_live_server_survives_a_flood_and_counts_every_malformed_message(
    server: LearnerServer, peer: _Peer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="async_rl.transport")
    rng = random.Random(7)
    seeds = _seed_messages()
    expected, got = _Tally(), _Tally()
    start = time.monotonic()
    for _ in range(20):  # 20 batches x 100 per socket = 4,000 messages
        for _ in range(100):
            data = _hostile(rng, seeds)
            if rng.random() < 0.03:
                # A DEALER message of two frames reaches the ROUTER as three: malformed however
                # valid the parts.
                peer.control.send_multipart([data, data])
                expected.malformed += 1
            else:
                peer.control.send(data)
                bad = _is_malformed(data)
                expected.malformed += bad
                expected.valid_control += not bad
            data = _hostile(rng, seeds)
            peer.trajectory.send(data)
            bad = _is_malformed(data)
            expected.malformed += bad
            expected.valid_trajectory += not bad
        _drain(server, expected, got)
    assert got.malformed == server.malformed == expected.malformed > 1000

    # At the size limit ZMQ delivers (and decode rejects); one byte over, ZMQ drops the message
    # and the connection before Python sees it, so the counter does not move.
    limit = _MAX_MB << 20
    peer.trajectory.send(b"\xc1" * limit)
    expected.malformed += 1
    _drain(server, expected, got)
    oversized = _connect(server, "fuzz-oversized")
    try:
        oversized.control.send(b"\xc1" * (limit + 1))
        oversized.trajectory.send(b"\xc1" * (limit + 1))
        time.sleep(0.3)
        control, trajectories = server.poll(0.2)
        assert (control, trajectories, server.malformed) == ([], [], expected.malformed)
    finally:
        oversized.close()
    elapsed = time.monotonic() - start

    # Still responsive: a registration round trip on the control socket and a group on the
    # trajectory socket.
    peer.control.send(encode(Register(_ACTOR, SCHEMA_VERSION, 1, "host")))
    peer.trajectory.send(seeds[-1])
    control, trajectories = [], []
    deadline = time.monotonic() + 5
    while (not control or not trajectories) and time.monotonic() < deadline:
        c, t = server.poll(0.05)
        control += c
        trajectories += t
    assert control == [(_ACTOR, Register(_ACTOR, SCHEMA_VERSION, 1, "host"))]
    assert len(trajectories) == 1 and isinstance(trajectories[0], TrajectoryGroup)
    reply = Registered(_ACTOR, 0, {}, "model", server.trajectory_endpoint)
    assert server.send(_ACTOR, reply)
    assert peer.control.poll(5000), "no reply from the server"
    assert decode(peer.control.recv()) == reply

    # One log line per 5 s period, not one per bad message.
    lines = [r for r in caplog.records if r.name == "async_rl.transport"]
    assert 1 <= len(lines) <= 1 + math.ceil(elapsed / 5.0)
    assert server.malformed > 100 * len(lines)
