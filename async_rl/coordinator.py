"""Prompt leases and admission control (lives in the learner process; no I/O here).

Admission (as in AReaL): a lease is granted only while

    accepted + in_flight < (v + max_staleness + 1) * batch_groups

where ``v`` is the policy version every actor holds (the last one broadcast), ``accepted``
counts groups that passed the dynamic-sampling filter since the start, and ``in_flight``
counts outstanding leases. The learner trains accepted groups in order, ``batch_groups``
per step, so accepted group ``i`` is trained by step ``i // batch_groups``; the bound
makes that step at most ``max_staleness`` versions newer than every token of the group.
Filtered groups free their slot without counting as accepted, so the coordinator leases
more prompts to make up for them (dynamic sampling inside the staleness budget).

Every lease ends exactly once: accepted, filtered, or expired (its prompt is re-issued
under a new lease id with the same ``seq``, so it is sampled the same way again).
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from async_rl.data import Prompt, PromptSource
from async_rl.schema import Lease


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    FILTERED = "filtered"
    DUPLICATE = "duplicate"  # this lease already ended (a resend after reconnect)
    LATE = "late"  # the lease expired and its prompt was re-issued; this copy is dropped
    UNKNOWN = "unknown"  # never granted by this coordinator


@dataclass
class _Active:
    lease: Lease
    actor_id: str
    deadline: float


class Coordinator:
    def __init__(
        self,
        source: PromptSource,
        *,
        batch_groups: int,
        max_staleness: int,
        lease_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._batch_groups = batch_groups
        self._max_staleness = max_staleness
        self._lease_timeout_s = lease_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._active: dict[int, _Active] = {}
        self._ended: dict[int, Outcome] = {}  # lease id -> how it ended (for duplicates)
        self._reissue: deque[tuple[int, Prompt]] = deque()  # (seq, prompt) of expired leases
        self._next_lease_id = 0
        self.version = 0  # the policy version all actors hold
        self.counts = {
            "granted": 0,
            "accepted": 0,
            "filtered": 0,
            "reissued": 0,
            "duplicates": 0,
            "late": 0,
            "stale": 0,
        }

    # ------------------------------------------------------------------ admission

    def capacity(self, engine_version: int | None = None) -> int:
        """How many more leases admission control allows right now, for an actor whose
        engine holds ``engine_version`` (None: the current version). A lease admitted under
        version ``c`` is trained by step ``c + max_staleness``; its tokens are sampled by the
        engine's version or a later one, so counting from the older of the two keeps every
        trained group within the bound."""
        version = self.version if engine_version is None else min(self.version, engine_version)
        limit = (version + self._max_staleness + 1) * self._batch_groups
        return max(0, limit - self.counts["accepted"] - len(self._active))

    def grant(self, actor_id: str, n: int, engine_version: int | None = None) -> list[Lease]:
        """Up to ``n`` leases for ``actor_id``; empty when admission control says wait."""
        with self._lock:
            self._expire_locked()
            take = min(n, self.capacity(engine_version))
            draws: list[tuple[int, Prompt]] = []
            while self._reissue and len(draws) < take:
                draws.append(self._reissue.popleft())
            if len(draws) < take:
                draws.extend(self._source.take(take - len(draws)))
            leases = []
            deadline = self._clock() + self._lease_timeout_s
            for seq, prompt in draws:
                lease = Lease(self._next_lease_id, prompt.prompt_id, seq, prompt.question, prompt.answer)
                self._next_lease_id += 1
                self._active[lease.lease_id] = _Active(lease, actor_id, deadline)
                leases.append(lease)
            self.counts["granted"] += len(leases)
            return leases

    # ------------------------------------------------------------------ completion

    def finish(self, lease_id: int, *, accepted: bool) -> Outcome:
        """Record that the group of ``lease_id`` arrived and whether it passed the filter."""
        with self._lock:
            if lease_id not in self._active:
                ended = self._ended.get(lease_id)
                if ended is Outcome.LATE:
                    self.counts["late"] += 1
                    return Outcome.LATE
                if ended is None:
                    return Outcome.UNKNOWN
                self.counts["duplicates"] += 1
                return Outcome.DUPLICATE
            del self._active[lease_id]
            outcome = Outcome.ACCEPTED if accepted else Outcome.FILTERED
            self._ended[lease_id] = outcome
            self.counts[outcome.value] += 1
            return outcome

    def lease_sequence(self, lease_id: int) -> int | None:
        """The data-cursor position of an active lease (None if not active)."""
        with self._lock:
            active = self._active.get(lease_id)
            return active.lease.seq if active else None

    def lease_of(self, lease_id: int) -> Lease | None:
        """The active lease ``lease_id`` (None if not active)."""
        with self._lock:
            active = self._active.get(lease_id)
            return active.lease if active else None

    def requeue_stale(self, lease: Lease) -> None:
        """An accepted group of ``lease`` would be trained beyond max_staleness (a long
        response outlived newer leases): it is not trained, and its prompt is leased again.
        It no longer counts as accepted, so admission makes room for the replacement."""
        with self._lock:
            self.counts["accepted"] -= 1
            self.counts["stale"] += 1
            self._reissue.append((lease.seq, Prompt(lease.prompt_id, lease.question, lease.answer)))

    def renew(self, actor_id: str) -> None:
        """An actor is alive (heartbeat): push its leases' deadlines out."""
        with self._lock:
            deadline = self._clock() + self._lease_timeout_s
            for active in self._active.values():
                if active.actor_id == actor_id:
                    active.deadline = deadline

    def release(self, actor_id: str) -> int:
        """An actor left: re-issue all of its leases now. Returns how many."""
        with self._lock:
            ids = [i for i, a in self._active.items() if a.actor_id == actor_id]
            for lease_id in ids:
                self._end_expired_locked(lease_id)
            return len(ids)

    def expire(self) -> int:
        with self._lock:
            return self._expire_locked()

    def _expire_locked(self) -> int:
        now = self._clock()
        ids = [i for i, a in self._active.items() if a.deadline <= now]
        for lease_id in ids:
            self._end_expired_locked(lease_id)
        return len(ids)

    def _end_expired_locked(self, lease_id: int) -> None:
        active = self._active.pop(lease_id)
        self._ended[lease_id] = Outcome.LATE
        lease = active.lease
        self._reissue.append((lease.seq, Prompt(lease.prompt_id, lease.question, lease.answer)))
        self.counts["reissued"] += 1

    def set_version(self, version: int) -> None:
        with self._lock:
            self.version = version

    # ------------------------------------------------------------------ introspection

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def in_flight_by_actor(self) -> dict[str, int]:
        with self._lock:
            return dict(collections.Counter(a.actor_id for a in self._active.values()))

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state. Leases in flight are saved as prompts to re-issue."""
        with self._lock:
            pending = [(s, p) for s, p in self._reissue] + [
                (a.lease.seq, Prompt(a.lease.prompt_id, a.lease.question, a.lease.answer))
                for a in self._active.values()
            ]
            return {
                "source": self._source.state_dict(),
                "next_lease_id": self._next_lease_id,
                "version": self.version,
                "counts": dict(self.counts),
                "reissue": [[s, p.prompt_id, p.question, p.answer] for s, p in pending],
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._source.load_state_dict(state["source"])
            self._next_lease_id = int(state["next_lease_id"])
            self.version = int(state["version"])
            self.counts.update(state["counts"])
            self._active.clear()
            self._reissue = deque((int(s), Prompt(int(pid), q, a)) for s, pid, q, a in state["reissue"])
