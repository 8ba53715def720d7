"""``async_rl.supervise``: stop requests from signals, the escalating grace, and the parent watch.

The signals go to this test process itself, with ``StopRequests`` installed (each test checks
that first, so a SIGTERM is never left to its default action). The processes are real ones,
started here and ended by pid."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from async_rl import launcher
from async_rl.supervise import (
    PARENT_PID_ENV,
    REPEAT_WINDOW_S,
    Grace,
    StopRequests,
    child_env,
    interrupt_on_stop_signals,
)

_STUBBORN = "import signal, time\nfor s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP): signal.signal(s, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)\n"


@pytest.fixture(autouse=True)
def _default_signal_handlers() -> Any:
    """Each test starts from Python's default handlers. A test run started in the background
    (``cmd &`` in a script, as CI may do) inherits SIGINT ignored, and ``StopRequests`` rightly
    leaves an ignored signal ignored: that would test the environment, not the code."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _signal_self(stop: StopRequests, sig: signal.Signals) -> None:
    assert signal.getsignal(sig) == stop._handle, "StopRequests is not installed"
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # the handler runs in this (the main) thread at the next bytecode


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _stubborn() -> subprocess.Popen[bytes]:
    """A child that ignores SIGINT, SIGTERM and SIGHUP: only SIGKILL ends it."""
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_signals_are_counted_and_a_repeat_within_the_window_counts_once() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stop:
        _signal_self(stop, signal.SIGTERM)
        _signal_self(stop, signal.SIGINT)  # GNU timeout: the command, then its process group
        assert (stop.level, stop.name, stop.exit_code) == (1, "SIGTERM", 143)
        time.sleep(REPEAT_WINDOW_S + 0.1)
        _signal_self(stop, signal.SIGHUP)
        assert stop.level == 2 and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == previous


def test_interrupt_mode_raises_on_the_first_request_only_and_never_while_polling() -> None:
    with StopRequests(interrupt=True) as stop:
        with stop.polling():
            _signal_self(stop, signal.SIGHUP)
        assert stop.level == 1  # counted, not raised
    with StopRequests(interrupt=True) as stop:
        with pytest.raises(KeyboardInterrupt):
            _signal_self(stop, signal.SIGTERM)
        time.sleep(REPEAT_WINDOW_S + 0.1)
        _signal_self(stop, signal.SIGTERM)  # a stop is under way: counted only
        assert stop.level == 2


def test_a_forwarded_request_runs_the_callback_off_the_main_thread() -> None:
    called = threading.Event()
    threads = []

    def callback() -> None:
        threads.append(threading.current_thread())
        called.set()

    with StopRequests() as stop:
        _signal_self(stop, signal.SIGTERM)  # before forward_to: delivered when it is set up
        stop.forward_to(callback)
        assert called.wait(5.0)
    assert threads and threads[0] is not threading.main_thread()


def test_grace_is_cut_by_one_more_request_and_ended_by_two() -> None:
    said: list[str] = []
    stop = StopRequests()  # not installed: the levels are set by hand
    stop.level = 1
    grace = Grace(stop, 100.0, said.append, hurry_s=0.3)
    assert grace.left_s() > 99
    stop.level = 2
    assert 0 < grace.left_s() <= 0.3
    assert said == ["stopping faster: 0.3 s at most; signal again to kill now"]
    stop.level = 3
    assert grace.left_s() == 0.0


def test_repeated_signals_kill_children_that_ignore_the_stop(capsys: pytest.CaptureFixture[str]) -> None:
    procs = {"learner": _stubborn(), "actor-0": _stubborn()}
    try:
        with StopRequests() as stop:
            _signal_self(stop, signal.SIGTERM)

            def twice_more() -> None:  # while the launcher waits for its children
                for _ in range(2):
                    time.sleep(REPEAT_WINDOW_S + 0.2)
                    os.kill(os.getpid(), signal.SIGINT)

            sender = threading.Thread(target=twice_more)
            start = time.monotonic()
            sender.start()
            launcher._stop_all(procs, stop)  # they ignore SIGTERM: only the escalation ends them
            took_s = time.monotonic() - start
            sender.join(timeout=5)
        assert stop.level == 3
        assert all(p.returncode == -signal.SIGKILL for p in procs.values())
        assert took_s < 3.0  # not the 15 s grace, nor the 5 s of one repeat
        out = capsys.readouterr().out
        assert "SIGTERM: stopping processes" in out and "stopping faster" in out
        assert f"killing learner (pid {procs['learner'].pid}), actor-0 (pid {procs['actor-0'].pid})" in out
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


_MIDDLE = """
import subprocess, sys, time
from async_rl.supervise import child_env
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=child_env())
print(child.pid, flush=True)
time.sleep(120)
"""

_GRANDCHILD = """
import os, signal, sys, time
from async_rl.supervise import PARENT_PID_ENV, ParentWatch, interrupt_on_stop_signals
out = sys.argv[1]
with interrupt_on_stop_signals(), ParentWatch(poll_s=0.1) as watch:
    open(out + ".up", "w").write(f"{watch.parent} {PARENT_PID_ENV in os.environ}")
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        open(out, "w").write("stopped cleanly")
"""


def test_a_child_whose_launcher_is_sigkilled_stops_on_its_own(tmp_path: Path) -> None:
    out = tmp_path / "grandchild"
    middle = subprocess.Popen(
        [sys.executable, "-c", _MIDDLE, textwrap.dedent(_GRANDCHILD), str(out)], stdout=subprocess.PIPE
    )
    grandchild = 0
    try:
        assert middle.stdout is not None
        grandchild = int(middle.stdout.readline())
        deadline = time.monotonic() + 60
        while not Path(f"{out}.up").exists():
            assert time.monotonic() < deadline, "the grandchild did not start"
            time.sleep(0.05)
        time.sleep(0.1)  # the file is written before the watch's first look
        # It watches the process that started it, and does not pass the variable on.
        assert Path(f"{out}.up").read_text() == f"{middle.pid} False"
        middle.kill()
        middle.wait(timeout=5)
        killed_at = time.monotonic()
        while _alive(grandchild):
            assert time.monotonic() - killed_at < 10, "the grandchild outlived its parent"
            time.sleep(0.05)
        assert out.read_text() == "stopped cleanly"  # SIGTERM, handled: not killed
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait(timeout=5)
        if grandchild and _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_child_env_names_this_process_and_sigterm_interrupts_as_sigint_does() -> None:
    assert child_env(X="1")[PARENT_PID_ENV] == str(os.getpid())
    previous = signal.getsignal(signal.SIGTERM)
    with interrupt_on_stop_signals():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            assert signal.getsignal(sig) is signal.default_int_handler
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(1.0)
    assert signal.getsignal(signal.SIGTERM) == previous


_COUNTS_SIGTERMS = """
import signal, sys, time
got = []
def count(*_):
    got.append(time.monotonic())
    print(len(got), got[-1], flush=True)
    if len(got) == 3:
        sys.exit(0)
signal.signal(signal.SIGTERM, count)
print("ready", flush=True)
while True:
    time.sleep(0.01)
"""


def test_the_bench_passes_each_further_request_on_to_its_run() -> None:
    from async_rl.bench import runner

    run = subprocess.Popen([sys.executable, "-c", _COUNTS_SIGTERMS], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None and run.stdout.readline() == "ready\n"
        with StopRequests() as stop:
            _signal_self(stop, signal.SIGINT)  # what ended the bench's wait for the run

            def twice_more() -> None:  # as fast as the bench counts them: the window apart
                for _ in range(2):
                    time.sleep(REPEAT_WINDOW_S + 0.05)
                    os.kill(os.getpid(), signal.SIGHUP)

            sender = threading.Thread(target=twice_more)
            sender.start()
            start = time.monotonic()
            runner._stop(run, stop)  # the run escalates its own stop: it needs each of them
            took_s = time.monotonic() - start
            sender.join(timeout=5)
        assert run.returncode == 0 and took_s < 5.0
        times = [float(line.split()[1]) for line in run.stdout.read().splitlines()]
        assert len(times) == 3
        # Spaced so that the run's own repeat window does not take two for one.
        assert min(b - a for a, b in itertools.pairwise(times)) > REPEAT_WINDOW_S
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=5)
