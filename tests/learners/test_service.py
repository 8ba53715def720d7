"""learners/service.py: a failure inside the service thread stops the learner with the cause,
instead of leaving the main thread to wait for groups that can never arrive."""

from __future__ import annotations

import threading

from learners.service import Service


class _BrokenServer:
    """A server whose poll fails the way a handler bug would."""

    def poll(self, timeout_s: float) -> tuple[list, list]:
        raise KeyError("a bug in a message handler")


class _ServiceOnly(Service):
    def __init__(self) -> None:
        self.server = _BrokenServer()  # type: ignore[assignment]
        self._closing = threading.Event()
        self.stop = threading.Event()


def test_a_failing_service_thread_records_its_error_and_stops_the_learner() -> None:
    service = _ServiceOnly()
    thread = threading.Thread(target=service._serve, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert service.stop.is_set()
    assert isinstance(service.service_error, KeyError)
    assert "a bug in a message handler" in str(service.service_error)
