"""ZeroMQ transport: both halves of the learner <-> actor channels in one file.

* control: learner ROUTER (bind) <-> actor DEALER (connect). Requests, replies and
  learner-initiated messages (acks, weight headers, bye). The DEALER's routing id is the
  actor id, so the learner addresses an actor by name.
* trajectories: actor PUSH (connect) -> learner PULL (bind).

Optional CURVE (``transport.curve_keys_dir``, written by ``async-rl keys``): every learner
socket is a CURVE server and a ZAP handler admits only clients whose public key is in the
key directory's ``authorized_clients/``; an actor's sockets are CURVE clients (``keys=DIR``).
A client without an admitted key never completes the handshake: its messages never reach the
learner and the learner's replies never reach it. Off by default (loopback needs no keys).

Queues are bounded (``high_water_mark``), messages above ``max_message_mb`` are dropped by
ZMQ before they reach Python, every receive takes a timeout, and everything received goes
through ``schema.decode``: a malformed message is counted and logged (rate-limited), never
raised into the caller's loop.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

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


# ---------------------------------------------------------------------- CURVE keys

# File names inside a key directory (`async-rl keys out=DIR`). The formats are ZeroMQ's own
# certificate files, so zmq.auth (and czmq tools) read them.
SERVER_PUBLIC = "server.key"
SERVER_SECRET = "server.key_secret"
CLIENT_PUBLIC = "client.key"
CLIENT_SECRET = "client.key_secret"
AUTHORIZED_DIR = "authorized_clients"

_Z85_KEY_LEN = 40  # a 32-byte CURVE key in Z85 text


@dataclass
class ServerKeys:
    """The learner's CURVE keypair and the public keys of the clients it admits (Z85)."""

    public: bytes
    secret: bytes
    authorized: frozenset[bytes]
    authorized_dir: Path


@dataclass
class ClientKeys:
    """An actor's CURVE keypair and the learner's public key (Z85)."""

    public: bytes
    secret: bytes
    server_public: bytes


def _load_key(path: Path, *, secret: bool, fix: str) -> tuple[bytes, bytes | None]:
    """One certificate file; a clear error naming the file and the fix."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        # zmq.auth says "Invalid certificate file" for a missing file: say what is wrong.
        why = "no such file" if not path.exists() else getattr(err, "strerror", None) or str(err)
        raise ValueError(f"CURVE key file {path}: {why}; {fix}") from None
    if len(public) != _Z85_KEY_LEN or (secret and (secret_key is None or len(secret_key) != _Z85_KEY_LEN)):
        kind = "a secret" if secret else "a public"
        raise ValueError(f"CURVE key file {path}: not {kind} CURVE key certificate; {fix}")
    if secret and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("CURVE secret key %s is readable by other users; chmod 600 it", path)
    return public, secret_key


def load_server_keys(keys_dir: str | Path) -> ServerKeys:
    """The learner's half of a key directory: its secret key and the authorized clients."""
    root = Path(keys_dir).expanduser()
    fix = f"create the keys with `async-rl keys out={root}`"
    public, secret = _load_key(root / SERVER_SECRET, secret=True, fix=fix)
    assert secret is not None
    authorized_dir = root / AUTHORIZED_DIR
    authorized = []
    for path in sorted(authorized_dir.glob("*.key")) if authorized_dir.is_dir() else []:
        authorized.append(_load_key(path, secret=False, fix=fix)[0])
    if not authorized:
        raise ValueError(
            f"CURVE: no client public keys (*.key) in {authorized_dir}, so no actor could connect; {fix}"
        )
    return ServerKeys(public, secret, frozenset(authorized), authorized_dir)


def load_client_keys(keys_dir: str | Path) -> ClientKeys:
    """An actor's half of a key directory: its own keypair and the learner's public key."""
    root = Path(keys_dir).expanduser()
    # A fresh `async-rl keys` here would not match the learner's: the keys come from its directory.
    fix = (
        f"copy {SERVER_PUBLIC}, {CLIENT_PUBLIC} and {CLIENT_SECRET} into {root} from the directory "
        "that `async-rl keys out=DIR` wrote for the learner (transport.curve_keys_dir)"
    )
    public, secret = _load_key(root / CLIENT_SECRET, secret=True, fix=fix)
    assert secret is not None
    server_public, _ = _load_key(root / SERVER_PUBLIC, secret=False, fix=fix)
    return ClientKeys(public, secret, server_public)


def _write_cert(path: Path, public: bytes, secret: bytes | None) -> None:
    """A ZeroMQ certificate file, created exclusively: 0600 with a secret key, else 0644."""
    kind = "**Secret** Certificate (keep it private)" if secret else "Public Certificate"
    lines = [f"#   ZeroMQ CURVE {kind}, written by `async-rl keys`", "", "metadata", "curve"]
    lines.append(f'    public-key = "{public.decode()}"')
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    # O_EXCL: never overwrite a key; the mode applies at creation, so a secret is never
    # readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600 if secret else 0o644)  # whatever the umask was


def create_keys(out_dir: str | Path) -> list[Path]:
    """``async-rl keys``: a learner keypair, one client keypair, and the client's public key
    in ``authorized_clients/``. Refuses to overwrite existing keys. Returns the files written."""
    if not zmq.has("curve"):
        raise RuntimeError("this pyzmq's libzmq was built without CURVE; reinstall pyzmq from its wheels")
    root = Path(out_dir)
    existing = [root / n for n in (SERVER_SECRET, SERVER_PUBLIC, CLIENT_SECRET, CLIENT_PUBLIC)]
    existing += [root / AUTHORIZED_DIR / CLIENT_PUBLIC]
    if found := [p for p in existing if p.exists()]:
        raise ValueError(
            f"{found[0]} exists; keys are never overwritten: remove them or choose another out=DIR"
        )
    if not root.exists():
        root.mkdir(parents=True)
        root.chmod(0o700)  # a directory of its own; an existing one (out=.) keeps its mode
    (root / AUTHORIZED_DIR).mkdir(exist_ok=True)
    (root / AUTHORIZED_DIR).chmod(0o700)
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    written = [
        (root / SERVER_SECRET, server_public, server_secret),
        (root / SERVER_PUBLIC, server_public, None),
        (root / CLIENT_SECRET, client_public, client_secret),
        (root / CLIENT_PUBLIC, client_public, None),
        (root / AUTHORIZED_DIR / CLIENT_PUBLIC, client_public, None),
    ]
    for path, public, secret in written:
        _write_cert(path, public, secret)
    return [path for path, _, _ in written]


class _AuthorizedKeys:
    """ZAP credentials provider: admit exactly the loaded public keys, log the others."""

    def __init__(self, authorized: frozenset[bytes], where: Path) -> None:
        self._authorized = authorized
        self._where = where
        self._log = RateLimitedLog(logger)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self._authorized:
            return True
        self._log.warning(
            "refused a CURVE client whose public key %s is not in %s",
            key.decode(errors="replace"),
            self._where,
        )
        return False


# ---------------------------------------------------------------------- sockets


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
        self,
        host: str,
        control_port: int,
        trajectory_port: int,
        *,
        high_water_mark: int,
        max_message_mb: int,
        curve: ServerKeys | None = None,
    ) -> None:
        self._ctx = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        if curve is not None:
            # The ZAP handler must run before the first handshake: start it before binding.
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback("*", _AuthorizedKeys(curve.authorized, curve.authorized_dir))
        max_bytes = max_message_mb << 20
        self._control = _socket(self._ctx, zmq.ROUTER, high_water_mark, max_bytes)
        # Sending to an actor that is gone raises instead of silently dropping.
        self._control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # An actor that reconnects (fresh sockets after a silence, or a restarted process)
        # takes its id over from its old connection, which the learner may not have seen close
        # yet; without this its new connection would be ignored as a duplicate id.
        self._control.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._trajectory = _socket(self._ctx, zmq.PULL, high_water_mark, max_bytes)
        if curve is not None:
            for sock in (self._control, self._trajectory):
                sock.curve_secretkey = curve.secret
                sock.curve_publickey = curve.public
                sock.curve_server = True
            logger.info(
                "CURVE on: admitting %d client key(s) from %s", len(curve.authorized), curve.authorized_dir
            )
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
        if self._auth is not None:
            self._auth.stop()  # joins the ZAP thread; its sockets must go before term()
        self._ctx.term()


class ActorClient:
    """An actor's sockets. Not thread-safe: one thread owns it."""

    def __init__(
        self,
        control_endpoint: str,
        actor_id: str,
        *,
        high_water_mark: int,
        max_message_mb: int,
        curve: ClientKeys | None = None,
    ) -> None:
        self.actor_id = actor_id
        self.endpoint = control_endpoint
        self._ctx = zmq.Context()
        max_bytes = max_message_mb << 20
        self._control = _socket(self._ctx, zmq.DEALER, high_water_mark, max_bytes)
        self._control.setsockopt(zmq.ROUTING_ID, actor_id.encode())
        # The trajectory endpoint comes with the registration reply.
        self._trajectory = _socket(self._ctx, zmq.PUSH, high_water_mark, max_bytes)
        if curve is not None:
            # CURVE options must be set before connect().
            for sock in (self._control, self._trajectory):
                sock.curve_secretkey = curve.secret
                sock.curve_publickey = curve.public
                sock.curve_serverkey = curve.server_public
        self._control.connect(control_endpoint)
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
