"""The actor's round-trip timeout (``transport.request_timeout_s``) against a lossy learner.

A real ``Actor`` (the tiny Hugging Face model in the torch engine, a real ``ActorClient``)
runs in a thread; the test holds the learner's end of both channels as bare ZeroMQ sockets
(a ROUTER and a PULL) and loses one message on purpose: the first lease request, or the
first push of a group. The actor must ask again, or push again, once the timeout passes;
before, it waited for ever (in sync mode an unacknowledged group blocks every request).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from actors.actor import Actor
from async_rl.config import Config, Mode, to_dict
from async_rl.schema import (
    Ack,
    Bye,
    Lease,
    LeaseGrant,
    LeaseRequest,
    Message,
    Registered,
    TrajectoryGroup,
    decode,
    encode,
)
from async_rl.transport import ActorClient

_ACTOR = "a0"
_TIMEOUT_S = 0.5  # transport.request_timeout_s: short, so a retry comes within the test
_PATIENCE_S = 10.0  # how long the test waits for a message the actor should send


@dataclass
class _Learner:
    """The learner's two sockets, bare: whatever the test does not answer is lost."""

    ctx: zmq.Context
    control: zmq.Socket
    trajectory: zmq.Socket
    control_endpoint: str
    trajectory_endpoint: str

    def recv_control(self, kind: type, timeout_s: float = _PATIENCE_S) -> Message | None:
        """The next control message of ``kind`` from the actor (heartbeats and others skipped)."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            if self.control.poll(int(remaining * 1000)):
                _, data = self.control.recv_multipart()
                msg = decode(data)
                if isinstance(msg, kind):
                    return msg
        return None

    def recv_group(self, timeout_s: float = _PATIENCE_S) -> TrajectoryGroup | None:
        if not self.trajectory.poll(int(timeout_s * 1000)):
            return None
        msg = decode(self.trajectory.recv())
        assert isinstance(msg, TrajectoryGroup)
        return msg

    def send(self, msg: Message) -> None:
        self.control.send_multipart([_ACTOR.encode(), encode(msg)])


@pytest.fixture
def learner() -> Iterator[_Learner]:
    ctx = zmq.Context()
    control, trajectory = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PULL)
    for sock in (control, trajectory):
        sock.setsockopt(zmq.LINGER, 0)
    control_port = control.bind_to_random_port("tcp://127.0.0.1")
    trajectory_port = trajectory.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield _Learner(
            ctx,
            control,
            trajectory,
            f"tcp://127.0.0.1:{control_port}",
            f"tcp://127.0.0.1:{trajectory_port}",
        )
    finally:
        control.close()
        trajectory.close()
        ctx.term()


def _run_actor(learner: _Learner, model_dir: Path, mode: Mode) -> Iterator[Actor]:
    """An actor generating in a thread (it already holds the model's weights, as after its
    first sync); told Bye and joined at the end."""
    cfg = Config(mode=mode)
    cfg.transport.request_timeout_s = _TIMEOUT_S
    cfg.rollout.group_size = 2
    cfg.rollout.max_num_seqs = 2  # one lease per request in sync mode
    client = ActorClient(learner.control_endpoint, _ACTOR, high_water_mark=100, max_message_mb=8)
    client.connect_trajectory(learner.trajectory_endpoint)
    registered = Registered(_ACTOR, 0, to_dict(cfg), str(model_dir), learner.trajectory_endpoint)
    actor = Actor(client, registered, device="cpu", store_timeout_s=5.0)
    actor.has_weights = True
    thread = threading.Thread(target=actor.run, name="actor", daemon=True)
    thread.start()
    try:
        yield actor
    finally:
        learner.send(Bye("learner", "test over"))
        thread.join(timeout=_PATIENCE_S)
        assert not thread.is_alive(), "the actor did not stop on Bye"
        actor.close()
        client.close()


@pytest.fixture
def async_actor(learner: _Learner, tiny_model_dir: Path) -> Iterator[Actor]:
    yield from _run_actor(learner, tiny_model_dir, Mode.ASYNC)


@pytest.fixture
def sync_actor(learner: _Learner, tiny_model_dir: Path) -> Iterator[Actor]:
    yield from _run_actor(learner, tiny_model_dir, Mode.SYNC)


def test_a_lost_lease_request_is_asked_again_after_request_timeout_s(
    learner: _Learner, async_actor: Actor
) -> None:
    first = learner.recv_control(LeaseRequest)
    assert first is not None, "the actor never asked for leases"
    sent = time.monotonic()
    # Neither a grant nor a Wait: the request (or its answer) is lost. The actor asks again
    # once transport.request_timeout_s has passed, not before.
    again = learner.recv_control(LeaseRequest)
    assert again is not None, "the actor never asked again after a lost lease request"
    assert time.monotonic() - sent >= _TIMEOUT_S * 0.9
    # Answered this time: the actor generates the lease and pushes its group.
    learner.send(LeaseGrant([Lease(7, 1, 0, "1+1=", "2")]))
    group = learner.recv_group()
    assert group is not None and group.lease_id == 7


def test_an_unacknowledged_group_is_pushed_again_and_sync_mode_goes_on(
    learner: _Learner, sync_actor: Actor
) -> None:
    assert learner.recv_control(LeaseRequest) is not None
    learner.send(LeaseGrant([Lease(7, 1, 0, "1+1=", "2")]))
    first = learner.recv_group()
    assert first is not None and first.lease_id == 7
    pushed = time.monotonic()
    # The group is lost (no Ack): in sync mode the actor asks for nothing while it waits...
    assert learner.recv_control(LeaseRequest, timeout_s=_TIMEOUT_S * 0.5) is None
    # ...and pushes it again once transport.request_timeout_s has passed.
    again = learner.recv_group()
    assert again is not None, "the actor never pushed its unacknowledged group again"
    assert again.lease_id == 7 and time.monotonic() - pushed >= _TIMEOUT_S * 0.9
    assert again.responses[0].token_ids.tolist() == first.responses[0].token_ids.tolist()
    # Acknowledged: the outbox empties and the next sync-mode wave begins.
    learner.send(Ack([7]))
    assert learner.recv_control(LeaseRequest) is not None, "sync mode stalled after the Ack"
