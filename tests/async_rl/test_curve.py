"""CURVE on the learner's channels: real sockets on loopback, real keys from `async-rl keys`.

Each negative test is paired with the same traffic from an admitted client, so "nothing
arrived" cannot pass because nothing could ever arrive.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from async_rl.cli import main
from async_rl.schema import (
    SCHEMA_VERSION,
    FinishReason,
    Message,
    Register,
    Registered,
    Response,
    TrajectoryGroup,
    encode,
)
from async_rl.transport import (
    ActorClient,
    ClientKeys,
    LearnerServer,
    load_client_keys,
    load_server_keys,
)

# How long a refused client is given to get anything through. The admitted client's round
# trip in the same test takes milliseconds, so this is generous.
_REFUSED_WAIT_S = 1.5


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("curve") / "keys"
    assert main(["keys", f"out={out}"]) == 0
    return out


@pytest.fixture
def server(keys_dir: Path) -> Iterator[LearnerServer]:
    srv = LearnerServer(
        "127.0.0.1", 0, 0, high_water_mark=100, max_message_mb=1, curve=load_server_keys(keys_dir)
    )
    try:
        yield srv
    finally:
        srv.close()


def _group(actor_id: str, lease_id: int) -> TrajectoryGroup:
    r = Response(
        np.array([3, 4], np.int32),
        np.array([-0.5, -1.0], np.float32),
        np.array([0, 0], np.int32),
        1.0,
        FinishReason.STOP,
    )
    return TrajectoryGroup(lease_id, 8, actor_id, np.array([1, 2, 3], np.int32), [r, r])


def _client(server: LearnerServer, actor_id: str, curve: ClientKeys | None) -> ActorClient:
    client = ActorClient(
        server.control_endpoint, actor_id, high_water_mark=100, max_message_mb=1, curve=curve
    )
    client.connect_trajectory(server.trajectory_endpoint)
    return client


def _collect(server: LearnerServer, wait_s: float) -> tuple[list[tuple[str, Message]], list[Message]]:
    control: list[tuple[str, Message]] = []
    trajectories: list[Message] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        c, t = server.poll(0.05)
        control += c
        trajectories += t
    return control, trajectories


def _register_and_push(server: LearnerServer, client: ActorClient, lease_id: int) -> None:
    """The admitted path: Register gets a reply, a pushed group arrives."""
    register = Register(client.actor_id, SCHEMA_VERSION, 1, "host")
    client.send(register)
    assert client.push(_group(client.actor_id, lease_id), timeout_s=5.0)
    control: list[tuple[str, Message]] = []
    trajectories: list[Message] = []
    deadline = time.monotonic() + 10.0
    while (not control or not trajectories) and time.monotonic() < deadline:
        c, t = server.poll(0.05)
        control += c
        trajectories += t
    assert control == [(client.actor_id, register)]
    assert [encode(m) for m in trajectories] == [encode(_group(client.actor_id, lease_id))]
    reply = Registered(client.actor_id, 0, {}, "model", server.trajectory_endpoint)
    assert server.send(client.actor_id, reply)
    assert client.recv(timeout_s=5.0) == reply


def _assert_refused(server: LearnerServer, client: ActorClient) -> None:
    """Nothing the client sends arrives, and the learner cannot reach it either."""
    client.send(Register(client.actor_id, SCHEMA_VERSION, 1, "host"))
    # PUSH queues locally while its connection is pending, so push() itself succeeds.
    client.push(_group(client.actor_id, 99), timeout_s=1.0)
    assert _collect(server, _REFUSED_WAIT_S) == ([], [])
    # No handshake, no route: the ROUTER does not know this actor id.
    assert not server.send(client.actor_id, Registered(client.actor_id, 0, {}, "model", ""))
    assert client.recv(timeout_s=0.2) is None


def test_client_with_the_keys_registers_and_its_group_arrives(server: LearnerServer, keys_dir: Path) -> None:
    client = _client(server, "actor-keyed", load_client_keys(keys_dir))
    try:
        _register_and_push(server, client, lease_id=7)
    finally:
        client.close()


def test_client_without_keys_gets_nothing_through(server: LearnerServer, keys_dir: Path) -> None:
    plain = _client(server, "actor-plain", None)
    try:
        _assert_refused(server, plain)
    finally:
        plain.close()
    # The refused client did not wedge the learner: an admitted one still gets through.
    keyed = _client(server, "actor-keyed", load_client_keys(keys_dir))
    try:
        _register_and_push(server, keyed, lease_id=8)
    finally:
        keyed.close()


def test_client_with_an_unauthorized_keypair_gets_nothing_through(
    server: LearnerServer, keys_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Valid CURVE, the right server key, but a public key the learner was never given.
    public, secret = zmq.curve_keypair()
    stranger = ClientKeys(public, secret, load_client_keys(keys_dir).server_public)
    client = _client(server, "actor-stranger", stranger)
    try:
        _assert_refused(server, client)
    finally:
        client.close()
    assert any(public.decode() in r.getMessage() for r in caplog.records if r.name == "async_rl.transport")
    keyed = _client(server, "actor-keyed", load_client_keys(keys_dir))
    try:
        _register_and_push(server, keyed, lease_id=9)
    finally:
        keyed.close()


def test_keys_command_writes_private_secrets_that_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert main(["keys", f"out={out}"]) == 0
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *sorted(out.rglob("*"))]}
    assert modes == {
        ".": 0o700,
        "authorized_clients": 0o700,
        "authorized_clients/client.key": 0o644,
        "client.key": 0o644,
        "client.key_secret": 0o600,
        "server.key": 0o644,
        "server.key_secret": 0o600,
    }
    server, client = load_server_keys(out), load_client_keys(out)
    assert server.authorized == {client.public}
    assert client.server_public == server.public
    assert server.public != client.public and server.secret != client.secret
    # The secrets are the secrets of these public keys (CURVE derives one from the other).
    assert zmq.curve_public(server.secret) == server.public
    assert zmq.curve_public(client.secret) == client.public
    # Public files carry no secret.
    for name in ("server.key", "client.key", "authorized_clients/client.key"):
        assert "secret-key" not in (out / name).read_text()
    # Running it again never overwrites a key.
    before = (out / "server.key_secret").read_bytes()
    assert main(["keys", f"out={out}"]) == 1
    assert "never overwritten" in capsys.readouterr().err
    assert (out / "server.key_secret").read_bytes() == before


def test_missing_key_file_names_the_file_and_the_fix(tmp_path: Path, keys_dir: Path) -> None:
    # An actor must not make new keys (they would not match the learner's): it is told to copy.
    with pytest.raises(
        ValueError,
        match=rf"{tmp_path}/client\.key_secret: no such file; copy server\.key, client\.key and "
        r"client\.key_secret into .* from the directory that `async-rl keys out=DIR` wrote",
    ):
        load_client_keys(tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"{tmp_path}/server\.key_secret: no such file; create the keys with `async-rl keys out={tmp_path}`",
    ):
        load_server_keys(tmp_path)
    # A public certificate where a secret one belongs.
    (tmp_path / "server.key_secret").write_text((keys_dir / "server.key").read_text())
    with pytest.raises(ValueError, match=r"server\.key_secret: not a secret CURVE key certificate"):
        load_server_keys(tmp_path)
    (tmp_path / "server.key_secret").unlink()
    (tmp_path / "server.key_secret").write_text((keys_dir / "server.key_secret").read_text())
    with pytest.raises(ValueError, match=r"no client public keys \(\*\.key\) in .*authorized_clients"):
        load_server_keys(tmp_path)


def test_actor_command_reports_a_missing_key_dir_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("async_rl.cli.setup_logging", lambda *_: None)  # leave pytest's logging be
    code = main(["actor", "learner=127.0.0.1:1", f"keys={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("async-rl actor: error: CURVE key file ") and "async-rl keys" in err
    assert "\n" not in err
