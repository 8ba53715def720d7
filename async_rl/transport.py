"""ZeroMQ transport: both halves of the learner <-> actor channels in one file.

* control: learner ROUTER (bind) <-> actor DEALER (connect). Requests, replies and
  learner-initiated messages (acks, weight headers, bye). The DEALER's routing id is the
  actor id, so the learner addresses an actor by name.
* trajectories: actor PUSH (connect) -> learner PULL (bind).

Queues are bounded (``high_water_mark``), messages above ``max_message_mb`` are dropped by
ZMQ before they reach Python, every receive takes a timeout, and everything received goes
through ``schema.decode``: a malformed message is counted and logged (rate-limited), never
raised into the caller's loop.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from async_rl.schema import Message, SchemaError, decode, encode

logger = logging.getLogger(__name__)


@dataclass
class Endpoints:
    """Where a learner listens; written to ``endpoints.json`` in its run directory."""

    control: str
    trajectory: str
    store_host: str
    store_port: int

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(vars(self), indent=2))
        tmp.replace(path)  # atomic: an actor never reads half a file

    @classmethod
    def load(cls, path: Path) -> Endpoints:
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["control"], data["trajectory"], data["store_host"], int(data["store_port"]))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no endpoints.json; is the learner running in that run directory?"
            ) from None
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a valid endpoints.json ({err})") from None


class RateLimitedLog:
    """At most one log line per ``period_s`` for a repeating problem, with a count."""

    def __init__(self, log: logging.Logger, period_s: float = 5.0) -> None:
        self._log = log
        self._period_s = period_s
        self._last = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._period_s:
            self._suppressed += 1
            return
        suffix = f" (+{self._suppressed} similar suppressed)" if self._suppressed else ""
        self._log.warning(msg + suffix, *args)
        self._last, self._suppressed = now, 0


def _socket(ctx: zmq.Context, kind: int, hwm: int, max_bytes: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)  # close() never blocks on unsent messages
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    return sock


def _bind(sock: zmq.Socket, host: str, port: int) -> str:
    if port:
        sock.bind(f"tcp://{host}:{port}")
        return f"tcp://{host}:{port}"
    chosen = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{chosen}"


class LearnerServer:
    """The learner's sockets. Not thread-safe: one thread owns it."""

    def __init__(
        self, host: str, control_port: int, trajectory_port: int, *, high_water_mark: int, max_message_mb: int
    ) -> None:
        self._ctx = zmq.Context()
        max_bytes = max_message_mb << 20
        self._control = _socket(self._ctx, zmq.ROUTER, high_water_mark, max_bytes)
        # Sending to an actor that is gone raises instead of silently dropping.
        self._control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._trajectory = _socket(self._ctx, zmq.PULL, high_water_mark, max_bytes)
        try:
            self.control_endpoint = _bind(self._control, host, control_port)
            self.trajectory_endpoint = _bind(self._trajectory, host, trajectory_port)
        except zmq.ZMQError as err:
            self.close()
            raise OSError(f"cannot bind the learner on {host} ({err}); set transport.host / ports") from None
        self._poller = zmq.Poller()
        self._poller.register(self._control, zmq.POLLIN)
        self._poller.register(self._trajectory, zmq.POLLIN)
        self.malformed = 0
        self._bad_log = RateLimitedLog(logger)

    def poll(self, timeout_s: float) -> tuple[list[tuple[str, Message]], list[Message]]:
        """Wait up to ``timeout_s`` for traffic; return everything ready, decoded:
        ``(control messages with their sender's id, trajectory messages)``."""
        ready = dict(self._poller.poll(int(timeout_s * 1000)))
        control: list[tuple[str, Message]] = []
        trajectories: list[Message] = []
        # Drain a bounded number per call so one flooded socket cannot starve the other.
        for _ in range(256 if self._control in ready else 0):
            try:
                frames = self._control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 2:
                self._reject(f"control message with {len(frames)} frames")
                continue
            msg = self._decode(frames[1], "control")
            if msg is not None:
                control.append((frames[0].decode("utf-8", "replace"), msg))
        for _ in range(256 if self._trajectory in ready else 0):
            try:
                data = self._trajectory.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = self._decode(data, "trajectory")
            if msg is not None:
                trajectories.append(msg)
        return control, trajectories

    def _decode(self, data: bytes, channel: str) -> Message | None:
        try:
            return decode(data)
        except SchemaError as err:
            self._reject(f"{channel}: {err}")
            return None

    def _reject(self, why: str) -> None:
        self.malformed += 1
        self._bad_log.warning("dropped malformed message (%d so far): %s", self.malformed, why)

    def send(self, actor_id: str, msg: Message) -> bool:
        """Send to one actor; False if it is not connected (it has gone away)."""
        try:
            self._control.send_multipart([actor_id.encode(), encode(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def close(self) -> None:
        self._control.close()
        self._trajectory.close()
        self._ctx.term()


class ActorClient:
    """An actor's sockets. Not thread-safe: one thread owns it."""

    def __init__(
        self, control_endpoint: str, actor_id: str, *, high_water_mark: int, max_message_mb: int
    ) -> None:
        self.actor_id = actor_id
        self.endpoint = control_endpoint
        self._ctx = zmq.Context()
        max_bytes = max_message_mb << 20
        self._control = _socket(self._ctx, zmq.DEALER, high_water_mark, max_bytes)
        self._control.setsockopt(zmq.ROUTING_ID, actor_id.encode())
        self._control.connect(control_endpoint)
        # The trajectory endpoint comes with the registration reply.
        self._trajectory = _socket(self._ctx, zmq.PUSH, high_water_mark, max_bytes)
        self.malformed = 0
        self._bad_log = RateLimitedLog(logger)

    def send(self, msg: Message) -> None:
        self._control.send(encode(msg), zmq.NOBLOCK)

    def recv(self, timeout_s: float) -> Message | None:
        """The next control message, or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            if not self._control.poll(int(remaining * 1000)):
                return None
            data = self._control.recv()
            try:
                return decode(data)
            except SchemaError as err:
                self.malformed += 1
                self._bad_log.warning("dropped malformed control message: %s", err)
            if time.monotonic() >= deadline:
                return None

    def connect_trajectory(self, endpoint: str) -> None:
        self._trajectory.connect(endpoint)

    def push(self, msg: Message, timeout_s: float) -> bool:
        """Queue a trajectory message; False if the queue stayed full for ``timeout_s``."""
        if not self._trajectory.poll(int(timeout_s * 1000), zmq.POLLOUT):
            return False
        self._trajectory.send(encode(msg), zmq.NOBLOCK)
        return True

    def close(self) -> None:
        self._control.close()
        self._trajectory.close()
        self._ctx.term()
