"""Fault injection with real processes on loopback: the learner killed and resumed, an actor
restarted under the same id, the learner frozen until every actor takes it for gone, and a
flood of malformed messages. After each, training goes on and every lease is accounted for:
granted = trained + buffered + filtered + re-issued + stale + in flight, no prompt draw is
trained twice, and duplicates are dropped, never trained.

The SIGKILL of an actor mid-rollout and the SIGSTOP of an actor during weight sync are in
test_fleet.py (marked ``faults`` there too)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import zmq

# The fleet helpers (pytest puts this directory on sys.path: tests/ has no packages).
from test_fleet import _SMALL, _check_ledger, _finish, _Fleet

from async_rl.config import Config
from async_rl.coordinator import Coordinator
from async_rl.data import Prompt, PromptSource
from async_rl.schema import (
    SCHEMA_VERSION,
    Ack,
    FinishReason,
    Heartbeat,
    Lease,
    LeaseGrant,
    LeaseRequest,
    Register,
    Registered,
    Response,
    TrajectoryGroup,
    decode,
    encode,
)
from async_rl.transport import Endpoints, LearnerServer, RateLimitedLog
from learners.service import Service

pytestmark = [pytest.mark.slow, pytest.mark.faults]

_REPO = Path(__file__).resolve().parents[2]
_BATCH = 4  # trainer.batch_groups of _SMALL
_LEARNER_TIMEOUT_S = 3.0
_FAULTS = [*_SMALL, f"transport.learner_timeout_s={_LEARNER_TIMEOUT_S}"]


def _trained_once(rows: list[dict], ledger: dict[str, Any]) -> None:
    """The training history ``rows`` (one per step, in order) trains every lease and every
    prompt draw at most once, batch_groups per step, and agrees with the ledger."""
    assert [r["version"] for r in rows] == list(range(1, len(rows) + 1))
    leases = [lease for r in rows for lease in r["rollout/trained_leases"]]
    seqs = [seq for r in rows for seq in r["rollout/trained_seqs"]]
    assert len(leases) == len(set(leases)) == _BATCH * len(rows)
    assert len(seqs) == len(set(seqs)) == _BATCH * len(rows)
    assert ledger["trained"] == _BATCH * len(rows)


def _trained(rows: list[dict], incarnation: int) -> list[dict]:
    """The training steps of one learner incarnation (not its line before RL)."""
    return [r for r in rows if r["learner/incarnation"] == incarnation and "rollout/trained_leases" in r]


def _resent(run_dir: Path, names: tuple[str, ...]) -> int:
    """Groups the actors re-sent after reconnecting, as their logs report."""
    pattern = re.compile(r"re-sent (\d+) unacknowledged groups")
    return sum(int(n) for name in names for n in pattern.findall(_log_of(run_dir, name)))


def _log_of(run_dir: Path, name: str) -> str:
    path = run_dir / f"{name}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def test_sigkill_the_learner_then_resume_and_the_actors_reconnect(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    fleet = _Fleet(tmp_path)
    args = [f"run_dir={tmp_path}", "rollout.num_actors=2", "trainer.checkpoint_every=3", *_FAULTS]
    try:
        first = fleet.start("learner", "learner", *args)
        fleet.wait("endpoints.json", (tmp_path / "endpoints.json").exists)
        endpoints = Endpoints.load(tmp_path / "endpoints.json")
        actors = [fleet.start_actor("a0"), fleet.start_actor("a1")]
        # Past the checkpoint of v3 and one step more: the kill loses trained work.
        fleet.wait("a step past the v3 checkpoint", lambda: len(fleet.steps()) >= 4, timeout_s=120)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        before = fleet.steps()
        latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
        saved = json.loads((tmp_path / "checkpoints" / latest / "state.json").read_text())
        v = saved["version"]
        assert v >= 3 and v % 3 == 0 and len(before) > v
        # The same run directory, the same command plus learner.resume: the actors, still
        # running, find it on their own.
        (tmp_path / "learner.out").rename(tmp_path / "learner-killed.out")
        fleet.start("learner", "learner", *args, "learner.resume=true")
        fleet.wait(
            "4 steps after the resume",
            lambda: len(_trained(fleet.steps(), incarnation=1)) >= 4,
            timeout_s=150,
        )
        assert all(a.poll() is None for a in actors), "an actor exited instead of reconnecting"
        rows = _finish(fleet)
    finally:
        fleet.stop_all()
    log = fleet.log()
    again = Endpoints.load(tmp_path / "endpoints.json")
    assert (again.control, again.trajectory) == (endpoints.control, endpoints.trajectory)  # same ports
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{v}'} at v{v} (learner incarnation 1)" in log
    for name in ("a0", "a1"):
        out = _log_of(tmp_path, name)
        assert "learner lost: nothing from" in out and "reconnecting" in out, out[-2000:]
        assert log.count(f"actor {name} registered") >= 2
    # History: the killed learner's steps up to the checkpoint, then the resumed learner's.
    restart_line = [r for r in rows if r["learner/incarnation"] == 1 and "rollout/trained_leases" not in r]
    assert [(r["step"], r["version"]) for r in restart_line] == [(v, v)]  # its line before RL
    resumed = _trained(rows, incarnation=1)
    assert resumed[0]["version"] == v + 1
    kept = [r for r in _trained(rows, incarnation=0) if r["version"] <= v]
    ledger = _check_ledger(tmp_path)
    _trained_once(kept + resumed, ledger)
    # Lease ids of the resumed learner come from its own range; a prompt draw in flight or
    # buffered at the checkpoint is trained at most once, whichever copy arrives first.
    assert all(lease >= 1 << 32 for r in resumed for lease in r["rollout/trained_leases"])
    open_at_checkpoint = [
        row[0] for row in saved["coordinator"]["in_flight"] + saved["coordinator"]["buffered"]
    ]
    assert ledger["reissued"] >= saved["coordinator"]["counts"]["reissued"] + len(open_at_checkpoint)
    # None of them is lost: leased again first, each is trained by the resumed learner.
    assert set(open_at_checkpoint) <= {seq for r in resumed for seq in r["rollout/trained_seqs"]}
    assert ledger["incarnation"] == 1 and ledger["version"] == resumed[-1]["version"]
    # What the actors re-sent was made for the killed learner: dropped as unknown, never trained.
    # (They kept generating until they noticed the silence, so there is always something.)
    resent = _resent(tmp_path, ("a0", "a1"))
    assert resent >= 1 and ledger["unknown"] >= resent


def test_resume_without_a_checkpoint_is_one_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "async_rl.cli", "learner", f"run_dir={tmp_path}", "learner.resume=true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert f"learner.resume=true but {tmp_path / 'checkpoints'} holds no checkpoint" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_actor_restarted_under_the_same_id_gets_its_leases_reissued(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    fleet = _Fleet(tmp_path)
    try:
        fleet.start("learner", "learner", f"run_dir={tmp_path}", "rollout.num_actors=2", *_FAULTS)
        fleet.wait("endpoints.json", (tmp_path / "endpoints.json").exists)
        fleet.start_actor("a0")
        victim = fleet.start_actor("a1")
        fleet.wait("3 steps with 2 actors", lambda: len(fleet.steps()) >= 3)
        fleet.wait(
            "a1 holding a lease",
            lambda: fleet.steps()[-1]["leases/in_flight_by_actor"].get("a1", 0) >= 1,
            poll_s=0.01,
        )
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        restarted_at = len(fleet.steps())
        # Back at once under the same id, long before any deadline could evict the old one:
        # the learner sees a new incarnation of a1 register and re-issues what the old held.
        (tmp_path / "a1.out").rename(tmp_path / "a1-killed.out")
        fleet.start_actor("a1")
        fleet.wait(
            "groups from the restarted a1",
            lambda: any(
                "a1" in r.get("rollout/groups_by_actor", {}) for r in fleet.steps()[restarted_at + 1 :]
            ),
            timeout_s=120,
        )
        rows = _finish(fleet)
    finally:
        fleet.stop_all()
    log = fleet.log()
    assert log.count("actor a1 registered") >= 2
    ledger = _check_ledger(tmp_path)
    _trained_once(rows, ledger)
    assert ledger["reissued"] >= 1  # what the killed a1 was generating went back to the pool
    assert ledger["duplicates"] == 0


def test_a_frozen_learner_loses_its_actors_and_they_come_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    # SIGSTOP the learner past transport.learner_timeout_s: every actor's connection looks
    # dead, so each drops its sockets, reconnects, registers again with the same learner and
    # re-sends its unacknowledged groups. Whatever it re-sends is dropped, not trained twice.
    fleet = _Fleet(tmp_path)
    try:
        learner = fleet.start("learner", "learner", f"run_dir={tmp_path}", "rollout.num_actors=2", *_FAULTS)
        fleet.wait("endpoints.json", (tmp_path / "endpoints.json").exists)
        fleet.start_actor("a0")
        fleet.start_actor("a1")
        fleet.wait("3 steps with 2 actors", lambda: len(fleet.steps()) >= 3)
        os.kill(learner.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while not all("reconnecting" in _log_of(tmp_path, a) for a in ("a0", "a1")):
                assert time.monotonic() < deadline, "the actors did not notice the frozen learner"
                time.sleep(0.2)
        finally:
            os.kill(learner.pid, signal.SIGCONT)
        thawed_at = len(fleet.steps())
        fleet.wait("4 steps after the thaw", lambda: len(fleet.steps()) >= thawed_at + 4, timeout_s=120)
        rows = _finish(fleet)
    finally:
        fleet.stop_all()
    ledger = _check_ledger(tmp_path)
    _trained_once(rows, ledger)
    log = fleet.log()
    for name in ("a0", "a1"):
        assert log.count(f"actor {name} registered") >= 2
    # The leases the actors held were re-issued when they registered again, so what they
    # re-sent was dropped (as a duplicate, or as late), never trained twice.
    assert ledger["reissued"] >= 1
    resent = _resent(tmp_path, ("a0", "a1"))  # they kept generating while the learner was frozen
    assert resent >= 1 and ledger["duplicates_dropped"] >= resent


def _fuzz_module() -> Any:
    """benchmarks/fuzz_learner.py: its message mutators (not a package, so loaded by path)."""
    spec = importlib.util.spec_from_file_location("fuzz_learner", _REPO / "benchmarks" / "fuzz_learner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_a_flood_of_malformed_messages_does_not_stop_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    fuzz = _fuzz_module()
    fleet = _Fleet(tmp_path)
    ctx = zmq.Context()
    rng = random.Random(0)
    seeds = fuzz._seeds()
    sent = {"control": 0, "trajectory": 0}
    malformed = 0
    try:
        fleet.start("learner", "learner", f"run_dir={tmp_path}", "rollout.num_actors=1", *_FAULTS)
        fleet.wait("endpoints.json", (tmp_path / "endpoints.json").exists)
        fleet.start_actor("a0")
        fleet.wait("2 steps", lambda: len(fleet.steps()) >= 2)
        endpoints = Endpoints.load(tmp_path / "endpoints.json")
        flooded_at = len(fleet.steps())
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, b"flood")
        push = ctx.socket(zmq.PUSH)
        for sock in (dealer, push):
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDTIMEO, 30_000)  # a full queue blocks the sender: nothing is lost
        dealer.connect(endpoints.control)
        push.connect(endpoints.trajectory)
        try:
            for _ in range(1000):
                for port, sock in (("control", dealer), ("trajectory", push)):
                    _, data = fuzz.hostile(rng, seeds[port], 1 << 20)
                    sock.send(data)
                    sent[port] += 1
                    malformed += fuzz.is_malformed(data)
        finally:
            dealer.close()
            push.close()
        fleet.wait("3 steps after the flood", lambda: len(fleet.steps()) >= flooded_at + 3, timeout_s=120)
        rows = _finish(fleet)
    finally:
        ctx.term()
        fleet.stop_all()
    ledger = _check_ledger(tmp_path)
    _trained_once(rows, ledger)
    # Every message that does not decode was counted. The rest decode: control messages of an
    # unauthenticated peer (the protocol has no authentication without CURVE), and groups that
    # fail validation or whose lease is not live. None of them was trained (checked above).
    assert malformed > 500
    assert rows[-1]["transport/malformed"] >= malformed


# ---------------------------------------------------------------------- the service alone


class _ServiceOnly(Service):
    """The learner's service thread without a model or trainer: a real LearnerServer and
    Coordinator. Only the vocabulary size is stood in for (check_group reads nothing else)."""

    def __init__(self, server: LearnerServer, coordinator: Coordinator) -> None:
        self.cfg = Config()
        self.cfg.rollout.group_size = 2
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=64))
        self.model_path = "unused"
        self.version = 0
        self.coordinator = coordinator
        self.server = server
        self.endpoints = Endpoints(server.control_endpoint, server.trajectory_endpoint, "127.0.0.1", 0)
        self.filter_groups = False
        self.actors, self.registered, self.members = {}, set(), []
        self.membership_dirty = False
        self.sync_pending, self.sync_reports = {}, []
        self.buffer, self.outgoing = queue.Queue(), queue.Queue()
        self.gen_tokens = self.rejected = 0
        self._bad_input = RateLimitedLog(logging.getLogger(__name__))
        self._closing = threading.Event()


@pytest.fixture
def service() -> Iterator[_ServiceOnly]:
    server = LearnerServer("127.0.0.1", 0, 0, high_water_mark=100, max_message_mb=8)
    prompts = [Prompt(i, f"q{i}", str(i)) for i in range(20)]
    coordinator = Coordinator(
        PromptSource(prompts, seed=0), batch_groups=2, max_staleness=0, lease_timeout_s=60.0
    )
    try:
        yield _ServiceOnly(server, coordinator)
    finally:
        server.close()


def _group_for(lease: Lease, token: int) -> TrajectoryGroup:
    r = Response(
        token_ids=np.array([5, token], dtype=np.int32),
        logprobs=np.array([-0.5, -1.0], dtype=np.float32),
        versions=np.array([0, 0], dtype=np.int32),
        reward=1.0,
        finish_reason=FinishReason.STOP,
    )
    return TrajectoryGroup(lease.lease_id, lease.prompt_id, "a0", np.array([1, 2], dtype=np.int32), [r, r])


def test_a_group_failing_validation_ends_its_lease_and_is_acknowledged(service: _ServiceOnly) -> None:
    ctx = zmq.Context()
    dealer, push = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUSH)
    dealer.setsockopt(zmq.ROUTING_ID, b"a0")
    for sock in (dealer, push):
        sock.setsockopt(zmq.LINGER, 0)
    dealer.connect(service.server.control_endpoint)
    push.connect(service.server.trajectory_endpoint)
    thread = threading.Thread(target=service._serve, name="service", daemon=True)
    thread.start()

    def answer(kind: type) -> Any:
        deadline = time.monotonic() + 10.0
        while dealer.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            msg = decode(dealer.recv())
            if isinstance(msg, kind) and msg != Ack([]):  # an empty Ack answers a heartbeat
                return msg
        raise AssertionError(f"no {kind.__name__} from the learner's service")

    try:
        dealer.send(encode(Register("a0", SCHEMA_VERSION, os.getpid(), "host")))
        answer(Registered)
        dealer.send(encode(Heartbeat("a0", 0, 0)))  # engine loaded: a0 joins the fleet
        dealer.send(encode(LeaseRequest("a0", 2, 0)))
        leases = answer(LeaseGrant).leases
        assert len(leases) == 2  # (0 + 0 + 1) * 2: admission is full
        bad = leases[0]
        push.send(encode(_group_for(bad, token=10_000)))  # out of the 64-token vocabulary
        assert answer(Ack) == Ack([bad.lease_id])  # the actor may drop it from its outbox
        dealer.send(encode(Heartbeat("a0", 0, 1)))  # heartbeats no longer keep it open...
        push.send(encode(_group_for(leases[1], token=7)))
        assert answer(Ack) == Ack([leases[1].lease_id])
        # ...its slot is free and its prompt is leased again, same draw, new id.
        dealer.send(encode(LeaseRequest("a0", 2, 0)))
        (again,) = answer(LeaseGrant).leases
        assert (again.seq, again.prompt_id) == (bad.seq, bad.prompt_id) and again.lease_id != bad.lease_id
    finally:
        service._closing.set()
        thread.join(timeout=10.0)
        dealer.close()
        push.close()
        ctx.term()
    assert not thread.is_alive()
    ledger = service.coordinator.accounting()
    assert (ledger["rejected"], ledger["reissued"], ledger["accepted"], ledger["in_flight"]) == (1, 1, 1, 1)
    assert ledger["granted"] == 3 and ledger["ok"] and service.rejected == 1


def test_a_lease_grant_that_cannot_be_sent_is_reissued_at_once(service: _ServiceOnly) -> None:
    # "gone" is in the fleet but no longer connected (or reconnecting): ROUTER_MANDATORY
    # refuses the send, so no actor holds the leases and they go back to the pool.
    service.actors["gone"] = time.monotonic()
    service._on_control("gone", LeaseRequest("gone", 2, 0))
    service._on_control("gone", Heartbeat("gone", 0, 0))  # its heartbeats would have renewed them
    ledger = service.coordinator.accounting()
    assert (ledger["granted"], ledger["unsent"], ledger["reissued"], ledger["in_flight"]) == (2, 2, 2, 0)
    assert ledger["ok"]
    again = service.coordinator.grant("a1", 2)
    assert [lease.seq for lease in again] == [0, 1]
