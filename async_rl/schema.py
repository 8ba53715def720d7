"""Every message that crosses a process boundary, and its msgpack codec.

A message on the wire is one msgpack map ``{"v": SCHEMA_VERSION, "k": kind, ...fields}``.
Token ids, logprobs and versions travel as raw little-endian arrays (``bytes`` holding
int32/float32), never as lists of Python numbers. Nothing is ever pickled.

``decode`` checks everything a peer controls (types, lengths, ranges) and raises
``SchemaError`` for anything else; receivers count and log those, then carry on.
Checks that need the receiver's state (vocabulary size, current policy version) live in
``check_group``.
"""

from __future__ import annotations

import enum
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

# Bumped on any incompatible change; a peer with another version is refused at register.
# 3: responses carry a per-token ``sampled`` mask and turn/tool counts (multi-turn episodes).
SCHEMA_VERSION = 3
# Messages whose layout never changes, decoded whatever version the envelope names: a peer
# of another version can still register, and be told why it is refused.
_ANY_VERSION_KINDS = ("register", "rejected")

# Hard caps on what one message may declare, before any array is materialised.
MAX_TOKENS_PER_SEQUENCE = 1 << 20  # 1M tokens: far above any context length in use
MAX_RESPONSES_PER_GROUP = 4096
MAX_LEASES_PER_MESSAGE = 65536
MAX_STRING_CHARS = 1 << 20
MAX_PARAMS = 1 << 20
# Far above any verifiable reward, and small enough that a group's float32 mean and std
# (which squares deviations) stay finite: 1e300 is finite as a float64 but inf on the learner.
MAX_ABS_REWARD = 1e9

# msgpack builds Python objects before any check here runs, and a one-byte empty map costs a
# 64-byte dict: bound that work for any input. No schema list is longer than MAX_PARAMS (weight
# header names) or map wider than a config section; the largest legitimate message, a weight
# header, holds one shape list per parameter. The schema has no extension types. What is left,
# scalars at up to ~25 bytes of memory per wire byte, is bounded by transport.max_message_mb.
_MAX_LIST = MAX_PARAMS
_MAX_MAP = 1024
_MAX_CONTAINERS = 2 * MAX_PARAMS

_U8 = np.dtype("u1")
_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")


class SchemaError(ValueError):
    """A message that does not decode to a valid schema object."""


class FinishReason(enum.Enum):
    STOP = "stop"  # the engine sampled EOS, or the environment ended the episode
    LENGTH = "length"  # the response reached rollout.max_new_tokens


# The version (and logprob 0) an observation token carries: the policy did not sample it.
NOT_SAMPLED = -1


# --------------------------------------------------------------------------- control


@dataclass
class Register:
    """Actor -> learner: first message of an actor."""

    actor_id: str
    schema_version: int
    pid: int
    hostname: str


@dataclass
class Registered:
    """Learner -> actor: accepted. ``config`` is the learner's run config (to_dict form);
    the actor samples with its rollout settings and loads ``model_path``."""

    actor_id: str
    version: int
    config: dict[str, Any]
    model_path: str
    trajectory_endpoint: str


@dataclass
class Rejected:
    """Learner -> actor: registration refused (the reason says how to fix it)."""

    reason: str


@dataclass
class LeaseRequest:
    """Actor -> learner: ask for up to ``n`` prompts. ``engine_version`` is the policy version
    the actor's engine holds now: admission control counts from it, so an actor that has not
    swapped in the newest weights yet cannot take leases that would end up too stale."""

    actor_id: str
    n: int
    engine_version: int = 0


@dataclass
class Lease:
    """One prompt lent to one actor. ``seq`` is the data cursor position of the draw:
    unique per run, it seeds the sampler so a lease is sampled the same way anywhere."""

    lease_id: int
    prompt_id: int
    seq: int
    question: str
    answer: str


@dataclass
class LeaseGrant:
    leases: list[Lease]


@dataclass
class Wait:
    """Learner -> actor: no lease now (admission control); ask again after a while."""

    retry_after_s: float
    reason: str


@dataclass
class Ack:
    """Learner -> actor: these leases were received (trained, filtered or dropped as late);
    the actor may forget them."""

    lease_ids: list[int]


@dataclass
class Heartbeat:
    actor_id: str
    version: int
    in_flight: int


@dataclass
class Bye:
    """Either direction: the sender is going away (learner: actors should exit). A reason
    starting with ``EVICTED`` means the learner dropped this actor from the fleet (it missed
    a weight-sync deadline): the actor should register again rather than exit."""

    actor_id: str
    reason: str


EVICTED = "evicted"


@dataclass
class SyncDone:
    """Actor -> learner: weights ``version`` are in the engine. ``receive_s`` is the time
    the broadcast took on this actor (generation went on meanwhile), ``pause_s`` the time
    generation stood still to swap them in."""

    actor_id: str
    version: int
    receive_s: float
    pause_s: float


@dataclass
class JoinGroup:
    """Learner -> actor: form weight-sync group ``epoch`` as ``rank`` of ``world_size``
    through the learner's rendezvous store at ``store_host:store_port``."""

    epoch: int
    rank: int
    world_size: int
    store_host: str
    store_port: int
    backend: str


@dataclass
class WeightHeader:
    """Learner -> actor, on the control channel, before a weight broadcast.

    Parameters are packed in order into one flat bucket per (dtype, bucket index);
    ``buckets[i] = (dtype, numel, first_param, last_param_exclusive)``.
    """

    version: int
    epoch: int
    names: list[str]
    shapes: list[list[int]]
    dtypes: list[str]
    buckets: list[tuple[str, int, int, int]]


# --------------------------------------------------------------------------- trajectories


@dataclass
class Response:
    """One response: an episode's policy turns and the observations between them. Arrays are
    aligned: where ``sampled[i]``, token i was sampled with logprob ``logprobs[i]`` (under the
    distribution actually sampled) by policy ``versions[i]``; elsewhere it is an observation
    token the environment appended (logprob 0, version ``NOT_SAMPLED``), never trained on.
    A single-turn response has every token sampled."""

    token_ids: np.ndarray  # [T] int32
    logprobs: np.ndarray  # [T] float32, <= 0
    versions: np.ndarray  # [T] int32, >= 0 where sampled
    reward: float
    finish_reason: FinishReason
    sampled: np.ndarray | None = None  # [T] bool; None: all sampled
    turns: int = 1  # policy turns
    tool_calls: int = 0  # counted by the environment
    tool_errors: int = 0

    def __post_init__(self) -> None:
        if self.sampled is None:
            self.sampled = np.ones(len(self.token_ids), dtype=bool)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def sampled_mask(self) -> np.ndarray:
        assert self.sampled is not None
        return self.sampled

    @property
    def sampled_versions(self) -> np.ndarray:
        """The versions of the sampled tokens (observations have none)."""
        return self.versions[self.sampled_mask]


@dataclass
class TrajectoryGroup:
    """Actor -> learner on the trajectory channel: the G responses of one lease."""

    lease_id: int
    prompt_id: int
    actor_id: str
    prompt_token_ids: np.ndarray  # [P] int32
    responses: list[Response] = field(default_factory=list)

    @property
    def min_version(self) -> int:
        """The oldest policy that sampled a token of this group (observations do not count)."""
        versions = [r.sampled_versions for r in self.responses]
        return min((int(v.min()) for v in versions if len(v)), default=0)


Message = (
    Register
    | Registered
    | Rejected
    | LeaseRequest
    | LeaseGrant
    | Wait
    | Ack
    | Heartbeat
    | Bye
    | SyncDone
    | JoinGroup
    | WeightHeader
    | TrajectoryGroup
)

_KINDS: dict[type, str] = {
    Register: "register",
    Registered: "registered",
    Rejected: "rejected",
    LeaseRequest: "lease_request",
    LeaseGrant: "lease_grant",
    Wait: "wait",
    Ack: "ack",
    Heartbeat: "heartbeat",
    Bye: "bye",
    SyncDone: "sync_done",
    JoinGroup: "join_group",
    WeightHeader: "weight_header",
    TrajectoryGroup: "trajectory",
}


# --------------------------------------------------------------------------- encoding


def _arr(values: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def _response_to_wire(r: Response) -> dict[str, Any]:
    return {
        "tokens": _arr(r.token_ids, _I32),
        "logprobs": _arr(r.logprobs, _F32),
        "versions": _arr(r.versions, _I32),
        "sampled": _arr(r.sampled_mask, _U8),
        "len": int(r.length),
        "reward": float(r.reward),
        "finish": r.finish_reason.value,
        "turns": int(r.turns),
        "tool_calls": int(r.tool_calls),
        "tool_errors": int(r.tool_errors),
    }


def encode(msg: Message) -> bytes:
    """Serialise one message to msgpack bytes."""
    kind = _KINDS.get(type(msg))
    if kind is None:
        raise TypeError(f"not a schema message: {type(msg).__name__}")
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "k": kind}
    match msg:
        case TrajectoryGroup():
            body |= {
                "lease_id": msg.lease_id,
                "prompt_id": msg.prompt_id,
                "actor_id": msg.actor_id,
                "prompt": _arr(msg.prompt_token_ids, _I32),
                "responses": [_response_to_wire(r) for r in msg.responses],
            }
        case LeaseGrant():
            body["leases"] = [[x.lease_id, x.prompt_id, x.seq, x.question, x.answer] for x in msg.leases]
        case WeightHeader():
            body |= {
                "version": msg.version,
                "epoch": msg.epoch,
                "names": msg.names,
                "shapes": msg.shapes,
                "dtypes": msg.dtypes,
                "buckets": [list(b) for b in msg.buckets],
            }
        case _:
            body |= vars(msg)
    return msgpack.packb(body, use_bin_type=True)


# --------------------------------------------------------------------------- decoding


def _show(value: Any) -> str:
    """A peer-controlled value for an error message: bounded work, at most 80 characters."""
    return reprlib.repr(value)[:80]


def _container_budget(limit: int) -> Callable[[Any], Any]:
    """A msgpack ``list_hook``/``object_hook`` that fails once a message holds ``limit`` lists
    and maps. A closure: msgpack calls it per container, and a bound ``__call__`` costs twice as much."""
    left = limit

    def spend(container: Any) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise SchemaError(f"more than {limit} lists and maps in one message")
        return container

    return spend


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise SchemaError(f"missing field {key!r}")
    value = d[key]
    # bool is an int subclass in Python; never accept it where a number is expected.
    if isinstance(value, bool) and typ is not bool:
        raise SchemaError(f"field {key!r}: expected {typ}, got bool")
    if not isinstance(value, typ):
        raise SchemaError(f"field {key!r}: expected {typ}, got {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
        raise SchemaError(f"field {key!r}: string longer than {MAX_STRING_CHARS}")
    return value


def _int(d: dict[str, Any], key: str, lo: int = 0, hi: int = 2**62) -> int:
    value = _get(d, key, int)
    if not lo <= value <= hi:
        raise SchemaError(f"field {key!r}={value} out of range [{lo}, {hi}]")
    return int(value)


def _float(d: dict[str, Any], key: str) -> float:
    value = float(_get(d, key, (int, float)))
    if not math.isfinite(value):
        raise SchemaError(f"field {key!r} is not finite")
    return value


def _array(d: dict[str, Any], key: str, dtype: np.dtype, length: int) -> np.ndarray:
    raw = _get(d, key, bytes)
    if len(raw) != length * dtype.itemsize:
        raise SchemaError(f"field {key!r}: {len(raw)} bytes, expected {length} x {dtype.itemsize}")
    # A read-only view on the message bytes: no copy, no Python numbers.
    return np.frombuffer(raw, dtype=dtype)


def _decode_response(d: Any) -> Response:
    if not isinstance(d, dict):
        raise SchemaError("response is not a map")
    length = _int(d, "len", 0, MAX_TOKENS_PER_SEQUENCE)
    tokens = _array(d, "tokens", _I32, length)
    logprobs = _array(d, "logprobs", _F32, length)
    versions = _array(d, "versions", _I32, length)
    sampled_bytes = _array(d, "sampled", _U8, length)
    if length and int(tokens.min()) < 0:
        raise SchemaError("negative token id")
    if length and int(sampled_bytes.max()) > 1:
        raise SchemaError("sampled must hold 0 or 1 per token")
    sampled = sampled_bytes.astype(bool)
    if not np.isfinite(logprobs).all() or (logprobs > 0).any():
        raise SchemaError("logprobs must be finite and <= 0")
    if (versions[sampled] < 0).any():
        raise SchemaError("negative policy version")
    if (versions[~sampled] != NOT_SAMPLED).any() or (logprobs[~sampled] != 0).any():
        raise SchemaError(f"an observation token (sampled 0) must have version {NOT_SAMPLED} and logprob 0")
    try:
        finish = FinishReason(_get(d, "finish", str))
    except ValueError:
        raise SchemaError(f"unknown finish reason {_show(d.get('finish'))}") from None
    reward = _float(d, "reward")
    if abs(reward) > MAX_ABS_REWARD:
        raise SchemaError(f"reward {reward:g} outside [-{MAX_ABS_REWARD:g}, {MAX_ABS_REWARD:g}]")
    counts = {key: _int(d, key, 0, MAX_TOKENS_PER_SEQUENCE) for key in ("turns", "tool_calls", "tool_errors")}
    return Response(tokens, logprobs, versions, reward, finish, sampled, **counts)


def _decode_trajectory(d: dict[str, Any]) -> TrajectoryGroup:
    prompt = _get(d, "prompt", bytes)
    if len(prompt) % 4 or len(prompt) // 4 > MAX_TOKENS_PER_SEQUENCE:
        raise SchemaError("prompt: bad byte length")
    if not prompt:
        # The first response token is predicted from the last prompt position.
        raise SchemaError("prompt: needs at least one token")
    prompt_ids = np.frombuffer(prompt, dtype=_I32)
    if int(prompt_ids.min()) < 0:
        raise SchemaError("negative token id in prompt")
    responses = _get(d, "responses", list)
    if not 1 <= len(responses) <= MAX_RESPONSES_PER_GROUP:
        raise SchemaError(f"a group needs 1..{MAX_RESPONSES_PER_GROUP} responses")
    return TrajectoryGroup(
        lease_id=_int(d, "lease_id"),
        prompt_id=_int(d, "prompt_id"),
        actor_id=_get(d, "actor_id", str),
        prompt_token_ids=prompt_ids,
        responses=[_decode_response(r) for r in responses],
    )


def _decode_leases(d: dict[str, Any]) -> LeaseGrant:
    rows = _get(d, "leases", list)
    if len(rows) > MAX_LEASES_PER_MESSAGE:
        raise SchemaError("too many leases")
    leases = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 5):
            raise SchemaError("lease row must be [lease_id, prompt_id, seq, question, answer]")
        fields = dict(zip(("lease_id", "prompt_id", "seq", "question", "answer"), row))
        leases.append(
            Lease(
                _int(fields, "lease_id"),
                _int(fields, "prompt_id"),
                _int(fields, "seq"),
                _get(fields, "question", str),
                _get(fields, "answer", str),
            )
        )
    return LeaseGrant(leases)


def _decode_header(d: dict[str, Any]) -> WeightHeader:
    names = _get(d, "names", list)
    shapes = _get(d, "shapes", list)
    dtypes = _get(d, "dtypes", list)
    if not (len(names) == len(shapes) == len(dtypes) <= MAX_PARAMS):
        raise SchemaError("names, shapes and dtypes must have one entry per parameter")
    if not all(isinstance(n, str) for n in names + dtypes):
        raise SchemaError("names and dtypes must be strings")
    for shape in shapes:
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise SchemaError("shapes must be lists of non-negative ints")
    buckets = []
    for b in _get(d, "buckets", list):
        ok = isinstance(b, list) and len(b) == 4 and isinstance(b[0], str)
        if not ok or not all(type(x) is int and x >= 0 for x in b[1:]) or not b[2] <= b[3] <= len(names):
            raise SchemaError("bucket must be [dtype, numel, first, last] within the parameter list")
        buckets.append((b[0], b[1], b[2], b[3]))
    return WeightHeader(_int(d, "version"), _int(d, "epoch"), names, shapes, dtypes, buckets)


def decode(data: bytes) -> Message:
    """Parse and validate one message. Raises ``SchemaError`` on anything malformed."""
    budget = _container_budget(_MAX_CONTAINERS)
    try:
        d = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=len(data),
            max_array_len=min(len(data), _MAX_LIST),
            max_map_len=min(len(data), _MAX_MAP),
            max_ext_len=0,
            list_hook=budget,
            object_hook=budget,
        )
    except SchemaError:
        raise
    except Exception as err:  # msgpack raises several unrelated types on garbage
        raise SchemaError(f"not msgpack: {type(err).__name__}") from None
    if not isinstance(d, dict):
        raise SchemaError("message is not a map")
    version = d.get("v")
    kind = d.get("k")
    if type(version) is not int or (version != SCHEMA_VERSION and kind not in _ANY_VERSION_KINDS):
        raise SchemaError(f"schema version {_show(version)}, this process speaks {SCHEMA_VERSION}")
    match kind:
        case "trajectory":
            return _decode_trajectory(d)
        case "lease_grant":
            return _decode_leases(d)
        case "weight_header":
            return _decode_header(d)
        case "register":
            return Register(
                _get(d, "actor_id", str),
                _int(d, "schema_version"),
                _int(d, "pid"),
                _get(d, "hostname", str),
            )
        case "registered":
            return Registered(
                _get(d, "actor_id", str),
                _int(d, "version"),
                _get(d, "config", dict),
                _get(d, "model_path", str),
                _get(d, "trajectory_endpoint", str),
            )
        case "rejected":
            return Rejected(_get(d, "reason", str))
        case "lease_request":
            return LeaseRequest(
                _get(d, "actor_id", str), _int(d, "n", 1, MAX_LEASES_PER_MESSAGE), _int(d, "engine_version")
            )
        case "wait":
            return Wait(_float(d, "retry_after_s"), _get(d, "reason", str))
        case "ack":
            ids = _get(d, "lease_ids", list)
            if len(ids) > MAX_LEASES_PER_MESSAGE or not all(type(i) is int and i >= 0 for i in ids):
                raise SchemaError("lease_ids must be a list of non-negative ints")
            return Ack(ids)
        case "heartbeat":
            return Heartbeat(_get(d, "actor_id", str), _int(d, "version"), _int(d, "in_flight"))
        case "join_group":
            return JoinGroup(
                _int(d, "epoch"),
                _int(d, "rank", 1, 1 << 20),
                _int(d, "world_size", 2, 1 << 20),
                _get(d, "store_host", str),
                _int(d, "store_port", 1, 65535),
                _get(d, "backend", str),
            )
        case "bye":
            return Bye(_get(d, "actor_id", str), _get(d, "reason", str))
        case "sync_done":
            receive_s, pause_s = _float(d, "receive_s"), _float(d, "pause_s")
            if not (0 <= receive_s < 1e6 and 0 <= pause_s < 1e6):
                raise SchemaError("sync_done: receive_s and pause_s must be in [0, 1e6)")
            return SyncDone(_get(d, "actor_id", str), _int(d, "version"), receive_s, pause_s)
        case _:
            raise SchemaError(f"unknown message kind {_show(kind)}")


def check_group(
    group: TrajectoryGroup,
    *,
    vocab_size: int,
    max_version: int,
    group_size: int,
    max_response_tokens: int | None = None,
) -> None:
    """Checks that need the learner's state. Raises ``SchemaError``."""
    if len(group.responses) != group_size:
        raise SchemaError(f"group has {len(group.responses)} responses, rollout.group_size={group_size}")
    if max_response_tokens is not None:
        longest = max(r.length for r in group.responses)
        if longest > max_response_tokens:
            raise SchemaError(
                f"a response has {longest} tokens, rollout.max_new_tokens={max_response_tokens}"
            )
    arrays = [("prompt", group.prompt_token_ids)] + [
        (f"response {i}", r.token_ids) for i, r in enumerate(group.responses)
    ]
    for where, ids in arrays:
        if len(ids) and int(ids.max()) >= vocab_size:
            raise SchemaError(f"{where}: token id {int(ids.max())} >= vocab size {vocab_size}")
    for i, r in enumerate(group.responses):
        versions = r.sampled_versions
        if len(versions) and int(versions.max()) > max_version:
            raise SchemaError(
                f"response {i}: version {int(versions.max())} is from the future (learner at {max_version})"
            )
