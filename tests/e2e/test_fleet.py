"""Independent fleets: a learner and actors started by separate commands; actors that die,
hang, come back and join late. The learner keeps stepping, no lease is lost or trained twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from async_rl.metrics import read_metrics

pytestmark = pytest.mark.slow

_TIMEOUT_S = 4.0  # weight_sync.timeout_s of these runs
_SMALL = [
    "trainer.warmup_sft_steps=0",
    "algorithm.dynamic_sampling=false",  # the untrained model is never right: keep every group
    "trainer.batch_groups=4",
    "rollout.group_size=8",
    "trainer.eval_every=0",
    "data.eval_size=16",
    # Long responses (the untrained model rarely stops an answer) and one prompt at a time per
    # actor make generation the bottleneck: an actor is nearly always in the middle of a lease.
    "rollout.max_new_tokens=128",
    "rollout.max_num_seqs=8",
    "rollout.max_staleness=1",
    "transport.heartbeat_s=0.5",
    f"weight_sync.timeout_s={_TIMEOUT_S}",
    "trainer.max_steps=100000",  # the test decides when to stop
    "trainer.idle_timeout_s=60",
]


class _Fleet:
    """Processes started by one test, each by its own command, ended by pid."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.run_dir / f"{name}.out").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "async_rl.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_actor(self, name: str) -> subprocess.Popen[bytes]:
        endpoints = self.run_dir / "endpoints.json"
        return self.start(name, "actor", f"learner={endpoints}", f"id={name}", "threads=1")

    def steps(self) -> list[dict]:
        return [r for r in read_metrics(self.run_dir / "metrics.jsonl") if r["step"] > 0]

    def log(self) -> str:
        path = self.run_dir / "learner.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(
        self, what: str, condition: Callable[[], bool], timeout_s: float = 90.0, poll_s: float = 0.05
    ) -> float:
        deadline = time.monotonic() + timeout_s
        while not condition():
            learner = self.procs["learner"]
            if learner.poll() is not None:
                pytest.fail(
                    f"the learner exited ({learner.returncode}) waiting for {what}:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.log()[-3000:]}")
            time.sleep(poll_s)
        return time.monotonic()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def fleet(tiny_model_dir: Path, tmp_path: Path) -> Iterator[_Fleet]:
    f = _Fleet(tmp_path)
    try:
        f.start("learner", "learner", f"run_dir={tmp_path}", "rollout.num_actors=2", *_SMALL)
        f.wait("endpoints.json", (tmp_path / "endpoints.json").exists)
        yield f
    finally:
        f.stop_all()


def _finish(fleet: _Fleet) -> list[dict]:
    """Stop the learner like Ctrl-C would; it saves and says bye. Returns the step rows."""
    learner = fleet.procs["learner"]
    learner.send_signal(signal.SIGTERM)
    assert learner.wait(timeout=60) == 0, fleet.log()[-3000:]
    return fleet.steps()


def _check_accounting(rows: list[dict]) -> None:
    # Versions advance one per step, nothing skipped.
    assert [r["version"] for r in rows] == list(range(1, len(rows) + 1))
    # No lease is trained twice, and every trained group is within the staleness bound.
    leases = [lease for r in rows for lease in r["rollout/trained_leases"]]
    assert len(leases) == len(set(leases)) == 4 * len(rows)
    assert max(s for r in rows for s in r["rollout/trained_staleness"]) <= 1
    # Every granted lease ended exactly once (accepted, filtered, re-issued, or too stale to
    # train and leased again) or is in flight: nothing lost.
    last = rows[-1]
    ended = last["leases/accepted"] + last["leases/filtered"] + last["leases/reissued"] + last["leases/stale"]
    assert ended + last["leases/in_flight"] == last["leases/granted"]
    assert last["leases/duplicates"] == 0


def _check_ledger(run_dir: Path) -> dict[str, Any]:
    """accounting.json, written by the stopping learner, states the exactly-once invariant."""
    ledger = json.loads((run_dir / "accounting.json").read_text())
    ended = ledger["trained"] + ledger["buffered"] + ledger["filtered"] + ledger["reissued"] + ledger["stale"]
    assert ledger["ok"] is True, ledger
    assert ended + ledger["in_flight"] == ledger["granted"], ledger
    assert ledger["accepted"] == ledger["trained"] + ledger["buffered"], ledger
    drops = ledger["duplicates"] + ledger["late"] + ledger["unknown"]
    assert ledger["duplicates_dropped"] == drops, ledger
    assert ledger["trained"] == 4 * ledger["version"]  # trainer.batch_groups per step
    return ledger


@pytest.mark.faults
def test_sigkill_an_actor_then_a_third_joins(fleet: _Fleet) -> None:
    fleet.start_actor("a0")
    victim = fleet.start_actor("a1")
    fleet.wait("5 steps with 2 actors", lambda: len(fleet.steps()) >= 5)
    # Kill it mid-generation: right after the learner reported it holding a lease (a lease
    # takes 128 decode steps, far longer than the gap between the report and the kill).
    fleet.wait(
        "a1 holding a lease",
        lambda: fleet.steps()[-1]["leases/in_flight_by_actor"].get("a1", 0) >= 1,
        poll_s=0.01,
    )
    os.kill(victim.pid, signal.SIGKILL)
    killed_at_step = len(fleet.steps())
    fleet.wait("the eviction of a1", lambda: "evicted actor a1" in fleet.log())
    # The learner keeps stepping on the survivor.
    fleet.wait("5 more steps", lambda: len(fleet.steps()) >= killed_at_step + 5)
    joined_at_step = len(fleet.steps())
    fleet.start_actor("a2")
    fleet.wait(
        "groups from a2",
        lambda: any("a2" in r.get("rollout/groups_by_actor", {}) for r in fleet.steps()[joined_at_step:]),
    )
    rows = _finish(fleet)
    _check_accounting(rows)
    _check_ledger(fleet.run_dir)
    # The lease a1 was generating when it died went back to the pool.
    match = re.search(r"evicted actor a1: .*; (\d+) leases re-issued", fleet.log())
    assert match is not None and int(match.group(1)) >= 1
    assert rows[-1]["leases/reissued"] >= int(match.group(1))
    assert all("a1" not in r["rollout/groups_by_actor"] for r in rows[killed_at_step + 1 :])
    # a2 generated only with learner weights: its groups are within the staleness bound of
    # the steps that trained them, checked above for every group; and it joined a new epoch.
    assert rows[-1]["fleet/actors"] == 2
    assert rows[-1]["fleet/epoch"] >= 2


@pytest.mark.faults
def test_sigstop_during_sync_is_evicted_and_comes_back(fleet: _Fleet) -> None:
    fleet.start_actor("a0")
    sleeper = fleet.start_actor("a1")
    fleet.wait("5 steps with 2 actors", lambda: len(fleet.steps()) >= 5)
    os.kill(sleeper.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    stopped_at_step = len(fleet.steps())
    evicted_at = fleet.wait("the eviction of a1", lambda: "evicted actor a1" in fleet.log(), timeout_s=60)
    assert evicted_at - stopped_at <= _TIMEOUT_S + 5
    fleet.wait("steps after the eviction", lambda: len(fleet.steps()) >= stopped_at_step + 5)
    os.kill(sleeper.pid, signal.SIGCONT)
    fleet.wait("a1 registering again", lambda: fleet.log().count("actor a1 registered") >= 2)
    fleet.wait(
        "groups from the returned a1",
        lambda: any(
            "a1" in r.get("rollout/groups_by_actor", {}) for r in fleet.steps()[stopped_at_step + 5 :]
        ),
    )
    rows = _finish(fleet)
    _check_accounting(rows)
    _check_ledger(fleet.run_dir)
    assert rows[-1]["fleet/evicted"] >= 1
