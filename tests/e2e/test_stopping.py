"""Stopping runs as a user, a scheduler or a closed terminal does: ``async-rl train`` gets
SIGTERM, two SIGINTs 50 ms apart (GNU timeout signals the command and its process group),
SIGHUP, or SIGKILL. Each time, every process of the run is gone within 30 s, checked by pid,
and the learner has saved a checkpoint and written an accounting.json that holds. The
learner and actors started on their own stop on SIGTERM and SIGHUP as on SIGINT.

The escalation (a repeated signal stops faster, then kills the children) is in
tests/async_rl/test_supervise.py, with children that ignore the stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from async_rl.metrics import read_metrics
from async_rl.supervise import PARENT_PID_ENV

pytestmark = [pytest.mark.slow, pytest.mark.faults]

_BATCH = 4
_RUN = [
    "trainer.warmup_sft_steps=0",
    "algorithm.dynamic_sampling=false",  # the untrained model is never right: keep every group
    f"trainer.batch_groups={_BATCH}",
    "rollout.group_size=4",
    "rollout.max_new_tokens=16",
    "trainer.eval_every=0",
    "data.eval_size=16",
    "transport.heartbeat_s=0.5",
    "weight_sync.timeout_s=10",
    "trainer.max_steps=100000",  # the test decides when to stop
    "trainer.idle_timeout_s=60",
]
_GONE_WITHIN_S = 30.0
# The command as a terminal starts it: SIGINT and SIGHUP at their defaults, even when this
# test runs in the background of a shell or under nohup (which would leave them ignored).
_AS_FROM_A_TERMINAL = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.signal(signal.SIGHUP, signal.SIG_DFL); runpy.run_module('async_rl.cli', run_name='__main__')"
)


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, ..., start time at index 19), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _tree(root: int) -> dict[int, str]:
    """``root`` and every process below it: pid -> start time (which tells a reused pid apart)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if (fields := _stat(pid)) is not None:
            found[pid] = fields[19]
            todo.extend(children.get(pid, []))
    return found


def _running(tree: dict[int, str]) -> list[int]:
    """The pids of ``tree`` still running (a zombie awaiting its parent counts as gone)."""
    return [
        pid for pid, start in tree.items() if (f := _stat(pid)) is not None and f[19] == start and f[0] != "Z"
    ]


class _Run:
    """One ``async-rl COMMAND`` started by this test, in a session of its own; its training
    steps are read from ``metrics`` (the run directory's metrics.jsonl by default)."""

    def __init__(
        self, run_dir: Path, *args: str, command: str = "train", metrics: Path | None = None
    ) -> None:
        self.run_dir = run_dir
        self.out = run_dir / f"{command}.out"
        self.metrics = metrics or run_dir / "metrics.jsonl"
        env = {k: v for k, v in os.environ.items() if k != PARENT_PID_ENV}
        with self.out.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _AS_FROM_A_TERMINAL, command, f"run_dir={run_dir}", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.tree: dict[int, str] = {}

    def steps(self) -> list[dict[str, Any]]:
        return [r for r in read_metrics(self.metrics) if r["step"] > 0]

    def wait_training(self, steps: int = 2, processes: int = 4, timeout_s: float = 180.0) -> None:
        """Until ``steps`` steps are trained; then record every process of the run (at least
        ``processes``: by default the launcher, the learner and two actors)."""
        deadline = time.monotonic() + timeout_s
        while len(self.steps()) < steps:
            assert self.proc.poll() is None, f"the launcher exited ({self.proc.returncode}):\n{self.output()}"
            assert time.monotonic() < deadline, f"{steps} steps took over {timeout_s:.0f} s:\n{self.output()}"
            time.sleep(0.1)
        self.tree = _tree(self.proc.pid)
        assert len(self.tree) >= processes, self.tree

    def gone_after(self, send: Any) -> float:
        """Seconds from ``send()`` until no process of the run remains (at most 30)."""
        start = time.monotonic()
        send()
        while left := _running(self.tree):
            self.proc.poll()  # reap the launcher, this test's child
            assert time.monotonic() - start < _GONE_WITHIN_S, (
                f"still running after 30 s: {left}\n{self.output()}"
            )
            time.sleep(0.05)
        took_s = time.monotonic() - start
        self.proc.wait(timeout=5)  # a zombie by now: its exit code
        return took_s

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def kill_what_is_left(self) -> None:
        """After a failure: SIGKILL, by pid, whatever of the run is still running."""
        tree = self.tree or (_tree(self.proc.pid) if self.proc.poll() is None else {})
        for pid in _running(tree):
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


@pytest.fixture
def run(tiny_model_dir: Path, tmp_path: Path) -> Iterator[_Run]:
    r = _Run(tmp_path, "rollout.num_actors=2", *_RUN)
    try:
        r.wait_training()
        yield r
    finally:
        r.kill_what_is_left()


def _saved_and_accounted(run_dir: Path) -> dict[str, Any]:
    """The learner stopped cleanly: a checkpoint of its last version and a ledger that holds."""
    ledger = json.loads((run_dir / "accounting.json").read_text())
    ended = ledger["trained"] + ledger["buffered"] + ledger["filtered"] + ledger["reissued"] + ledger["stale"]
    assert ledger["ok"] is True, ledger
    assert ended + ledger["in_flight"] == ledger["granted"], ledger
    assert ledger["accepted"] == ledger["trained"] + ledger["buffered"], ledger
    assert ledger["trained"] == _BATCH * ledger["version"] and ledger["version"] >= 2, ledger
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())
    assert state["version"] == ledger["version"], (state["version"], ledger)
    assert (run_dir / "checkpoints" / latest / "model.safetensors").exists()
    return ledger


def _actors_left_cleanly(run_dir: Path) -> None:
    for name in ("actor-0", "actor-1"):
        out = (run_dir / f"{name}.out").read_text(errors="replace")
        assert f"actor {name} stopping" in out and "Traceback" not in out, out[-2000:]


def test_sigterm_to_the_launcher(run: _Run) -> None:
    took_s = run.gone_after(lambda: os.kill(run.proc.pid, signal.SIGTERM))
    print(f"\nSIGTERM: no process left after {took_s:.1f} s")
    assert run.proc.returncode == 128 + signal.SIGTERM
    out = run.output()
    assert "SIGTERM: stopping processes" in out and "Traceback" not in out, out[-3000:]
    _saved_and_accounted(run.run_dir)
    _actors_left_cleanly(run.run_dir)


def test_two_sigints_50_ms_apart(run: _Run) -> None:
    def twice() -> None:
        os.kill(run.proc.pid, signal.SIGINT)
        time.sleep(0.05)
        os.kill(run.proc.pid, signal.SIGINT)

    took_s = run.gone_after(twice)
    print(f"\ntwo SIGINTs 50 ms apart: no process left after {took_s:.1f} s")
    assert run.proc.returncode == 128 + signal.SIGINT
    out = run.output()
    # The bug this replaces: a second KeyboardInterrupt escaped the stop, and the launcher
    # left with "async-rl train: interrupted" while its children trained on.
    assert "async-rl train: interrupted" not in out and "Traceback" not in out, out[-3000:]
    # Two signals that close together are one request delivered twice: the orderly stop.
    _saved_and_accounted(run.run_dir)


def test_sighup_to_the_launcher(run: _Run) -> None:
    took_s = run.gone_after(lambda: os.kill(run.proc.pid, signal.SIGHUP))
    print(f"\nSIGHUP: no process left after {took_s:.1f} s")
    assert run.proc.returncode == 128 + signal.SIGHUP
    assert "SIGHUP: stopping processes" in run.output()
    _saved_and_accounted(run.run_dir)


def test_sigkill_of_the_launcher(run: _Run) -> None:
    took_s = run.gone_after(lambda: os.kill(run.proc.pid, signal.SIGKILL))
    print(f"\nSIGKILL of the launcher: no process left after {took_s:.1f} s")
    assert run.proc.returncode == -signal.SIGKILL
    # Its children noticed and took the clean way out: the learner saved and wrote the ledger.
    log = (run.run_dir / "learner.log").read_text(errors="replace")
    assert f"the launcher (pid {run.proc.pid}) is gone; stopping" in log
    _saved_and_accounted(run.run_dir)
    _actors_left_cleanly(run.run_dir)


def test_sigterm_to_the_bench_while_a_run_is_up(tiny_model_dir: Path, tmp_path: Path) -> None:
    tiny = ["trainer.warmup_sft_steps=4", "trainer.warmup_sft_batch=4", "bench.capacity_gen_s=1.5"]
    tiny += ["bench.capacity_train_steps=2", "trainer.max_steps=100000", "transport.heartbeat_s=0.5"]
    run = _Run(tmp_path, *tiny, command="bench", metrics=tmp_path / "sync" / "metrics.jsonl")
    try:
        run.wait_training(processes=4)  # the bench, its `async-rl train`, the learner, an actor
        took_s = run.gone_after(lambda: os.kill(run.proc.pid, signal.SIGTERM))
    finally:
        run.kill_what_is_left()
    print(f"\nbench, SIGTERM: no process left after {took_s:.1f} s")
    assert run.proc.returncode == 130  # as Ctrl-C: "async-rl bench: interrupted"
    assert "async-rl bench: interrupted" in run.output()
    assert "SIGTERM: stopping processes" in (tmp_path / "sync" / "train.out").read_text()
    ledger = json.loads((tmp_path / "sync" / "accounting.json").read_text())
    assert ledger["ok"] is True and ledger["version"] >= 2, ledger


def test_a_learner_and_actors_started_on_their_own_stop_on_sigterm_and_sighup(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != PARENT_PID_ENV}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.out").open("wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", _AS_FROM_A_TERMINAL, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        return procs[name]

    def stopped(proc: subprocess.Popen[bytes], sig: signal.Signals) -> int:
        os.kill(proc.pid, sig)
        return proc.wait(timeout=_GONE_WITHIN_S)

    try:
        learner = start("learner", "learner", f"run_dir={tmp_path}", "rollout.num_actors=2", *_RUN)
        endpoints = tmp_path / "endpoints.json"
        deadline = time.monotonic() + 120
        while not endpoints.exists():
            assert learner.poll() is None and time.monotonic() < deadline, "the learner did not come up"
            time.sleep(0.1)
        for name in ("a0", "a1"):
            start(name, "actor", f"learner={endpoints}", f"id={name}", "threads=1")
        while len([r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] > 0]) < 2:
            assert learner.poll() is None and time.monotonic() < deadline + 120, "no training"
            time.sleep(0.1)
        assert stopped(procs["a0"], signal.SIGTERM) == 130  # as Ctrl-C: KeyboardInterrupt
        assert stopped(procs["a1"], signal.SIGHUP) == 130
        for name in ("a0", "a1"):
            out = (tmp_path / f"{name}.out").read_text(errors="replace")
            assert f"actor {name} stopping: interrupted; saying bye" in out and "Traceback" not in out, out
        assert stopped(learner, signal.SIGHUP) == 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    _saved_and_accounted(tmp_path)
