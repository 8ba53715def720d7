"""A generator actor: leases prompts, runs G episodes each (one response, or turns with an
environment, `actors.episodes`), scores them, streams them.

The actor never trains. Between any two decode steps it services its control channel:
new leases join the engine at once (continuous batching), acknowledgements clear the
outbox, and a weight header makes it receive the new weights and continue every
in-flight sequence with them (each token keeps the version that sampled it).

In sync mode (max_staleness 0) it asks for leases only when the engine is empty and every
group it sent has been acknowledged: generation waits while the learner trains, and
each batch is one deterministic wave.

Nothing waits for an answer for ever: a lease request unanswered for
``transport.request_timeout_s`` is sent again, and so is a group unacknowledged that long.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any

import numpy as np
import torch

from actors.engine import make_engine
from actors.episodes import LeaseEpisodes
from actors.torch_engine import Sample
from actors.weight_receiver import WeightReceiver
from async_rl.config import Config, from_dict
from async_rl.env import make_env
from async_rl.rewards import math_reward
from async_rl.schema import (
    EVICTED,
    SCHEMA_VERSION,
    Ack,
    Bye,
    FinishReason,
    Heartbeat,
    JoinGroup,
    Lease,
    LeaseGrant,
    LeaseRequest,
    Register,
    Registered,
    Rejected,
    Response,
    SyncDone,
    TrajectoryGroup,
    Wait,
    WeightHeader,
)
from async_rl.text import load_tokenizer, render_prompt, response_text, stop_token_ids, strip_stop
from async_rl.transport import ActorClient, Endpoints, load_client_keys

logger = logging.getLogger(__name__)

# Actor.run's reason when the learner stopped answering: reconnect rather than exit.
LEARNER_LOST = "learner lost"


class Actor:
    def __init__(
        self, client: ActorClient, registered: Registered, *, device: str, store_timeout_s: float
    ) -> None:
        self.client = client
        self.actor_id = client.actor_id
        self.cfg: Config = from_dict(registered.config)
        self.device = device
        self.tokenizer = load_tokenizer(registered.model_path)
        self.stop_ids = frozenset(stop_token_ids(registered.model_path, self.tokenizer))
        self.env = make_env(self.cfg.env)
        self.engine = make_engine(
            self.cfg,
            registered.model_path,
            device=device,
            stop_token_ids=sorted(self.stop_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            decode=lambda ids: response_text(self.tokenizer, ids),
        )
        self.receiver = WeightReceiver(
            self.engine.parameters(),
            device=device,
            timeout_s=store_timeout_s,
            rebind=getattr(self.engine, "weights_rebindable", False),
        )
        self.has_weights = False
        self.pending: dict[int, LeaseEpisodes] = {}
        self.outbox: dict[int, TrajectoryGroup] = {}
        self.pushed_at: dict[int, float] = {}  # outbox lease id -> last push (monotonic)
        self.request_out = False
        self.request_sent_at = 0.0  # monotonic; the request is retried after request_timeout_s
        self.next_request_at = 0.0
        self.next_heartbeat_at = 0.0
        self.stopping = ""
        self.groups_sent = 0
        self.sync = self.cfg.rollout.max_staleness == 0
        self.last_heard = time.monotonic()  # anything from the learner (it answers heartbeats)

    # ------------------------------------------------------------------ main loop

    def run(self) -> str:
        """Generate until the learner says bye. Returns the reason."""
        while not self.stopping:
            busy = self.engine.has_work()
            self._handle_control(timeout_s=0.0 if busy else 0.05)
            self._check_learner()
            self._maybe_swap_weights()
            self._maybe_heartbeat()
            self._maybe_repush()
            if self.stopping or not self.has_weights:
                continue
            self._maybe_request_leases()
            if self.engine.has_work():
                for sample in self.engine.step():
                    self._collect(sample)
        return self.stopping

    # ------------------------------------------------------------------ control

    def _handle_control(self, timeout_s: float) -> None:
        msg = self.client.recv(timeout_s)
        while msg is not None:
            self.last_heard = time.monotonic()
            self._dispatch(msg)
            msg = self.client.recv(0.0)

    def _check_learner(self) -> None:
        """A learner that died (or a connection that broke) answers nothing, not even a
        heartbeat: after transport.learner_timeout_s, stop and reconnect."""
        silent_s = time.monotonic() - self.last_heard
        if not self.stopping and silent_s > self.cfg.transport.learner_timeout_s:
            self.stopping = (
                f"{LEARNER_LOST}: nothing from {self.client.endpoint} for {silent_s:.1f} s "
                f"(transport.learner_timeout_s={self.cfg.transport.learner_timeout_s:g})"
            )

    def resend(self, outbox: dict[int, TrajectoryGroup]) -> None:
        """Send again the groups a previous connection left unacknowledged. The learner keeps
        each lease once: a group it already has, or whose lease is no longer live, is dropped."""
        for group in outbox.values():
            self.outbox[group.lease_id] = group
            if not self.client.push(group, timeout_s=self.cfg.transport.request_timeout_s):
                logger.warning("trajectory queue full; lease %d stays in the outbox", group.lease_id)
            self.pushed_at[group.lease_id] = time.monotonic()
        if outbox:
            logger.info("re-sent %d unacknowledged groups to the learner", len(outbox))

    def _dispatch(self, msg: Any) -> None:
        match msg:
            case LeaseGrant(leases=leases):
                self.request_out = False
                for lease in leases:
                    self._start(lease)
            case Wait(retry_after_s=retry):
                self.request_out = False
                self.next_request_at = time.monotonic() + retry
            case Ack(lease_ids=ids):
                for lease_id in ids:
                    self.outbox.pop(lease_id, None)
                    self.pushed_at.pop(lease_id, None)
            case JoinGroup() | WeightHeader():
                self.receiver.submit(msg)
            case Bye(reason=reason):
                self.stopping = reason or "learner said bye"
            case Registered():
                pass  # the answer to a repeated Register (sent while the learner was unreachable)
            case _:
                logger.warning("unexpected control message %s", type(msg).__name__)

    def _maybe_swap_weights(self) -> None:
        """Between two decode steps: swap in a version the receiver finished staging."""
        ready = self.receiver.poll()
        if ready is None:
            return
        header, receive_s = ready
        start = time.perf_counter()
        self.receiver.swap()
        self.engine.set_version(header.version)
        pause_s = time.perf_counter() - start
        self.has_weights = True
        self.client.send(SyncDone(self.actor_id, header.version, receive_s, pause_s))
        logger.debug(
            "weights v%d: received in %.3f s, generation paused %.4f s", header.version, receive_s, pause_s
        )

    def _maybe_request_leases(self) -> None:
        now = time.monotonic()
        timeout_s = self.cfg.transport.request_timeout_s
        if self.request_out and now - self.request_sent_at < timeout_s:
            return
        if self.request_out:
            # No answer within the round-trip timeout: the request or its reply was lost (a
            # reconnect, a full queue). Leases the learner could not send it has re-issued
            # already; a grant that was merely late still joins the engine when it arrives.
            logger.warning("no answer to a lease request within %.0f s; asking again", timeout_s)
            self.request_out = False
        if now < self.next_request_at:
            return
        g = self.cfg.rollout.group_size
        if self.sync:
            # Generation waits while the learner trains and until its new weights are in.
            if self.engine.has_work() or self.outbox or self.pending or self.receiver.busy:
                return
            n = self.engine.max_num_seqs // g
        else:
            n = min(self.engine.free_slots() // g, self.cfg.rollout.prompts_per_request)
        if n >= 1:
            self.client.send(LeaseRequest(self.actor_id, n, self.engine.version))
            self.request_out = True
            self.request_sent_at = now

    def _maybe_repush(self) -> None:
        """Push again the outbox groups unacknowledged for transport.request_timeout_s: the push
        or its Ack was lost (in sync mode a non-empty outbox would block lease requests for
        good). The learner acknowledges a copy it already has and drops it. Never blocks: a
        full queue leaves the group for the next round."""
        now = time.monotonic()
        due = [i for i, at in self.pushed_at.items() if now - at >= self.cfg.transport.request_timeout_s]
        for lease_id in due:
            self.pushed_at[lease_id] = now
            if self.client.push(self.outbox[lease_id], timeout_s=0.0):
                logger.info("no Ack for lease %d; pushed its group again", lease_id)

    def _maybe_heartbeat(self) -> None:
        now = time.monotonic()
        if now >= self.next_heartbeat_at:
            self.client.send(Heartbeat(self.actor_id, self.engine.version, len(self.pending)))
            self.next_heartbeat_at = now + self.cfg.transport.heartbeat_s

    # ------------------------------------------------------------------ samples

    def _start(self, lease: Lease) -> None:
        episodes = LeaseEpisodes(
            lease,
            render_prompt(self.tokenizer, lease.question, self.cfg.data.template),
            env=self.env,
            tokenizer=self.tokenizer,
            stop_ids=self.stop_ids,
            group_size=self.cfg.rollout.group_size,
            max_new_tokens=self.cfg.rollout.max_new_tokens,
        )
        self.pending[lease.lease_id] = episodes
        self.engine.add(episodes.first_request())

    def _collect(self, sample: Sample) -> None:
        """A turn ended: the environment answers (the next turn joins the engine) or the
        episode is over; the group goes out once all G are."""
        episodes = self.pending[sample.request_id]
        next_turn = episodes.collect(sample)
        if next_turn is not None:
            self.engine.add(next_turn)
        if not episodes.done:
            return
        del self.pending[sample.request_id]
        group = episodes.group(self.actor_id)
        self.outbox[group.lease_id] = group
        if not self.client.push(group, timeout_s=self.cfg.transport.request_timeout_s):
            logger.warning(
                "trajectory queue full for %.0f s; lease %d stays in the outbox",
                self.cfg.transport.request_timeout_s,
                group.lease_id,
            )
        self.pushed_at[group.lease_id] = time.monotonic()  # after the push, which may block
        self.groups_sent += 1

    def close(self) -> None:
        if not self.receiver.close():
            logger.warning("the weight receiver is still inside a collective; leaving it behind")
        self.engine.close()


def score_group(
    tokenizer: Any,
    lease: Lease,
    prompt_ids: list[int],
    samples: list[Sample],
    actor_id: str,
    stop_ids: frozenset[int],
) -> TrajectoryGroup:
    """The wire group for one lease of single-turn samples: every sample scored by
    ``math_reward`` against the lease's reference answer (the final stop token is not part of
    the scored text). The ``math`` environment through ``LeaseEpisodes`` gives the same group;
    the reference run and the bench's capacity measurement use this directly."""
    responses = []
    for s in sorted(samples, key=lambda s: s.index):
        reward = math_reward(response_text(tokenizer, strip_stop(s.token_ids, stop_ids)), lease.answer)
        responses.append(
            Response(
                token_ids=np.asarray(s.token_ids, dtype=np.int32),
                logprobs=np.asarray(s.logprobs, dtype=np.float32),
                versions=np.asarray(s.versions, dtype=np.int32),
                reward=reward,
                finish_reason=FinishReason(s.finish_reason),
            )
        )
    return TrajectoryGroup(
        lease_id=lease.lease_id,
        prompt_id=lease.prompt_id,
        actor_id=actor_id,
        prompt_token_ids=np.asarray(prompt_ids, dtype=np.int32),
        responses=responses,
    )


# ---------------------------------------------------------------------- entry point


def resolve_learner(learner: str) -> str:
    """The learner's control endpoint from ``HOST:PORT``, ``tcp://...`` or an endpoints.json."""
    if learner.startswith("tcp://"):
        return learner
    if learner.endswith(".json") or os.path.isdir(learner):
        path = learner if learner.endswith(".json") else os.path.join(learner, "endpoints.json")
        return Endpoints.load(path).control  # type: ignore[arg-type]
    if ":" in learner:
        return f"tcp://{learner}"
    raise ValueError(f"learner={learner!r}: give HOST:PORT, tcp://HOST:PORT or path/to/endpoints.json")


def register(client: ActorClient, *, timeout_s: float, give_up_s: float) -> Registered:
    """Register with the learner, retrying with backoff and saying where it is trying."""
    deadline = time.monotonic() + give_up_s
    backoff = 1.0
    while True:
        client.send(Register(client.actor_id, SCHEMA_VERSION, os.getpid(), socket.gethostname()))
        reply = client.recv(min(timeout_s, max(0.1, deadline - time.monotonic())))
        match reply:
            case Registered():
                return reply
            case Rejected(reason=reason):
                raise RuntimeError(f"the learner refused this actor: {reason}")
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"no learner answered at {client.endpoint} within {give_up_s:.0f} s; if the learner has "
                "transport.curve_keys_dir set, give this actor keys=DIR with that directory's client keys"
            )
        logger.info("no answer from the learner at %s yet; retrying in %.0f s", client.endpoint, backoff)
        time.sleep(backoff)
        backoff = min(backoff * 2, 15.0)


def run_actor(
    learner: str,
    *,
    actor_id: str,
    device: str = "cpu",
    num_threads: int = 0,
    give_up_s: float = 600.0,
    keys_dir: str = "",
) -> str:
    """Entry point of one actor process. Returns why it stopped. ``keys_dir``: CURVE keys
    (``async-rl keys``), needed before registering, so before the learner's config arrives."""
    if num_threads:
        torch.set_num_threads(num_threads)
    curve = load_client_keys(keys_dir) if keys_dir else None

    def connect() -> ActorClient:  # resolved each time: a restarted learner rewrites endpoints.json
        return ActorClient(
            resolve_learner(learner), actor_id, high_water_mark=1000, max_message_mb=64, curve=curve
        )

    client = connect()
    actor = None
    connected = ""
    known = False  # registered with the learner at least once: it is told when this actor leaves
    outbox: dict[int, TrajectoryGroup] = {}  # unacknowledged groups carried across reconnects
    try:
        while True:
            registered = register(client, timeout_s=5.0, give_up_s=give_up_s)
            known = True
            if registered.trajectory_endpoint != connected:
                client.connect_trajectory(registered.trajectory_endpoint)
                connected = registered.trajectory_endpoint
            logger.info("actor %s registered (learner at v%d)", actor_id, registered.version)
            actor = Actor(
                client,
                registered,
                device=device,
                store_timeout_s=float(registered.config["weight_sync"]["timeout_s"]),
            )
            actor.resend(outbox)
            reason = actor.run()
            outbox = actor.outbox
            logger.info("actor %s stopping: %s (%d groups sent)", actor_id, reason, actor.groups_sent)
            if reason.startswith(LEARNER_LOST):
                # The learner died or the connection broke. Fresh sockets drop whatever queued
                # for the old connection; the outbox is sent again once registered. A learner
                # resumed from a checkpoint re-issues the leases this actor was generating.
                logger.warning(
                    "actor %s: %s; reconnecting (%d unacknowledged groups kept)",
                    actor_id,
                    reason,
                    len(outbox),
                )
                actor.close()
                actor = None
                client.close()
                client = connect()
                connected = ""
                continue
            if not reason.startswith(EVICTED):
                return reason
            # Evicted (it missed a weight-sync deadline, e.g. it was stopped): its leases went
            # to other actors. Start clean and join the fleet again.
            logger.warning("actor %s was evicted by the learner; registering again", actor_id)
            actor.close()
            actor = None
    except KeyboardInterrupt:  # SIGINT, or SIGTERM/SIGHUP/a parent gone with `async-rl actor`
        logger.info("actor %s stopping: interrupted; saying bye to the learner", actor_id)
        raise
    finally:
        if known:
            with contextlib.suppress(Exception):  # the learner may already be gone
                client.send(Bye(actor_id, "actor exiting"))
        if actor is not None:
            actor.close()
        client.close()
