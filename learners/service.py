"""The learner's service thread: the one thread that touches its ZeroMQ sockets.

It answers registrations, heartbeats and lease requests (admission control in
``Coordinator``), records weight-sync reports, validates arriving groups, applies the dynamic
sampling filter, acknowledges, and buffers accepted groups in arrival order for the main
thread. Messages the main thread sends (weight headers, joins, byes) arrive through the
``outgoing`` queue, which this thread drains.

``Service`` is a part of ``learners.learner.Learner`` (a mixin), kept in its own module
because it is the learner's other thread: the state the two threads share is declared below
and set up by ``Learner.__init__``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from async_rl.config import Config, to_dict
from async_rl.coordinator import Coordinator, Outcome
from async_rl.schema import (
    SCHEMA_VERSION,
    Ack,
    Bye,
    Heartbeat,
    Lease,
    LeaseGrant,
    LeaseRequest,
    Message,
    Register,
    Registered,
    Rejected,
    SchemaError,
    SyncDone,
    TrajectoryGroup,
    Wait,
    check_group,
)
from async_rl.transport import Endpoints, LearnerServer, RateLimitedLog

logger = logging.getLogger(__name__)

# How long an actor told to wait should wait before asking again: short, so a freed
# slot is refilled within a few decode steps.
_RETRY_AFTER_S = 0.02


@dataclass
class Accepted:
    lease: Lease
    group: TrajectoryGroup

    @property
    def seq(self) -> int:
        return self.lease.seq


class Service:
    """The service thread's handlers (see the module doc)."""

    cfg: Config
    model: Any
    model_path: str
    version: int
    coordinator: Coordinator
    server: LearnerServer
    endpoints: Endpoints
    filter_groups: bool  # dynamic sampling's zero-variance filter is on
    actors: dict[str, float]  # in the fleet: actor id -> last heard from (monotonic)
    registered: set[str]  # registered, engine still loading (no heartbeat yet)
    members: list[str]  # of the current weight-sync epoch
    membership_dirty: bool  # an actor (re-)registered: re-form the group at the next sync
    sync_pending: dict[str, tuple[int, float]]  # member -> (version, sent at), not reported done
    sync_reports: list[SyncDone]  # since the last metrics line
    buffer: queue.Queue[Accepted]  # accepted groups, for the main thread
    outgoing: queue.Queue[tuple[str, Message]]  # (actor id, message) from the main thread
    gen_tokens: int  # generated tokens received, filtered groups included
    rejected: int  # malformed or unexpected messages
    _bad_input: RateLimitedLog
    _closing: threading.Event  # set by close(): the service thread exits
    stop: threading.Event  # set to make the main thread finish the step in hand and save
    service_error: BaseException | None = None  # why the service thread died, if it did

    def _serve(self) -> None:
        try:
            self._serve_forever()
        except BaseException as err:
            # Without this the thread would die silently and the main thread would wait for
            # groups until trainer.idle_timeout_s, blaming the actors.
            logger.exception("the learner's service thread failed; stopping the learner")
            self.service_error = err
            self.stop.set()

    def _serve_forever(self) -> None:
        next_expire = 0.0
        # Runs until close(), not until stop: a stopping main thread may still be finishing a
        # weight sync whose header this thread must deliver.
        while not self._closing.is_set():
            control, trajectories = self.server.poll(0.01)
            for actor_id, msg in control:
                self._on_control(actor_id, msg)
            for msg in trajectories:
                self._on_trajectory(msg)
            while True:
                try:
                    actor_id, out = self.outgoing.get_nowait()
                except queue.Empty:
                    break
                self.server.send(actor_id, out)
            if time.monotonic() >= next_expire:
                if n := self.coordinator.expire():
                    logger.warning("%d leases expired (rollout.lease_timeout_s); re-issued", n)
                next_expire = time.monotonic() + 1.0

    def _on_control(self, actor_id: str, msg: Message) -> None:
        match msg:
            case Register():
                if msg.schema_version != SCHEMA_VERSION:
                    self.server.send(
                        actor_id,
                        Rejected(
                            f"the actor speaks wire schema {msg.schema_version}, the learner "
                            f"{SCHEMA_VERSION}: run the same async-rl version on both"
                        ),
                    )
                    return
                if self.actors.pop(actor_id, None) is not None or actor_id in self.members:
                    # A new incarnation (restarted, or back after eviction): whatever the old
                    # one held is re-issued, and it must join the group afresh.
                    self.coordinator.release(actor_id)
                    self.membership_dirty = True
                # It joins the fleet with its first heartbeat, once its engine is loaded, so a
                # slow start never counts against the weight-sync deadline.
                self.registered.add(actor_id)
                logger.info("actor %s registered (pid %d on %s)", actor_id[:64], msg.pid, msg.hostname[:64])
                self.server.send(
                    actor_id,
                    Registered(
                        actor_id, self.version, to_dict(self.cfg), self.model_path, self.endpoints.trajectory
                    ),
                )
            case LeaseRequest(n=n) if actor_id in self.actors:
                self.actors[actor_id] = time.monotonic()
                leases = self.coordinator.grant(actor_id, n, msg.engine_version)
                reply: Message = LeaseGrant(leases) if leases else Wait(_RETRY_AFTER_S, "admission control")
                if not self.server.send(actor_id, reply) and leases:
                    # The actor is briefly unknown (reconnecting) or its queue is full: it never
                    # sees these leases, and its heartbeats would renew them for good. End them
                    # now; the actor asks again after transport.request_timeout_s.
                    n = self.coordinator.reissue([lease.lease_id for lease in leases], cause="unsent")
                    logger.warning("could not send %d leases to %s; re-issued", n, actor_id[:64])
            case Heartbeat():
                if actor_id in self.registered:
                    self.registered.discard(actor_id)
                    self.actors[actor_id] = time.monotonic()
                    logger.info("actor %s is ready (%d in the fleet)", actor_id[:64], len(self.actors))
                elif actor_id not in self.actors:
                    return  # an evicted actor that has not heard its Bye yet
                self.actors[actor_id] = time.monotonic()
                self.coordinator.renew(actor_id)
                # The answer (an empty Ack) tells the actor the learner is alive; one that hears
                # nothing for transport.learner_timeout_s reconnects and registers again.
                self.server.send(actor_id, Ack([]))
            case SyncDone() if actor_id in self.actors:
                self.actors[actor_id] = time.monotonic()
                pending = self.sync_pending.get(actor_id)
                if pending is not None and msg.version >= pending[0]:
                    self.sync_pending.pop(actor_id, None)
                self.sync_reports.append(msg)
            case Bye():
                self.registered.discard(actor_id)
                self.actors.pop(actor_id, None)
                if n := self.coordinator.release(actor_id):
                    logger.info("actor %s left; %d of its leases re-issued", actor_id, n)
            case _:
                self.rejected += 1
                self._bad_input.warning(
                    "unexpected %s from %r (%d rejected so far)",
                    type(msg).__name__,
                    actor_id[:64],
                    self.rejected,
                )

    def _on_trajectory(self, msg: Message) -> None:
        if not isinstance(msg, TrajectoryGroup):
            self.rejected += 1
            self._bad_input.warning(
                "unexpected %s on the trajectory channel (%d rejected so far)",
                type(msg).__name__,
                self.rejected,
            )
            return
        if self.coordinator.lease_of(msg.lease_id) is None:
            # Not a live lease: a resend of a group already received, a group whose lease expired
            # and was re-issued, or one made for a learner before a restart (its versions may
            # name weights that no longer exist, so it is not even checked). Dropped and counted;
            # acknowledged so that the actor stops sending it.
            outcome = self.coordinator.finish(msg.lease_id, accepted=False)
            logger.debug("dropped group for lease %d from %s: %s", msg.lease_id, msg.actor_id[:64], outcome)
            self.server.send(msg.actor_id, Ack([msg.lease_id]))
            return
        try:
            check_group(
                msg,
                vocab_size=self.model.config.vocab_size,
                max_version=self.version,
                group_size=self.cfg.rollout.group_size,
                max_response_tokens=self.cfg.rollout.max_new_tokens,
            )
        except SchemaError as err:
            self.rejected += 1
            self._bad_input.warning(
                "rejected group for lease %d from %s: %s (%d rejected so far)",
                msg.lease_id,
                msg.actor_id[:64],
                err,
                self.rejected,
            )
            # End the lease (its prompt is leased again) and acknowledge, so the actor drops the
            # group from its outbox: otherwise heartbeats keep the lease, and its admission
            # slot, for good, and the actor re-sends a group that will never pass.
            self.coordinator.reissue([msg.lease_id], cause="rejected")
            self.server.send(msg.actor_id, Ack([msg.lease_id]))
            return
        rewards = [r.reward for r in msg.responses]
        # Dynamic sampling: a group whose rewards are all equal has zero advantage everywhere.
        informative = not self.filter_groups or max(rewards) > min(rewards)
        lease = self.coordinator.lease_of(msg.lease_id)
        outcome = self.coordinator.finish(msg.lease_id, accepted=informative)
        if outcome in (Outcome.ACCEPTED, Outcome.FILTERED):
            self.gen_tokens += sum(r.length for r in msg.responses)
        if outcome is Outcome.ACCEPTED:
            assert lease is not None
            self.buffer.put(Accepted(lease, msg))
        self.server.send(msg.actor_id, Ack([msg.lease_id]))
