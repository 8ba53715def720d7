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

Every lease ends exactly once: accepted, filtered, or re-issued (expired, its actor left,
its grant could not be sent, or its group failed validation: its prompt is leased again
under a new lease id with the same ``seq``, so it is sampled the same way again). An
accepted group is then either trained or, if it outlived the staleness bound, re-queued
(``stale``). At any moment

    granted == trained + buffered + filtered + reissued + stale + in_flight

where ``buffered`` counts accepted groups not trained yet (``accounting`` checks it). A
group for a lease that is not live (already ended, expired, or granted by an earlier
learner incarnation) is dropped and counted in ``duplicates_dropped``, never trained.

Lease ids are unique across learner restarts: each incarnation grants ids from its own
range (``first_lease_id``), so a group an actor generated for the crashed learner can never
be mistaken for a lease of its successor.
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

# Why ``Coordinator.reissue`` ended a live lease early; each is a counter (part of reissued).
_REISSUE_CAUSES = ("rejected", "unsent")


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    FILTERED = "filtered"
    DUPLICATE = "duplicate"  # this lease already ended (a resend after reconnect)
    LATE = "late"  # the lease expired and its prompt was re-issued; this copy is dropped
    UNKNOWN = "unknown"  # never granted by this coordinator (e.g. by the learner before a restart)


@dataclass
class _Active:
    lease: Lease
    actor_id: str
    deadline: float
    # The version admission counted from (the older of the learner's and the actor's engine's):
    # every token of the group is sampled by it or a later one.
    granted_at: int = 0


class Coordinator:
    def __init__(
        self,
        source: PromptSource,
        *,
        batch_groups: int,
        max_staleness: int,
        lease_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        first_lease_id: int = 0,
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
        self._buffered: dict[int, Lease] = {}  # accepted, not trained yet (nor re-queued as stale)
        self._next_lease_id = first_lease_id
        self.version = 0  # the policy version all actors hold
        # Cumulative since the start of the run (restored across learner restarts).
        # accepted = trained + buffered; duplicates_dropped = duplicates + late + unknown;
        # rejected and unsent leases (see reissue) are counted in reissued as well.
        self.counts = {
            "granted": 0,
            "accepted": 0,
            "trained": 0,
            "filtered": 0,
            "reissued": 0,
            "stale": 0,
            "duplicates": 0,
            "late": 0,
            "unknown": 0,
            "duplicates_dropped": 0,
            "rejected": 0,
            "unsent": 0,
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
            granted_at = self.version if engine_version is None else min(self.version, engine_version)
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
                self._active[lease.lease_id] = _Active(lease, actor_id, deadline, granted_at)
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
                    dropped = Outcome.LATE
                elif ended is None:
                    dropped = Outcome.UNKNOWN
                else:
                    dropped = Outcome.DUPLICATE
                self.counts[{Outcome.DUPLICATE: "duplicates"}.get(dropped, dropped.value)] += 1
                self.counts["duplicates_dropped"] += 1
                return dropped
            active = self._active.pop(lease_id)
            outcome = Outcome.ACCEPTED if accepted else Outcome.FILTERED
            self._ended[lease_id] = outcome
            self.counts[outcome.value] += 1
            if accepted:
                self._buffered[lease_id] = active.lease
            return outcome

    def trained(self, lease_ids: list[int]) -> None:
        """The accepted groups of ``lease_ids`` were trained (one optimizer step)."""
        with self._lock:
            for lease_id in lease_ids:
                if self._buffered.pop(lease_id, None) is None:
                    raise RuntimeError(
                        f"lease {lease_id} trained but it was not an accepted, untrained group"
                    )
            self.counts["trained"] += len(lease_ids)

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

    def granted_at(self, lease_id: int) -> int | None:
        """The version admission granted the active lease ``lease_id`` under (None if not active)."""
        with self._lock:
            active = self._active.get(lease_id)
            return active.granted_at if active else None

    def in_flight_granted_at(self) -> list[int]:
        """The grant version of every lease in flight (see ``learners/batching.py``)."""
        with self._lock:
            return [a.granted_at for a in self._active.values()]

    def requeue_stale(self, lease: Lease) -> None:
        """An accepted group of ``lease`` would be trained beyond max_staleness (a long
        response outlived newer leases): it is not trained, and its prompt is leased again.
        It no longer counts as accepted, so admission makes room for the replacement."""
        with self._lock:
            self._buffered.pop(lease.lease_id, None)
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

    def reissue(self, lease_ids: list[int], *, cause: str) -> int:
        """End the live leases among ``lease_ids`` now and lease their prompts again; they
        count as ``reissued`` and as ``cause``: ``unsent`` (the learner could not send their
        grant, so no actor has them) or ``rejected`` (their group failed validation). Without
        this they would stay open for good: heartbeats renew every lease of their actor.
        Returns how many ended (leases no longer live are skipped)."""
        if cause not in _REISSUE_CAUSES:
            raise ValueError(f"cause={cause!r}: one of {', '.join(_REISSUE_CAUSES)}")
        with self._lock:
            ids = [i for i in lease_ids if i in self._active]
            for lease_id in ids:
                self._end_expired_locked(lease_id)
            self.counts[cause] += len(ids)
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

    @property
    def buffered(self) -> int:
        """Accepted groups not trained yet (in the learner's buffer or batch in hand)."""
        return len(self._buffered)

    def accounting(self) -> dict[str, Any]:
        """The exactly-once ledger: every granted lease is trained, buffered, filtered,
        re-issued, re-queued as stale, or still in flight. ``ok`` says whether that holds."""
        with self._lock:
            c = dict(self.counts)
            in_flight, buffered = len(self._active), len(self._buffered)
        ended = c["trained"] + buffered + c["filtered"] + c["reissued"] + c["stale"]
        return c | {
            "in_flight": in_flight,
            "buffered": buffered,
            "accounted": ended + in_flight,
            "ok": ended + in_flight == c["granted"] and c["accepted"] == c["trained"] + buffered,
        }

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state. The leases in flight and the accepted groups not trained yet
        are saved as prompts: a restored coordinator re-issues them (the groups themselves
        are not saved, and the weights they would have trained are those of the checkpoint)."""
        with self._lock:
            return {
                "source": self._source.state_dict(),
                "next_lease_id": self._next_lease_id,
                "version": self.version,
                "counts": dict(self.counts),
                "reissue": [[s, p.prompt_id, p.question, p.answer] for s, p in self._reissue],
                "in_flight": [_row(a.lease) for a in self._active.values()],
                "buffered": [_row(lease) for lease in self._buffered.values()],
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint. Leases keep ids from this coordinator's own range (the larger
        of the saved next id and ``first_lease_id``). The saved in-flight and buffered leases
        end as re-issued: their prompts are leased again, in draw order, before new draws."""
        with self._lock:
            self._source.load_state_dict(state["source"])
            self._next_lease_id = max(int(state["next_lease_id"]), self._next_lease_id)
            self.version = int(state["version"])
            self.counts.update(state["counts"])
            self._active.clear()
            self._buffered.clear()
            self._ended.clear()
            in_flight, buffered = state.get("in_flight", []), state.get("buffered", [])
            rows = sorted([*in_flight, *buffered], key=lambda row: int(row[0]))
            self._reissue = deque((int(s), Prompt(int(pid), q, a)) for s, pid, q, a in state["reissue"])
            self._reissue.extend((int(s), Prompt(int(pid), q, a)) for s, pid, q, a in rows)
            self.counts["reissued"] += len(rows)
            self.counts["accepted"] -= len(buffered)


def _row(lease: Lease) -> list[Any]:
    return [lease.seq, lease.prompt_id, lease.question, lease.answer]
