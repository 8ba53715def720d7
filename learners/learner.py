"""The learner process: coordinator, buffer and dynamic filter, DAPO trainer, weight publisher.

Two threads:

* the service thread owns the ZMQ sockets (``learners/service.py``). It answers
  registrations and lease requests (admission control in ``Coordinator``), validates
  arriving groups, applies the dynamic sampling filter, acknowledges, and buffers accepted
  groups in arrival order;
* the main thread trains: it takes ``batch_groups`` groups in order, runs one step,
  bumps the version and broadcasts the weights every ``sync_every`` steps.

Messages the main thread sends (weight headers, join, bye) go through a queue that the
service thread drains, so exactly one thread ever touches a socket.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

import torch

from async_rl.config import Config, SyncBackend, default_threads
from async_rl.coordinator import Coordinator
from async_rl.data import PromptSource, build_datasets
from async_rl.env import make_env
from async_rl.metrics import MetricsWriter
from async_rl.schema import (
    EVICTED,
    Bye,
    JoinGroup,
    Message,
    SyncDone,
    TrajectoryGroup,
)
from async_rl.text import check_model_dir, load_tokenizer, stop_token_ids
from async_rl.transport import Endpoints, LearnerServer, RateLimitedLog, load_server_keys
from learners.advantages import estimator_from_config
from learners.batching import choose_batch
from learners.checkpoint import load_checkpoint, save_checkpoint
from learners.critic import TrajectoryWriter, delimiter_token_ids, records_from_groups
from learners.evaluate import greedy_accuracy
from learners.fsdp import ShardedTrainer
from learners.logprobs import check_logprobs
from learners.restart import (
    LEASE_ID_BITS,
    checkpoint_to_resume,
    next_incarnation,
    previous_ports,
    write_accounting,
)
from learners.service import Accepted, Service
from learners.trainer import MASTER_DTYPE, StepParams, StepTimer, make_batch, train_step
from learners.warmstart import warm_start_from_config
from weight_sync import broadcast
from weight_sync.group import SyncGroup, host_store
from weight_sync.group import form as form_group

logger = logging.getLogger(__name__)

# A learner waiting longer than this for a batch logs where the batch stands, this often.
_WAIT_REPORT_S = 30.0

# Weight broadcasts tried (evicting whoever failed in between) before the learner gives up.
_SYNC_ATTEMPTS = 5


class _Stopped(Exception):
    """The learner was asked to stop while waiting (for actors or a group)."""


class Learner(Service):
    def __init__(self, cfg: Config, run_dir: Path, model_path: str) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        checkpoint = checkpoint_to_resume(self.run_dir) if cfg.learner.resume else None
        self.resumed_from = checkpoint
        # Each start in this run directory grants lease ids from its own range, so a group an
        # actor made for a crashed predecessor can never pass for a lease of this learner.
        self.incarnation = next_incarnation(self.run_dir)
        processes = cfg.trainer.num_devices + cfg.rollout.num_actors  # sharing this machine's cores
        torch.set_num_threads(cfg.trainer.num_threads or default_threads(processes))
        torch.manual_seed(cfg.seed)
        self.device = torch.device(_pick_device(cfg.trainer.device))
        check_model_dir(model_path)
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path)
        self.stop_ids = stop_token_ids(model_path, self.tokenizer)
        from transformers import AutoModelForCausalLM

        # float32 master weights; the forward and backward passes autocast to model.dtype.
        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=MASTER_DTYPE)
        self.model: Any = model.to(self.device).eval()
        # The learner's logprobs come from the final hidden states, never from full logits:
        # refuse an architecture whose logits that path would not reproduce.
        check_logprobs(self.model, min(len(self.tokenizer), int(self.model.config.vocab_size)))
        if cfg.trainer.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # One flat buffer per dtype: the weight broadcast sends its buckets without packing.
        broadcast.flatten_parameters_(self.model)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay
        )
        self.train_prompts, self.eval_prompts = build_datasets(cfg.data, seed=cfg.seed)
        self.env = make_env(cfg.env)
        self.estimator = estimator_from_config(cfg, self.tokenizer)
        # Dynamic sampling drops groups whose rewards are all equal: they carry no signal for
        # group-relative advantages, but do for batch, history and critic baselines.
        self.filter_groups = cfg.algorithm.dynamic_sampling and self.estimator.filters_zero_variance
        if cfg.algorithm.dynamic_sampling and not self.filter_groups:
            logger.info(
                "dynamic sampling's zero-variance filter is off: algorithm.advantage=%s with "
                "rollout.group_size=%d gives all-equal groups a non-zero advantage",
                cfg.algorithm.advantage.value,
                cfg.rollout.group_size,
            )
        self.trajectories: TrajectoryWriter | None = None
        if cfg.learner.save_trajectories:
            store = Path(cfg.learner.trajectory_dir or self.run_dir / "trajectories")
            self.trajectories = TrajectoryWriter(store)
            self.step_delimiters = delimiter_token_ids(self.tokenizer, cfg.algorithm.step_delimiter)
            logger.info("saving trained trajectories to %s (learner.save_trajectories)", store)
        self.coordinator = Coordinator(
            PromptSource(self.train_prompts, seed=cfg.seed),
            batch_groups=cfg.trainer.batch_groups,
            max_staleness=cfg.rollout.max_staleness,
            lease_timeout_s=cfg.rollout.lease_timeout_s,
            first_lease_id=self.incarnation << LEASE_ID_BITS,
        )
        self.version = 0
        if checkpoint is not None:
            self._restore(checkpoint)
        t = cfg.transport
        # A resumed learner listens where its predecessor did: actors reconnect on their own.
        ports = previous_ports(self.run_dir, t.control_port, t.trajectory_port) if checkpoint else None
        control_port, trajectory_port = ports or (t.control_port, t.trajectory_port)
        self.server = LearnerServer(
            t.host,
            control_port,
            trajectory_port,
            high_water_mark=t.high_water_mark,
            max_message_mb=t.max_message_mb,
            curve=load_server_keys(t.curve_keys_dir) if t.curve_keys_dir else None,
        )
        self.store = host_store(t.host, t.store_port, cfg.weight_sync.timeout_s)
        self.endpoints = Endpoints(
            self.server.control_endpoint, self.server.trajectory_endpoint, t.host, self.store.port
        )
        self.endpoints.save(self.run_dir / "endpoints.json")
        self.metrics = MetricsWriter(self.run_dir)
        self.warm_start_metrics: dict[str, float] = {}
        self.epoch = -1
        self.group: SyncGroup | None = None
        self.members: list[str] = []
        self.membership_dirty = False  # an actor (re-)registered: re-form at the next sync
        self.registered: set[str] = set()  # registered, engine still loading (no heartbeat yet)
        self.sync_pending: dict[str, tuple[int, float]] = {}  # member -> (version, sent at), un-acked
        self.sync_reports: list[SyncDone] = []  # since the last metrics line
        self.evicted = 0
        self.held: list[Accepted] = []  # accepted groups taken from the buffer, not trained yet
        self.stale_dropped = 0
        self.stale_dropped_tokens = 0  # generated tokens of those groups, thrown away
        self.sync_buffers = broadcast.Buffers()  # reused by every weight broadcast
        # trainer.num_devices > 1: the FSDP ranks (started in run(), after any warm start).
        # self.model is then rank 0's full mirror, refreshed before each sync, eval and save.
        self.sharded: ShardedTrainer | None = None
        self.actors: dict[str, float] = {}  # registered actor id -> last heard from (monotonic)
        self.buffer: queue.Queue[Accepted] = queue.Queue()
        self.outgoing: queue.Queue[tuple[str, Message]] = queue.Queue()
        self.stop = threading.Event()  # set by a signal: finish the step in hand and save
        self._closing = threading.Event()  # set by close(): the service thread exits
        self.gen_tokens = 0  # generated tokens received, filtered groups included
        self.filtered = 0
        self.rejected = 0
        self._bad_input = RateLimitedLog(logger)
        self._service = threading.Thread(target=self._serve, name="learner-service", daemon=True)

    # ------------------------------------------------------------------ main thread

    def run(self) -> None:
        """Warm start, form the group, then train ``max_steps`` steps."""
        tr = self.cfg.trainer
        self._service.start()
        if tr.num_devices > 1:  # the other ranks load the model during the warm start
            self.sharded = ShardedTrainer(
                self.cfg,
                model_path=self.model_path,
                store=self.store,
                store_host=self.endpoints.store_host,
                run_dir=self.run_dir,
                device=self.device,
            )
        # A checkpoint is past the warm start; a stop asked for while the model loaded skips it.
        if tr.warmup_sft_steps and self.resumed_from is None and not self.stop.is_set():
            self._warm_start()
        if self.sharded is not None:
            self.sharded.shard(self.model, self.version)  # every rank starts from these weights
        try:
            self._train_loop()
        except _Stopped:
            logger.info("stopped at v%d", self.version)
        except TimeoutError:
            # Actors gone, or nothing left to learn from: keep what was trained, then say why.
            if self.version > 0:
                self.save()
            raise
        self.save()
        if self.service_error is not None:
            raise RuntimeError(
                f"the learner's service thread failed ({self.service_error!r}); saved at "
                f"v{self.version}, see the log for the traceback"
            ) from self.service_error

    def _train_loop(self) -> None:
        tr = self.cfg.trainer
        self._wait_for_actors(self.cfg.rollout.num_actors)
        sync_s = self._publish()
        start = time.monotonic()
        last = {"time": start, "tokens": self.gen_tokens, "filtered": 0}
        first = {"time/weight_sync_s": sync_s} | self.warm_start_metrics | self._evaluate()
        self._log_step(self.version, first, start, last)  # the line before RL (or before resuming)
        while self.version < tr.max_steps and not self.stop.is_set():
            wait_start = time.monotonic()
            groups = self._next_batch()
            if groups is None:
                break
            train_start = time.monotonic()
            metrics = {"time/wait_s": train_start - wait_start} | self._train(groups)
            metrics["time/train_s"] = time.monotonic() - train_start
            out_of_time = bool(tr.max_time_s) and time.monotonic() - start >= tr.max_time_s
            final = self.version == tr.max_steps or out_of_time
            if self.version % tr.sync_every == 0 or final:
                metrics["time/weight_sync_s"] = self._publish()
            if tr.eval_every and (self.version % tr.eval_every == 0 or final):
                metrics |= self._evaluate()
            if tr.checkpoint_every and self.version % tr.checkpoint_every == 0:
                self.save()
            self._log_step(self.version, metrics, start, last)
            if out_of_time:
                logger.info(
                    "trainer.max_time_s=%g reached after step %d; stopping", tr.max_time_s, self.version
                )
                break

    def _warm_start(self) -> None:
        result = warm_start_from_config(
            self.model, self.tokenizer, self.train_prompts, self.cfg, self.stop_ids
        )
        logger.info("warm start done: %d steps, final loss %.3f", result.steps, result.loss)
        self.warm_start_metrics = {"warmup/steps": result.steps, "warmup/loss": result.loss}
        if result.accuracy is not None:
            self.warm_start_metrics["warmup/train_accuracy"] = result.accuracy

    # ------------------------------------------------------------------ fleet membership

    def _wait_for_actors(self, minimum: int) -> None:
        """Block until at least ``minimum`` actors are registered (deadline: idle_timeout_s)."""
        deadline = time.monotonic() + self.cfg.trainer.idle_timeout_s
        next_log = 0.0
        while len(self.actors) < minimum:
            if self.stop.is_set():
                raise _Stopped
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(self.actors)} of {minimum} actors registered within "
                    f"trainer.idle_timeout_s={self.cfg.trainer.idle_timeout_s:.0f} s; start them with "
                    f"`async-rl actor learner={self.run_dir / 'endpoints.json'}`"
                )
            if time.monotonic() >= next_log:
                logger.info("waiting for actors: %d of %d registered", len(self.actors), minimum)
                next_log = time.monotonic() + 10
            time.sleep(0.05)

    def _ensure_group(self, minimum: int = 1) -> None:
        """(Re-)form the weight-sync group when the fleet changed, as a new epoch. An actor
        that does not join within weight_sync.timeout_s is evicted and the group re-formed
        without it, so one missing actor never holds up the others."""
        while self.group is None or self.membership_dirty or set(self.actors) != set(self.members):
            self._wait_for_actors(minimum)
            if self.group is not None:
                self.group.close()
                self.group = None
            self.epoch += 1
            self.membership_dirty = False
            members = sorted(self.actors)
            backend = _backend(self.cfg.weight_sync.backend, self.device)
            store = (self.endpoints.store_host, self.endpoints.store_port)
            for rank, actor_id in enumerate(members, start=1):
                msg = JoinGroup(self.epoch, rank, len(members) + 1, *store, backend)
                self.outgoing.put((actor_id, msg))
            group, missing = form_group(
                self.store,
                epoch=self.epoch,
                world_size=len(members) + 1,
                backend=backend,
                timeout_s=self.cfg.weight_sync.timeout_s,
                stop=self.stop,
            )
            if self.stop.is_set():
                raise _Stopped
            for rank in missing:
                self._evict(members[rank - 1], f"did not join weight-sync epoch {self.epoch} in time")
            if group is not None:
                self.group, self.members = group, members
                self.sync_pending.clear()
                logger.info("weight-sync epoch %d: %d actors %s", self.epoch, len(members), members)

    def _evict(self, actor_id: str, reason: str) -> None:
        """Drop ``actor_id`` from the fleet: its leases are re-issued, and it is told why (it
        registers again if it is still alive)."""
        self.actors.pop(actor_id, None)
        self.sync_pending.pop(actor_id, None)
        reissued = self.coordinator.release(actor_id)
        self.evicted += 1
        self.outgoing.put((actor_id, Bye(actor_id, f"{EVICTED}: {reason}")))
        logger.warning(
            "evicted actor %s: %s (weight_sync.timeout_s=%.0f); %d leases re-issued",
            actor_id,
            reason,
            self.cfg.weight_sync.timeout_s,
            reissued,
        )

    def _evict_unresponsive(self) -> None:
        """Evict members that did not finish a weight sync, or said nothing, for timeout_s."""
        now, limit = time.monotonic(), self.cfg.weight_sync.timeout_s
        for actor_id in list(self.members):
            if actor_id in self.registered:
                continue  # a new incarnation registered: its predecessor already left the fleet
            pending = self.sync_pending.get(actor_id)
            heard = self.actors.get(actor_id)
            if pending is not None and now - pending[1] > limit:
                self._evict(actor_id, f"did not finish the weight sync of v{pending[0]} in time")
            elif heard is not None and now - heard > limit:
                self._evict(actor_id, f"silent for {now - heard:.0f} s")

    def _after_failed_sync(self, failed_at: float) -> None:
        """A broadcast failed (a member died or hung). Live actors keep sending heartbeats from
        their main loop whatever their receiver thread is doing: evict the members that did
        not within two heartbeat periods, then the next attempt re-forms the group."""
        if self.group is not None:
            self.group.close()
            self.group = None
        until = failed_at + 2 * self.cfg.transport.heartbeat_s + 0.5
        while time.monotonic() < until and not self.stop.is_set():
            time.sleep(0.05)
        for actor_id in list(self.members):
            if actor_id in self.registered:
                continue  # a new incarnation registered: its predecessor already left the fleet
            if self.actors.get(actor_id, 0.0) < failed_at:
                self._evict(actor_id, "stopped answering during a weight sync")

    def _publish(self) -> float:
        """Broadcast the current weights to every member; open admission for this version."""
        if self.sharded is not None:
            self.sharded.gather_into(self.model, self.version)  # the sync goes out from the mirror
        params = dict(self.model.named_parameters())
        self._evict_unresponsive()
        for _ in range(_SYNC_ATTEMPTS):
            self._ensure_group()
            assert self.group is not None  # _ensure_group returns with a group or raises
            header = broadcast.plan(
                params,
                version=self.version,
                epoch=self.epoch,
                bucket_mb=self.cfg.weight_sync.bucket_mb,
                wire_dtype=getattr(torch, self.cfg.model.dtype),  # what the engines hold
            )
            sent_at = time.monotonic()
            for actor_id in self.members:
                self.outgoing.put((actor_id, header))
                self.sync_pending.setdefault(actor_id, (self.version, sent_at))
            try:
                seconds = broadcast.send(self.group, params, header, self.device, self.sync_buffers)
            except RuntimeError as err:  # torch.distributed errors (timeouts, closed peers)
                logger.warning("weight broadcast of v%d failed: %s", self.version, str(err).splitlines()[0])
                self._after_failed_sync(sent_at)
                continue
            self.coordinator.set_version(self.version)
            return seconds
        raise RuntimeError(f"the weight broadcast failed {_SYNC_ATTEMPTS} times in a row; see the log")

    def _next_batch(self) -> list[Accepted] | None:
        """The next ``batch_groups`` accepted groups, earliest deadline first
        (``learners.batching``: never a batch that leaves a group in flight with no step left
        to train it within max_staleness), sorted by draw for a batch layout that does not
        depend on timing. None if stopped.

        A group past its deadline anyway (it cannot happen under admission control; kept as a
        guard) is not trained: its prompt is leased again (``leases/stale``)."""
        b, bound = self.cfg.trainer.batch_groups, self.cfg.rollout.max_staleness
        deadline = time.monotonic() + self.cfg.trainer.idle_timeout_s
        filtered_since_step = self.coordinator.counts["filtered"]
        filtered_at_start = self.coordinator.counts["filtered"]
        waiting_since = time.monotonic()
        report_at = waiting_since + _WAIT_REPORT_S
        while True:
            if self.stop.is_set():
                return None
            if time.monotonic() >= report_at:
                # Dynamic sampling can keep a batch from filling for minutes (a task the policy
                # nearly never or nearly always solves): say so rather than stay silent.
                report_at += _WAIT_REPORT_S
                logger.info(
                    "step %d waits for its batch (%.0f s): %d of %d groups held, %d filtered since "
                    "the last step (all rewards equal), %d leases in flight",
                    self.version + 1,
                    time.monotonic() - waiting_since,
                    len(self.held),
                    b,
                    self.coordinator.counts["filtered"] - filtered_since_step,
                    len(self.coordinator.in_flight_granted_at()),
                )
            # In flight first, then what arrived: a group that finishes in between is counted
            # twice (a wait too many, never a deadline missed), never not at all.
            in_flight = self.coordinator.in_flight_granted_at()
            arrived = self._drain_buffer()
            if arrived:
                deadline = time.monotonic() + self.cfg.trainer.idle_timeout_s
                filtered_at_start = self.coordinator.counts["filtered"]
            self._drop_stale(bound)
            keys = [(a.group.min_version, a.seq) for a in self.held]
            chosen = choose_batch(keys, in_flight, version=self.version, max_staleness=bound, batch_groups=b)
            if chosen is not None:
                break
            try:
                self.held.append(self.buffer.get(timeout=0.1))
                deadline = time.monotonic() + self.cfg.trainer.idle_timeout_s
                filtered_at_start = self.coordinator.counts["filtered"]
            except queue.Empty:
                # A hung actor's leases count as in flight, and a batch may be waiting for
                # them: evict it after weight_sync.timeout_s of silence, so they are re-issued
                # now rather than after rollout.lease_timeout_s.
                self._evict_unresponsive()
                if self.membership_dirty or set(self.actors) - set(self.members):
                    # Actors that (re-)registered hold no weights and ask for no leases until
                    # they get some: if every actor did (the learner was unreachable for a
                    # while), the batch would never fill. Give them the current version now.
                    self._publish()
                    deadline = time.monotonic() + self.cfg.trainer.idle_timeout_s
                elif time.monotonic() > deadline:
                    raise TimeoutError(self._idle_message(len(self.held), filtered_at_start)) from None
        picked = set(chosen)
        batch = [a for i, a in enumerate(self.held) if i in picked]
        self.held = [a for i, a in enumerate(self.held) if i not in picked]
        return sorted(batch, key=lambda a: a.seq)

    def _drain_buffer(self) -> int:
        """Move every group the service thread has accepted into ``held``; how many."""
        moved = 0
        while True:
            try:
                self.held.append(self.buffer.get_nowait())
            except queue.Empty:
                return moved
            moved += 1

    def _drop_stale(self, bound: int) -> None:
        """Re-queue held groups that can no longer be trained within the bound."""
        fresh = []
        for held in self.held:
            if self.version - held.group.min_version > bound:
                self.coordinator.requeue_stale(held.lease)
                self.stale_dropped += 1
                self.stale_dropped_tokens += sum(r.length for r in held.group.responses)
            else:
                fresh.append(held)
        self.held = fresh

    def _idle_message(self, buffered: int, filtered_before: int) -> str:
        """Why no batch filled within trainer.idle_timeout_s: silent actors, or groups that all
        carried no signal (dynamic sampling dropped every one)."""
        idle_s, b = self.cfg.trainer.idle_timeout_s, self.cfg.trainer.batch_groups
        filtered = self.coordinator.counts["filtered"] - filtered_before
        if filtered:
            return (
                f"no group passed dynamic sampling for trainer.idle_timeout_s={idle_s:.0f} s ({buffered} of "
                f"{b} groups buffered): {filtered} groups arrived and in each all responses got the same "
                "reward. The policy solves these prompts every time (or never): use harder (or easier) "
                "prompts, or algorithm.dynamic_sampling=false"
            )
        return (
            f"no trajectory for trainer.idle_timeout_s={idle_s:.0f} s ({buffered} of {b} groups buffered); "
            "are the actors alive?"
        )

    def _train(self, accepted: list[Accepted]) -> dict[str, Any]:
        cfg = self.cfg
        groups = [a.group for a in accepted]
        timer = StepTimer(self.device)
        with timer.phase("batching"):
            batch = make_batch(groups, pad_id=self.tokenizer.pad_token_id, device=self.device)
        params = StepParams.from_config(cfg)
        if self.sharded is not None:
            step = self.sharded.train_step(
                groups, batch, params, version=self.version, estimator=self.estimator
            )
        else:
            step = train_step(
                self.model,
                self.optimizer,
                batch,
                params,
                version=self.version,
                estimator=self.estimator,
                timer=timer,
            )
        bookkeeping = time.perf_counter()
        metrics: dict[str, Any] = dict(step)
        self.coordinator.trained([a.lease.lease_id for a in accepted])
        staleness = [self.version - g.min_version for g in groups]
        sampled = [r.sampled_versions for g in groups for r in g.responses]
        spans = [int(v.max() - v.min()) for v in sampled if len(v)]
        metrics |= {
            "reward/mean": float(batch.rewards.mean()),
            "rollout/staleness_mean": sum(staleness) / len(staleness),
            "rollout/staleness_max": max(staleness),
            "rollout/mixed_version_frac": sum(s > 0 for s in spans) / max(1, len(spans)),
            "rollout/version_span_max": max(spans, default=0),
            "rollout/response_len_mean": float(batch.lengths.float().mean()),
            "rollout/truncated_frac": float(batch.truncated.float().mean()),
            "rollout/trained_leases": [a.group.lease_id for a in accepted],
            "rollout/trained_seqs": [a.seq for a in accepted],
            "rollout/trained_staleness": staleness,
            "rollout/groups_by_actor": dict(collections.Counter(g.actor_id for g in groups)),
        } | episode_metrics(groups)
        if self.trajectories is not None:
            self.trajectories.write(
                records_from_groups(groups, delimiter_ids=self.step_delimiters, version=self.version)
            )
        timer.seconds["bookkeeping"] = time.perf_counter() - bookkeeping
        self.version += 1
        return metrics | timer.metrics()

    def _evaluate(self) -> dict[str, float]:
        if not self.eval_prompts:
            return {}
        if self.sharded is not None:
            self.sharded.gather_into(self.model, self.version)  # greedy decoding runs on the mirror
        start = time.monotonic()
        accuracy = greedy_accuracy(
            self.model,
            self.tokenizer,
            self.eval_prompts,
            template=self.cfg.data.template,
            max_new_tokens=self.cfg.rollout.max_new_tokens,
            stop_ids=self.stop_ids,
            max_batch_tokens=self.cfg.trainer.micro_batch_tokens,
            env=self.env,
        )
        return {"eval/accuracy": accuracy, "time/eval_s": time.monotonic() - start}

    def _log_step(self, step: int, metrics: dict[str, Any], start: float, last: dict[str, Any]) -> None:
        now = time.monotonic()
        elapsed = max(now - last["time"], 1e-9)
        counts = self.coordinator.counts
        row = {
            "version": self.version,
            "time_s": now - start,
            "throughput/gen_tokens_per_s": (self.gen_tokens - last["tokens"]) / elapsed,
            # Generated tokens thrown away because their group outlived the staleness bound.
            "rollout/stale_dropped_tokens": self.stale_dropped_tokens,
            "rollout/dropped_token_frac": self.stale_dropped_tokens / max(self.gen_tokens, 1),
            "throughput/train_tokens_per_s": metrics.get("train/tokens", 0.0) / elapsed,
            "rollout/filtered_groups": counts["filtered"] - last["filtered"],
            "transport/malformed": self.server.malformed + self.rejected,
            "fleet/actors": len(self.members),
            "fleet/epoch": self.epoch,
            "fleet/evicted": self.evicted,
            "leases/in_flight": self.coordinator.in_flight,
            "leases/in_flight_by_actor": self.coordinator.in_flight_by_actor(),
            "leases/buffered": self.coordinator.buffered,
            "learner/incarnation": self.incarnation,
        } | {f"leases/{k}": v for k, v in counts.items()}
        reports, self.sync_reports = self.sync_reports, []
        if reports:
            # Per sync, as the actors saw it: the broadcast ran while they generated; only
            # the swap stopped generation.
            row["time/gen_pause_s"] = max(r.pause_s for r in reports)
            row["time/weight_receive_s"] = max(r.receive_s for r in reports)
            row["time/gen_pause_frac_max"] = max(r.pause_s / max(r.receive_s, 1e-9) for r in reports)
        for key in (
            "reward/mean",
            "rollout/staleness_mean",
            "rollout/staleness_max",
            "loss/clip_frac_low",
            "loss/clip_frac_high",
            "loss/is_weight_mean",
            "rollout/mismatch_kl",
            "time/weight_sync_s",
        ):
            row.setdefault(key, 0.0)  # step 0 (before training) has no batch yet
        self.metrics.write(step, row | metrics)
        last.update(time=now, tokens=self.gen_tokens, filtered=counts["filtered"])

    def save(self) -> Path:
        state = {
            "version": self.version,
            "incarnation": self.incarnation,
            "coordinator": self.coordinator.state_dict(),
        }
        optimizer: torch.optim.Optimizer | dict[str, Any] = self.optimizer
        if self.sharded is not None:  # full state dicts, written by rank 0 (learners/fsdp.py)
            self.sharded.gather_into(self.model, self.version)
            optimizer = self.sharded.optimizer_state_dict()
        return save_checkpoint(
            self.run_dir,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=optimizer,
            state=state,
            tensors={"estimator": self.estimator.state_dict()},
            keep=self.cfg.trainer.keep_checkpoints,
        )

    def _restore(self, checkpoint: Path) -> None:
        """Model, optimizer, estimator, version and coordinator state from ``checkpoint``. The
        leases in flight then, and the accepted groups not trained yet, are leased again."""
        state, tensors = load_checkpoint(
            checkpoint, model=self.model, optimizer=self.optimizer, device=self.device
        )
        self.estimator.load_state_dict(tensors.get("estimator", {}))
        self.version = int(state["version"])
        self.coordinator.load_state_dict(state["coordinator"])
        ledger = self.coordinator.accounting()
        logger.info(
            "resumed from %s at v%d (learner incarnation %d): %d leases granted so far, %d trained, "
            "%d re-issued; lease ids now start at %d",
            checkpoint,
            self.version,
            self.incarnation,
            ledger["granted"],
            ledger["trained"],
            ledger["reissued"],
            self.incarnation << LEASE_ID_BITS,
        )

    def _write_accounting(self) -> None:
        ledger = self.coordinator.accounting() | {"version": self.version, "incarnation": self.incarnation}
        write_accounting(self.run_dir, ledger)

    def close(self) -> None:
        """Tell every actor to stop, flush, and release sockets, group and store."""
        for actor_id in [*self.actors, *self.registered]:
            self.outgoing.put((actor_id, Bye("learner", "training finished")))
        deadline = time.monotonic() + 2.0
        while not self.outgoing.empty() and time.monotonic() < deadline and self._service.is_alive():
            time.sleep(0.02)
        self.stop.set()
        self._closing.set()
        if self._service.is_alive():
            self._service.join(timeout=5.0)
        if self.group is not None:
            self.group.close()
        if self.sharded is not None:
            self.sharded.close()
        self.server.close()
        self._write_accounting()
        self.metrics.close()
        if self.trajectories is not None:
            self.trajectories.close()


def episode_metrics(groups: list[TrajectoryGroup]) -> dict[str, float]:
    """Per response means of the episodes' turns and tool calls, the tool errors of the batch,
    and the fraction of response tokens the environment appended (the run's ``env.kind``)."""
    responses = [r for g in groups for r in g.responses]
    tokens = sum(r.length for r in responses)
    observed = sum(r.length - int(r.sampled_mask.sum()) for r in responses)
    n = max(1, len(responses))
    return {
        "rollout/turns_mean": sum(r.turns for r in responses) / n,
        "rollout/tool_calls_mean": sum(r.tool_calls for r in responses) / n,
        "rollout/tool_errors": float(sum(r.tool_errors for r in responses)),
        "rollout/observation_tokens_frac": observed / max(1, tokens),
    }


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device} but CUDA is not available; use trainer.device=cpu")
    return device


def _backend(choice: SyncBackend, device: torch.device) -> str:
    match choice:
        case SyncBackend.AUTO:
            return "nccl" if device.type == "cuda" else "gloo"
        case SyncBackend.GLOO | SyncBackend.NCCL:
            return choice.value
