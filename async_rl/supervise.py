"""Stopping runs: a launcher stops every process it started, and no child outlives it.

A launcher (``async-rl train``, ``launch``, ``bench``) takes SIGINT, SIGTERM and SIGHUP alike
(Ctrl-C, ``kill PID``, ``scancel``, a closed terminal) as a request to stop
(``StopRequests``). The first request starts an orderly stop: the learner finishes the step in
hand, saves a checkpoint and writes accounting.json, actors say bye. Each further request
escalates (``Grace``): the time left shrinks to ``HURRY_S``, then every child still running
gets SIGKILL. Once a stop is under way the handlers only count, never raise, so no sequence
of signals can make the launcher leave before its children.

A child that a launcher started (``PARENT_PID_ENV`` names the launcher's pid) watches its
parent (``ParentWatch``): when the launcher is gone, even by SIGKILL, the child sends itself
SIGTERM, which takes the same orderly path as a stop request.

A signal that is ignored when the handlers are installed stays ignored: under ``nohup`` a
closed terminal does not stop the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A launcher puts its pid here for each child it starts; the child watches that parent.
PARENT_PID_ENV = "ASYNC_RL_PARENT_PID"
# Requests closer together than this are one request delivered twice: GNU timeout sends its
# signal to the command and to the command's process group, which holds the launcher too.
REPEAT_WINDOW_S = 0.5
# After one request beyond the one that began a stop: at most this long before SIGKILL.
HURRY_S = 5.0
# How often a child checks that its parent is still the launcher that started it.
PARENT_POLL_S = 0.5
_POLL_S = 0.05
_REAP_S = 5.0  # after SIGKILL, how long to wait for the kernel to reap a child


class StopRequests:
    """SIGINT, SIGTERM and SIGHUP, counted as stop requests while installed (a context
    manager; in the main thread only, elsewhere it counts nothing).

    ``level`` is the number of requests so far (repeats within ``REPEAT_WINDOW_S`` count
    once). With ``interrupt=True`` the first request also raises ``KeyboardInterrupt``, for a
    launcher whose waits do not poll ``level`` (``async-rl launch``, waiting in Ray calls); inside
    ``polling()`` it never raises. ``forward_to`` runs a callback on each request from a
    thread of its own (a signal handler must not take locks the main thread may hold)."""

    def __init__(self, *, interrupt: bool = False) -> None:
        self.interrupt = interrupt
        self.level = 0
        self.first: signal.Signals | None = None
        self._last_at = -math.inf
        self._previous: dict[signal.Signals, Any] = {}
        # SimpleQueue.put is reentrant: safe to call from a signal handler.
        self._wake: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._forwarder: threading.Thread | None = None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Put the previous handlers back and stop the forwarding thread."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._forwarder is not None:
            self._wake.put(None)
            self._forwarder.join(timeout=5.0)
            self._forwarder = None

    @property
    def requested(self) -> bool:
        return self.level > 0

    @property
    def name(self) -> str:
        """The signal of the first request ("" before any)."""
        return self.first.name if self.first is not None else ""

    @property
    def exit_code(self) -> int:
        """The shell's code for a command ended by the first request's signal (130 for SIGINT)."""
        return 128 + int(self.first) if self.first is not None else 0

    @contextlib.contextmanager
    def polling(self) -> Iterator[None]:
        """No KeyboardInterrupt in this block (a stop in progress polls ``level`` itself)."""
        interrupt, self.interrupt = self.interrupt, False
        try:
            yield
        finally:
            self.interrupt = interrupt

    def forward_to(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` for each request from now on, and at once for one made already."""
        if self._forwarder is None:
            self._forwarder = threading.Thread(
                target=self._forward, args=(callback,), name="stop-forwarder", daemon=True
            )
            self._forwarder.start()
        if self.requested:
            self._wake.put(self.level)

    def _forward(self, callback: Callable[[], None]) -> None:
        while self._wake.get() is not None:
            callback()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes: record, nothing that takes a lock.
        now = time.monotonic()
        if now - self._last_at < REPEAT_WINDOW_S:
            return
        self._last_at = now
        self.level += 1
        if self.first is None:
            self.first = signal.Signals(signum)
        if self._forwarder is not None:
            self._wake.put(self.level)
        if self.interrupt and self.level == 1:
            raise KeyboardInterrupt


class Grace:
    """The time a stop in progress has left: ``grace_s`` from creation; one request more cuts
    it to ``hurry_s`` from that request, two more end it at once. ``say`` reports each step."""

    def __init__(
        self, stop: StopRequests, grace_s: float, say: Callable[[str], None], hurry_s: float = HURRY_S
    ) -> None:
        self.stop = stop
        self.say = say
        self.hurry_s = hurry_s
        self.deadline = time.monotonic() + grace_s
        self._start_level = stop.level
        self._seen = 0

    def left_s(self) -> float:
        extra = self.stop.level - self._start_level
        if extra != self._seen:
            self._seen = extra
            if extra == 1:
                self.deadline = min(self.deadline, time.monotonic() + self.hurry_s)
                self.say(f"stopping faster: {self.hurry_s:g} s at most; signal again to kill now")
        if extra >= 2:
            return 0.0
        return max(0.0, self.deadline - time.monotonic())


def wait_or_kill(
    procs: Mapping[str, subprocess.Popen[bytes]], grace: Grace, say: Callable[[str], None]
) -> None:
    """Wait for ``procs`` (already asked to stop) until they exit or ``grace`` runs out, then
    SIGKILL those still running, by pid, and reap them."""
    while any(p.poll() is None for p in procs.values()) and grace.left_s() > 0:
        time.sleep(_POLL_S)
    late = {name: p for name, p in procs.items() if p.poll() is None}
    if late:
        say("killing " + ", ".join(f"{name} (pid {p.pid})" for name, p in late.items()))
    for proc in late.values():
        proc.kill()
    for name, proc in late.items():
        try:
            proc.wait(timeout=_REAP_S)
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) is still there %.0f s after SIGKILL", name, proc.pid, _REAP_S)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child of this launcher: it watches this process (``ParentWatch``)."""
    return dict(os.environ, **extra, **{PARENT_PID_ENV: str(os.getpid())})


class ParentWatch:
    """In a process a launcher started: when that launcher is gone (this process's parent
    changed), send this process SIGTERM, once. Without ``PARENT_PID_ENV`` it watches nothing.
    The variable is removed from the environment, so that this process's own children (FSDP
    ranks, a Ray instance's workers) do not take it for theirs."""

    def __init__(self, poll_s: float = PARENT_POLL_S) -> None:
        text = os.environ.pop(PARENT_PID_ENV, "")
        self.parent = int(text) if text.isdigit() else None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if self.parent is not None:
            self._thread = threading.Thread(
                target=self._watch, args=(self.parent, poll_s), name="parent-watch", daemon=True
            )
            self._thread.start()

    def __enter__(self) -> ParentWatch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def _watch(self, parent: int, poll_s: float) -> None:
        # Compared with the pid recorded at start, not with 1: an orphan may be re-parented to
        # a subreaper (systemd --user, a container's init) rather than to init.
        while os.getppid() == parent:
            if self._closed.wait(poll_s):
                return
        logger.warning("the launcher (pid %d) is gone; stopping", parent)
        # To the main thread itself: a signal the kernel hands to this thread would not
        # interrupt a blocking call (a sleep, a socket wait) of the main thread.
        main = threading.main_thread().ident
        if main is not None and hasattr(signal, "pthread_kill"):
            signal.pthread_kill(main, signal.SIGTERM)
        else:
            os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def interrupt_on_stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as SIGINT does (for ``async-rl actor``,
    whose clean-up runs on the way out of its main loop). Ignored signals stay ignored."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
