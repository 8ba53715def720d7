"""``async-rl bench bench.compute=modelled``: plan a cluster (say 64 actors, 8 learner GPUs)
on a laptop.

What runs for real: the coordinator (leases, admission control, the staleness bound), the
ZeroMQ transport and the wire schema (msgpack encoding, decoding and validation of every
lease, trajectory, ack and weight header) between one learner and ``cost.num_actors``
actors, each with its own sockets, as threads of this process.

What is modelled: all model compute. A decode step sleeps ``decode_base_ms +
decode_per_seq_ms * batch``, a prefill ``prefill_per_token_ms`` per prompt token, a learner
step ``train_per_token_ms`` per token over ``learner_gpus``, a weight broadcast
``weight_gb / bandwidth_gb_s``. Response lengths are the long-tail task's, scaled; rewards
are coin flips with a per-prompt difficulty. Time runs ``1 / time_scale`` times faster than
modelled time, and every figure is reported in modelled seconds.

The learner and actor loops below are stand-ins, because ``learners/learner.py`` and
``actors/actor.py`` cannot take a modelled engine or trainer. They copy the decisions that set
throughput: when an actor asks for leases and how many (per free slot; in sync mode only
with an empty engine and nothing unacknowledged), continuous batching, batches taken in
arrival order, weights published every ``trainer.sync_every`` steps before admission opens
for the new version, the broadcast overlapping generation and only the swap pausing it.
They leave out what a healthy run does not exercise: heartbeats, lease expiry, group
formation, evaluation and checkpoints.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from async_rl.coordinator import Coordinator, Outcome
from async_rl.data import Prompt, PromptSource, build_datasets, sft_text
from async_rl.metrics import MetricsWriter
from async_rl.schema import (
    SCHEMA_VERSION,
    Ack,
    Bye,
    FinishReason,
    Lease,
    LeaseGrant,
    LeaseRequest,
    Register,
    Registered,
    Response,
    SyncDone,
    TrajectoryGroup,
    Wait,
    WeightHeader,
    check_group,
)
from async_rl.transport import ActorClient, LearnerServer

if TYPE_CHECKING:
    from async_rl.bench.config import BenchRootConfig, CostConfig

logger = logging.getLogger(__name__)

MODELLED_NOTE = (
    "MODELLED: every time and rate here is modelled, not measured. Model compute is replaced by "
    "sleeps of the configured costs (cost.*). Real: the coordinator, the ZeroMQ transport and the "
    "wire schema between the learner and every actor (threads of one process). The learner and "
    "actor loops are stand-ins in async_rl/bench/costmodel.py that follow the real ones."
)
# Real seconds an actor advances its engine between two looks at its control channel.
_CHUNK_REAL_S = 0.02
# Real seconds an actor told to wait waits (as the learner's _RETRY_AFTER_S).
_RETRY_REAL_S = 0.02
# A modelled vocabulary large enough for any token id the model writes (Qwen2's).
_VOCAB = 151_936
# Real seconds to wait for every actor to register, and for a run to end.
_START_TIMEOUT_S = 60.0


class Clock:
    """Modelled time: ``sleep(s)`` takes ``s * scale`` real seconds."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self._start = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._start) / self.scale

    def sleep(self, modelled_s: float) -> None:
        if modelled_s > 0:
            time.sleep(modelled_s * self.scale)

    def sleep_until(self, modelled_t: float) -> None:
        """Sleep to an absolute modelled time: the real overhead between sleeps is absorbed
        instead of adding up along a long chain of decode chunks."""
        self.sleep(modelled_t - self.now())


@dataclass
class Costs:
    """The configured costs, in modelled seconds."""

    c: CostConfig

    def decode_s(self, batch: int) -> float:
        return (self.c.decode_base_ms + self.c.decode_per_seq_ms * batch) / 1000

    def prefill_s(self, tokens: int) -> float:
        return self.c.prefill_per_token_ms * tokens / 1000

    def train_s(self, tokens: float) -> float:
        return (
            self.c.train_per_token_ms * tokens / self.c.learner_gpus + self.c.train_step_overhead_ms
        ) / 1000

    def broadcast_s(self) -> float:
        return self.c.weight_gb / self.c.bandwidth_gb_s + self.c.broadcast_latency_ms / 1000


class Workload:
    """Deterministic lengths and rewards per lease (keyed by the draw ``seq``, like sampling)."""

    def __init__(self, cfg: BenchRootConfig) -> None:
        self.c, self.seed = cfg.cost, cfg.seed
        self.prompts, _ = build_datasets(cfg.data, seed=cfg.seed)

    def lengths(self, prompt: Prompt, seq: int) -> np.ndarray:
        reference = len(sft_text(prompt)) + 1  # + EOS; one token per character in the tiny model
        jitter = np.random.default_rng([self.seed, seq, 1]).uniform(0.5, 1.5, self.c.group_size)
        scaled = np.rint(reference * self.c.length_scale * jitter).astype(np.int64)
        return np.clip(scaled, 1, self.c.max_response_tokens)

    def rewards(self, prompt_id: int, seq: int) -> list[float]:
        # Per-prompt difficulty uniform in [0, 1]: about 2 / (G + 1) of groups are all equal.
        p_correct = np.random.default_rng([self.seed, prompt_id, 2]).uniform()
        draws = np.random.default_rng([self.seed, seq, 3]).uniform(size=self.c.group_size)
        return [float(d < p_correct) for d in draws]


@dataclass
class _Sequence:
    lease: Lease
    index: int
    length: int
    start_step: int  # the engine's step counter when its first token was sampled


class ModelledEngine:
    """Continuous batching bookkeeping: up to ``max_num_seqs`` sequences, each needing a known
    number of decode steps; time advances by the modelled cost of each step."""

    def __init__(self, costs: Costs, max_num_seqs: int, prompt_tokens: int) -> None:
        self.costs, self.max_num_seqs, self.prompt_tokens = costs, max_num_seqs, prompt_tokens
        self.waiting: list[tuple[Lease, np.ndarray]] = []
        self.rows: list[_Sequence] = []
        self.remaining = np.zeros(0, dtype=np.int64)
        self.steps = 0
        self.versions: list[tuple[int, int]] = [(0, 0)]  # (first step, version) changes
        self.version = 0

    def add(self, lease: Lease, lengths: np.ndarray) -> None:
        self.waiting.append((lease, lengths))

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def free_slots(self) -> int:
        return self.max_num_seqs - len(self.rows) - sum(len(n) for _, n in self.waiting)

    def set_version(self, version: int) -> None:
        self.version = version
        self.versions.append((self.steps, version))

    def advance(self, budget_s: float) -> tuple[float, list[tuple[_Sequence, np.ndarray]]]:
        """Admit what fits (prefill), then decode until ``budget_s`` modelled seconds are used
        or the engine is empty. Returns the time used and the finished sequences with the
        policy version of each of their tokens."""
        elapsed, finished = 0.0, []
        while self.waiting and len(self.waiting[0][1]) <= self.max_num_seqs - len(self.rows):
            lease, lengths = self.waiting.pop(0)
            elapsed += self.costs.prefill_s(self.prompt_tokens)
            self.rows += [_Sequence(lease, i, int(n), self.steps) for i, n in enumerate(lengths)]
            self.remaining = np.concatenate([self.remaining, lengths])
        while self.rows and elapsed < budget_s:
            step_s = self.costs.decode_s(len(self.rows))
            # Decode until the next sequence finishes or the budget ends, whichever is first.
            n = int(min(self.remaining.min(), max(1, (budget_s - elapsed) // step_s)))
            self.remaining -= n
            self.steps += n
            elapsed += n * step_s
            done = self.remaining <= 0
            if done.any():
                finished += [(row, self._token_versions(row)) for row, d in zip(self.rows, done) if d]
                self.rows = [row for row, d in zip(self.rows, done) if not d]
                self.remaining = self.remaining[~done]
        return elapsed, finished

    def _token_versions(self, row: _Sequence) -> np.ndarray:
        """Token j was sampled at step start_step + j by the version in force then."""
        starts = np.array([s for s, _ in self.versions])
        values = np.array([v for _, v in self.versions], dtype=np.int32)
        at = np.searchsorted(starts, row.start_step + np.arange(row.length), side="right") - 1
        return values[at]


class ModelledActor:
    """actors/actor.py's loop with a modelled engine and a modelled weight receiver."""

    def __init__(self, actor_id: str, cfg: BenchRootConfig, control: str, workload: Workload, clock: Clock):
        self.actor_id, self.cfg, self.workload, self.clock = actor_id, cfg, workload, clock
        self.costs = Costs(cfg.cost)
        self.engine = ModelledEngine(self.costs, cfg.cost.max_num_seqs, cfg.cost.prompt_tokens)
        t = cfg.transport
        self.client = ActorClient(
            control, actor_id, high_water_mark=t.high_water_mark, max_message_mb=t.max_message_mb
        )
        self.sync = cfg.rollout.max_staleness == 0
        self.pending: dict[int, list[tuple[_Sequence, np.ndarray]]] = {}
        self.outbox: set[int] = set()
        self.request_out = False
        self.next_request_at = 0.0
        self.incoming: tuple[int, float, float] | None = None  # (version, ready at, receive_s)
        self.has_weights = False
        self.stopping = ""
        self.busy_until = 0.0  # modelled time at which the engine's work so far is done

    def run(self) -> None:
        try:
            self._register()
            chunk_s = _CHUNK_REAL_S / self.clock.scale
            while not self.stopping:
                self._handle_control(0.0 if self.engine.has_work() else 0.05)
                self._maybe_swap_weights()
                if self.stopping or not self.has_weights:
                    continue
                self._maybe_request_leases()
                if self.engine.has_work():
                    self.busy_until = max(self.busy_until, self.clock.now())
                    elapsed, finished = self.engine.advance(chunk_s)
                    self.busy_until += elapsed
                    self.clock.sleep_until(self.busy_until)
                    for row, versions in finished:
                        self._collect(row, versions)
        finally:
            self.client.close()

    def _register(self) -> None:
        self.client.send(Register(self.actor_id, SCHEMA_VERSION, os.getpid(), socket.gethostname()))
        reply = self.client.recv(_START_TIMEOUT_S)
        if not isinstance(reply, Registered):
            raise RuntimeError(f"modelled actor {self.actor_id}: no registration reply ({reply!r})")
        self.client.connect_trajectory(reply.trajectory_endpoint)

    def _handle_control(self, timeout_s: float) -> None:
        msg = self.client.recv(timeout_s)
        while msg is not None:
            match msg:
                case LeaseGrant(leases=leases):
                    self.request_out = False
                    for lease in leases:
                        prompt = Prompt(lease.prompt_id, lease.question, lease.answer)
                        self.engine.add(lease, self.workload.lengths(prompt, lease.seq))
                        self.pending[lease.lease_id] = []
                case Wait():
                    self.request_out = False
                    self.next_request_at = time.monotonic() + _RETRY_REAL_S
                case Ack(lease_ids=ids):
                    self.outbox.difference_update(ids)
                case WeightHeader(version=version):
                    # The broadcast runs while generation goes on; only the swap pauses it.
                    receive_s = self.costs.broadcast_s()
                    self.incoming = (version, self.clock.now() + receive_s, receive_s)
                case Bye(reason=reason):
                    self.stopping = reason or "bye"
            msg = self.client.recv(0.0)

    def _maybe_swap_weights(self) -> None:
        if self.incoming is None or self.clock.now() < self.incoming[1]:
            return
        version, _, receive_s = self.incoming
        pause_s = self.cfg.cost.swap_ms / 1000
        self.busy_until = max(self.busy_until, self.clock.now()) + pause_s
        self.clock.sleep_until(self.busy_until)
        self.engine.set_version(version)
        self.incoming, self.has_weights = None, True
        self.client.send(SyncDone(self.actor_id, version, receive_s, pause_s))

    def _maybe_request_leases(self) -> None:
        if self.request_out or time.monotonic() < self.next_request_at:
            return
        g = self.cfg.cost.group_size
        if self.sync:
            if self.engine.has_work() or self.outbox or self.pending or self.incoming:
                return
            n = self.engine.max_num_seqs // g
        else:
            n = min(self.engine.free_slots() // g, self.cfg.rollout.prompts_per_request)
        if n >= 1:
            self.client.send(LeaseRequest(self.actor_id, n, self.engine.version))
            self.request_out = True

    def _collect(self, row: _Sequence, versions: np.ndarray) -> None:
        done = self.pending[row.lease.lease_id]
        done.append((row, versions))
        if len(done) < self.cfg.cost.group_size:
            return
        del self.pending[row.lease.lease_id]
        lease = row.lease
        rewards = self.workload.rewards(lease.prompt_id, lease.seq)
        responses = [
            Response(
                token_ids=np.full(r.length, 3 + r.index % 200, dtype=np.int32),
                logprobs=np.full(r.length, -1.0, dtype=np.float32),
                versions=v.astype(np.int32),
                reward=rewards[r.index],
                finish_reason=FinishReason.STOP,
            )
            for r, v in sorted(done, key=lambda d: d[0].index)
        ]
        prompt = np.full(self.cfg.cost.prompt_tokens, 3, dtype=np.int32)
        self.outbox.add(lease.lease_id)
        group = TrajectoryGroup(lease.lease_id, lease.prompt_id, self.actor_id, prompt, responses)
        self.client.push(group, timeout_s=self.cfg.transport.request_timeout_s)


class ModelledLearner:
    """learners/learner.py's two threads with a modelled trainer and weight broadcast."""

    def __init__(self, cfg: BenchRootConfig, run_dir: Path, clock: Clock) -> None:
        self.cfg, self.clock, self.costs = cfg, clock, Costs(cfg.cost)
        prompts, _ = build_datasets(cfg.data, seed=cfg.seed)
        self.coordinator = Coordinator(
            PromptSource(prompts, seed=cfg.seed),
            batch_groups=cfg.cost.batch_groups,
            max_staleness=cfg.rollout.max_staleness,
            lease_timeout_s=1e9,  # nothing dies here
        )
        t = cfg.transport
        self.server = LearnerServer(
            "127.0.0.1", 0, 0, high_water_mark=t.high_water_mark, max_message_mb=t.max_message_mb
        )
        self.metrics = MetricsWriter(run_dir, tensorboard=False)
        self.actors: set[str] = set()
        self.buffer: queue.Queue[tuple[int, TrajectoryGroup]] = queue.Queue()
        self.outgoing: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.pauses: list[float] = []
        self.version, self.gen_tokens = 0, 0
        self.stop = threading.Event()
        self._service = threading.Thread(target=self._serve, name="modelled-learner-service", daemon=True)

    def run(self) -> None:
        c = self.cfg.cost
        self._service.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while len(self.actors) < c.num_actors:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.actors)} of {c.num_actors} modelled actors registered")
            time.sleep(0.01)
        sync_s = self._publish()
        start = self.clock.now()
        last = {"time": start, "tokens": 0}
        self._log(0, {"time/weight_sync_s": sync_s}, start, last)
        while self.version < c.max_steps:
            wait_start = self.clock.now()
            batch = sorted((self._next_group() for _ in range(c.batch_groups)), key=lambda b: b[0])
            train_start = self.clock.now()
            metrics = {"time/wait_s": train_start - wait_start} | self._train([g for _, g in batch])
            metrics["time/train_s"] = self.clock.now() - train_start
            if self.version % self.cfg.trainer.sync_every == 0 or self.version == c.max_steps:
                metrics["time/weight_sync_s"] = self._publish()
            self._log(self.version, metrics, start, last)

    def _next_group(self) -> tuple[int, TrajectoryGroup]:
        try:
            return self.buffer.get(timeout=_START_TIMEOUT_S)
        except queue.Empty:
            raise TimeoutError(f"no modelled trajectory arrived for {_START_TIMEOUT_S:.0f} s") from None

    def _train(self, groups: list[TrajectoryGroup]) -> dict[str, Any]:
        lengths = [r.length for g in groups for r in g.responses]
        tokens = sum(lengths) + len(lengths) * self.cfg.cost.prompt_tokens
        intended = self.costs.train_s(tokens)
        self.clock.sleep(intended)
        staleness = [self.version - g.min_version for g in groups]
        rewards = [r.reward for g in groups for r in g.responses]
        self.version += 1
        return {
            "train/tokens": float(tokens),
            "time/train_intended_s": intended,
            "reward/mean": sum(rewards) / len(rewards),
            "rollout/staleness_mean": sum(staleness) / len(staleness),
            "rollout/staleness_max": max(staleness),
            "rollout/response_len_mean": sum(lengths) / len(lengths),
            "rollout/trained_leases": [g.lease_id for g in groups],
            "rollout/trained_staleness": staleness,
        }

    def _publish(self) -> float:
        c = self.cfg.cost
        numel = int(c.weight_gb * 1e9 / 2)  # bf16
        header = WeightHeader(
            self.version, 0, ["modelled"], [[numel]], ["bfloat16"], [("bfloat16", numel, 0, 1)]
        )
        start = self.clock.now()
        for actor_id in sorted(self.actors):
            self.outgoing.put((actor_id, header))
        self.clock.sleep(self.costs.broadcast_s())
        self.coordinator.set_version(self.version)
        return self.clock.now() - start

    def _log(self, step: int, metrics: dict[str, Any], start: float, last: dict[str, float]) -> None:
        now = self.clock.now()
        pauses, self.pauses = self.pauses, []
        row = {
            "version": self.version,
            "time_s": now - start,
            "throughput/gen_tokens_per_s": (self.gen_tokens - last["tokens"]) / max(now - last["time"], 1e-9),
        } | {f"leases/{k}": v for k, v in self.coordinator.counts.items()}
        if pauses:
            row["time/gen_pause_s"] = max(pauses)
        self.metrics.write(step, row | metrics)
        last.update(time=now, tokens=self.gen_tokens)

    def close(self) -> None:
        for actor_id in sorted(self.actors):
            self.outgoing.put((actor_id, Bye("learner", "modelled run finished")))
        deadline = time.monotonic() + 2.0
        while not self.outgoing.empty() and time.monotonic() < deadline and self._service.is_alive():
            time.sleep(0.01)
        self.stop.set()
        self._service.join(timeout=5.0)
        self.server.close()
        self.metrics.close()

    def _serve(self) -> None:
        while not self.stop.is_set():
            control, trajectories = self.server.poll(0.01)
            for actor_id, msg in control:
                match msg:
                    case Register():
                        self.actors.add(actor_id)
                        self.server.send(
                            actor_id,
                            Registered(
                                actor_id, self.version, {}, "modelled", self.server.trajectory_endpoint
                            ),
                        )
                    case LeaseRequest(n=n):
                        leases = self.coordinator.grant(actor_id, n, msg.engine_version)
                        self.server.send(
                            actor_id, LeaseGrant(leases) if leases else Wait(_RETRY_REAL_S, "admission")
                        )
                    case SyncDone(pause_s=pause_s):
                        self.pauses.append(pause_s)
            for msg in trajectories:
                if isinstance(msg, TrajectoryGroup):
                    self._on_trajectory(msg)
            while not self.outgoing.empty():
                self.server.send(*self.outgoing.get_nowait())

    def _on_trajectory(self, msg: TrajectoryGroup) -> None:
        check_group(msg, vocab_size=_VOCAB, max_version=self.version, group_size=self.cfg.cost.group_size)
        rewards = [r.reward for r in msg.responses]
        informative = not self.cfg.cost.dynamic_sampling or max(rewards) > min(rewards)
        seq = self.coordinator.lease_sequence(msg.lease_id)
        outcome = self.coordinator.finish(msg.lease_id, accepted=informative)
        if outcome in (Outcome.ACCEPTED, Outcome.FILTERED):
            self.gen_tokens += sum(r.length for r in msg.responses)
        if outcome is Outcome.ACCEPTED and seq is not None:
            self.buffer.put((seq, msg))
        self.server.send(msg.actor_id, Ack([msg.lease_id]))
