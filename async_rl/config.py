"""Structured configuration: one dataclass per component, registered in Hydra's ConfigStore.

YAML files in ``configs/`` only choose and override values. Every command takes Hydra
overrides (``rollout.max_staleness=4 algorithm.eps_high=0.28``). A misspelled key or a
wrong type fails in Hydra with a message that names the key; a value out of range fails in
``__post_init__`` with a ``ValueError`` that names the field and the fix.

The entry point converts the composed config to these typed objects once and passes the
sub-configs down; nothing below the CLI sees a DictConfig.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _ByValue(enum.EnumMeta):
    """OmegaConf looks enum members up by name; let users write the lowercase value
    (``mode=sync``, ``data.kind=jsonl``) while the code keeps UPPER_CASE names. Error messages
    list the values, as users type them (``_as_typed``)."""

    def __getitem__(cls, name: str) -> Any:  # type: ignore[override]
        return super().__getitem__(name.upper())


def _by_value_enums() -> list[type[enum.Enum]]:
    """Every enum of the configs (bench's too, once imported)."""
    found, todo = [], list(enum.Enum.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if isinstance(cls, _ByValue):
            found.append(cls)
    return found


# OmegaConf's message for a bad enum value names the members: "expected one of [SYNC, ASYNC]".
_ONE_OF = re.compile(r"expected one of \[([A-Za-z0-9_, ]*)\]")


def _as_typed(text: str) -> str:
    """``text`` with each list of enum member names replaced by the values a user types."""

    def values(match: re.Match[str]) -> str:
        names = [n.strip() for n in match.group(1).split(",") if n.strip()]
        cls = next((c for c in _by_value_enums() if list(c.__members__) == names), None)
        typed = [str(cls.__members__[n].value) if cls else n.lower() for n in names]
        return f"expected one of [{', '.join(typed)}]"

    return _ONE_OF.sub(values, text)


class Mode(enum.Enum, metaclass=_ByValue):
    ASYNC = "async"  # generation never stops; staleness bounded by rollout.max_staleness
    SYNC = "sync"  # generate a batch, train, sync, repeat (max_staleness forced to 0)


class DataKind(enum.Enum, metaclass=_ByValue):
    ARITHMETIC = "arithmetic"  # seeded synthetic a+b task (the embedded default)
    LONG_TAIL = "long_tail"  # arithmetic with a long-tailed response-length distribution
    JSONL = "jsonl"  # question/answer rows from data.path / data.eval_path
    PARQUET = "parquet"  # same, parquet files (needs the [parquet] extra)
    GSM8K = "gsm8k"  # the GSM8K jsonl files in data.path (a directory with train/test.jsonl)
    GUESS = "guess"  # hidden numbers 1..data.guess_max for env.kind=guess


class Template(enum.Enum, metaclass=_ByValue):
    AUTO = "auto"  # the tokenizer's chat template if it has one, else verbatim
    NONE = "none"  # the question verbatim


class EngineKind(enum.Enum, metaclass=_ByValue):
    TORCH = "torch"  # built-in engine, any torch device
    SGLANG = "sglang"  # SGLang (GPU only, [sglang] extra)


class ResumeKV(enum.Enum, metaclass=_ByValue):
    KEEP = "keep"  # in-flight sequences continue on the cache the old weights wrote
    RECOMPUTE = "recompute"  # re-prefill prompt + generated tokens with the new weights


class AdvantageKind(enum.Enum, metaclass=_ByValue):
    GROUP = "group"  # GRPO/DAPO: (r - group mean) / group std
    RLOO = "rloo"  # leave-one-out baseline
    BATCH = "batch"  # REINFORCE++: batch-normalised
    BASIS = "basis"  # per-prompt history shrunk toward the batch (works at group_size 1)
    KERNEL = "kernel"  # kernel-weighted rewards of nearby prompts (policy hidden states)
    DIRECT = "direct"  # step-level advantages from a separately trained critic


class SyncBackend(enum.Enum, metaclass=_ByValue):
    AUTO = "auto"  # nccl when the learner is on CUDA, else gloo
    GLOO = "gloo"
    NCCL = "nccl"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    # A local Hugging Face causal-LM directory. Empty: the embedded tiny Qwen2 model with a
    # character-level tokenizer, built on first use into the user's cache directory.
    path: str = ""
    # Seed of the embedded model's random initialisation (ignored with model.path).
    init_seed: int = 0
    # Torch dtype of the engines' weights, and of the learner's compute (autocast): float32 |
    # bfloat16 | float16. The learner keeps float32 master weights and optimizer state whatever
    # this says (an update of lr 1e-6 is below bfloat16's resolution for most weights), and
    # casts them to this dtype as it broadcasts them.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"model.dtype={self.dtype!r}: use float32, bfloat16 or float16",
        )


@dataclass
class DataConfig:
    kind: DataKind = DataKind.ARITHMETIC
    # Training prompts (jsonl/parquet file, or the GSM8K directory). Unused for arithmetic.
    path: str = ""
    # Held-out prompts for eval/accuracy. Empty for jsonl/parquet: no evaluation.
    eval_path: str = ""
    template: Template = Template.AUTO
    # Column names of the question and the reference answer in jsonl/parquet rows.
    question_key: str = "question"
    answer_key: str = "answer"
    # Synthetic tasks: number of prompts drawn for the train pool and the held-out split.
    train_size: int = 20000
    eval_size: int = 200
    # Synthetic tasks: operand digits (1..4).
    digits: int = 2
    # Arithmetic task: its operators, a subset of "+-*" ("-" can give negative answers).
    ops: str = "+"
    # Arithmetic task: fraction of the problems held out for eval (a problem and its commuted
    # twin go to the same split). 1-digit problems number 100 per operator: hold out more.
    eval_fraction: float = 0.1
    # Every question (all kinds) is put into this text at its {question}: "What is {question}?"
    # turns "12+34=" into "What is 12+34=?". The chat template, if any, wraps the result.
    prompt_format: str = "{question}"
    # Evaluate on at most this many held-out prompts (0 = all).
    eval_limit: int = 200
    # Guess task: hidden numbers are 1..guess_max (the eval set holds each number once).
    guess_max: int = 15

    def __post_init__(self) -> None:
        _check(1 <= self.digits <= 4, f"data.digits={self.digits}: use 1..4")
        _check(
            bool(self.ops) and set(self.ops) <= set("+-*") and len(set(self.ops)) == len(self.ops),
            f"data.ops={self.ops!r}: use distinct operators from '+-*' (e.g. '+*')",
        )
        _check(
            0 < self.eval_fraction < 1, f"data.eval_fraction={self.eval_fraction}: use a fraction in (0, 1)"
        )
        _check(
            self.prompt_format.count("{question}") == 1,
            f"data.prompt_format={self.prompt_format!r}: must contain {{question}} exactly once",
        )
        _check(self.eval_size >= 1, f"data.eval_size={self.eval_size}: must be >= 1")
        _check(self.guess_max >= 2, f"data.guess_max={self.guess_max}: must be >= 2")
        _check(self.eval_limit >= 0, f"data.eval_limit={self.eval_limit}: must be >= 0 (0 = all)")
        if self.kind in (DataKind.JSONL, DataKind.PARQUET, DataKind.GSM8K):
            _check(
                bool(self.path),
                f"data.kind={self.kind.value} needs data.path=FILE (the training prompts)",
            )


@dataclass
class EnvConfig:
    # The environment episodes run in (async_rl/env.py): math (one turn, scored by math_reward),
    # calculator (tool calls <calc>EXPR</calc>), guess (number guessing), or a registered one.
    kind: str = "math"
    # A Python module to import first, for environments registered outside async-rl
    # (``env.module=my_envs``): it must be importable by the learner and by every actor.
    module: str = ""
    # Policy turns per episode at most (multi-turn environments; math always has one).
    max_turns: int = 4
    # Tokens of one observation at most (longer ones are cut). Observations count against
    # rollout.max_new_tokens, the budget of the whole response.
    max_observation_tokens: int = 64
    # calculator: fraction of the warm start's demonstrations that use the tool (the rest
    # answer directly), so the warm-started policy knows the syntax but not yet when it pays.
    demo_tool_frac: float = 0.5

    def __post_init__(self) -> None:
        import importlib

        from async_rl.env import env_names

        if self.module:
            try:
                importlib.import_module(self.module)
            except ImportError as err:
                raise ValueError(f"env.module={self.module!r} cannot be imported: {err}") from None
        _check(
            self.kind in env_names(),
            f"env.kind={self.kind!r}: no such environment; choose one of {env_names()}",
        )
        _check(self.max_turns >= 1, f"env.max_turns={self.max_turns}: must be >= 1")
        _check(
            self.max_observation_tokens >= 1,
            f"env.max_observation_tokens={self.max_observation_tokens}: must be >= 1",
        )
        _check(
            0.0 <= self.demo_tool_frac <= 1.0,
            f"env.demo_tool_frac={self.demo_tool_frac}: use a fraction in [0, 1]",
        )


@dataclass
class RolloutConfig:
    # Generator actor processes started by `async-rl train`.
    num_actors: int = 1
    # Responses sampled per prompt (G). DAPO uses 16; 8 suits the tiny model.
    group_size: int = 8
    # A group is trained at most this many policy versions after its lease was granted.
    # 0 with mode=sync is the synchronous baseline.
    max_staleness: int = 1
    # Response length cap in tokens; a response that reaches it finishes with "length".
    max_new_tokens: int = 8
    # Sampling temperature (DAPO: 1.0) and nucleus mass (1.0 = off).
    temperature: float = 1.0
    top_p: float = 1.0
    engine: EngineKind = EngineKind.TORCH
    # Sequences in flight per engine (continuous batching width).
    max_num_seqs: int = 128
    # When new weights arrive mid-sequence: continue on the old KV cache (keep) or
    # re-prefill prompt + generated tokens with the new weights (recompute).
    resume_kv: ResumeKV = ResumeKV.KEEP
    # Prompts an actor asks for per lease request.
    prompts_per_request: int = 8
    # A lease not completed in this many seconds is re-issued to another actor.
    lease_timeout_s: float = 120.0
    # torch CPU threads per actor process (0 = share the machine's cores evenly).
    num_threads: int = 0
    # rollout.engine=sglang only. Empty: an in-process sglang.Engine per actor; else the
    # http://HOST:PORT of an SGLang server that serves this actor alone.
    sglang_url: str = ""
    # In-process SGLang: tensor-parallel size and the static GPU memory fraction.
    sglang_tp_size: int = 1
    sglang_mem_fraction: float = 0.7
    # Timeout of one HTTP /generate call (s).
    sglang_timeout_s: float = 600.0
    # The actor forwards received weights to SGLang over its own group: backend
    # ("" = nccl on CUDA, gloo on CPU) and the actor address SGLang connects to.
    sglang_relay_backend: str = ""
    sglang_relay_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        _check(self.num_actors >= 1, f"rollout.num_actors={self.num_actors}: must be >= 1")
        _check(self.group_size >= 1, f"rollout.group_size={self.group_size}: must be >= 1")
        _check(self.max_staleness >= 0, f"rollout.max_staleness={self.max_staleness}: must be >= 0")
        _check(self.max_new_tokens >= 1, f"rollout.max_new_tokens={self.max_new_tokens}: must be >= 1")
        _check(self.temperature > 0, f"rollout.temperature={self.temperature}: must be > 0")
        _check(0 < self.top_p <= 1, f"rollout.top_p={self.top_p}: must be in (0, 1]")
        _check(self.max_num_seqs >= 1, f"rollout.max_num_seqs={self.max_num_seqs}: must be >= 1")
        _check(self.prompts_per_request >= 1, "rollout.prompts_per_request: must be >= 1")
        _check(self.lease_timeout_s > 0, "rollout.lease_timeout_s: must be > 0")
        _check(self.sglang_tp_size >= 1, "rollout.sglang_tp_size: must be >= 1")
        _check(0 < self.sglang_mem_fraction < 1, "rollout.sglang_mem_fraction: must be in (0, 1)")
        _check(
            self.sglang_relay_backend in ("", "gloo", "nccl"),
            f"rollout.sglang_relay_backend={self.sglang_relay_backend!r}: use gloo, nccl or leave empty",
        )


@dataclass
class TrainerConfig:
    # Groups (prompts) per optimizer step.
    batch_groups: int = 16
    # Optimizer steps of the RL phase.
    max_steps: int = 200
    # Seconds of RL after which the run stops as if max_steps were reached (0 = no limit):
    # the step running then is finished, evaluated and saved.
    max_time_s: float = 0.0
    # AdamW learning rate and weight decay.
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Gradient-norm clip (0 = off).
    grad_clip: float = 1.0
    # Mini-batches per step (each one optimizer step against the same proximal policy).
    mini_batches: int = 1
    # Padded tokens (rows x longest row) per forward/backward pass of the learner; a mini-batch
    # runs as several such micro-batches whose gradients accumulate (the loss stays the token
    # mean of the whole mini-batch). Bounds learner memory whatever the batch size; the warm
    # start, evaluation and proximal passes use the same budget. A longer single row runs alone.
    micro_batch_tokens: int = 4096
    # Recompute each transformer block's activations in backward instead of keeping them
    # (Hugging Face gradient checkpointing): less memory per token, about a third more compute.
    gradient_checkpointing: bool = False
    # Autocast the learner's forward and backward to this dtype ("" = off, "bfloat16",
    # "float16"); the weights and the optimizer stay in model.dtype. Meant for CUDA; on CPU
    # bfloat16 autocast is slower than float32 unless the CPU has bf16 instructions.
    autocast_dtype: str = ""
    # Broadcast weights every this many steps.
    sync_every: int = 1
    # Evaluate greedy accuracy on the held-out split every this many steps (0 = never).
    eval_every: int = 10
    # Checkpoint every this many steps (0 = only at the end).
    checkpoint_every: int = 0
    # Checkpoints kept in run_dir/checkpoints, the newest ones (0 = keep all). 3 bounds the disk
    # a long run takes (a 7B checkpoint is ~84 GB: float32 weights and AdamW's two moments) and
    # still leaves two to go back to if the newest turns out bad. A save writes its checkpoint
    # before deleting the oldest, so keep_checkpoints + 1 are on disk meanwhile.
    keep_checkpoints: int = 3
    # Supervised warm-start steps on the reference answers before RL (arithmetic tasks).
    warmup_sft_steps: int = 0
    warmup_sft_batch: int = 64
    warmup_sft_lr: float = 3e-3
    # Stop the warm start early once greedy accuracy on 200 training prompts (checked every
    # 100 steps) reaches this (0 = always run warmup_sft_steps).
    warmup_sft_target: float = 0.0
    # Learner device: "cpu", "cuda", "cuda:1", or "auto".
    device: str = "auto"
    # torch CPU threads in the learner (0 = share the machine's cores evenly).
    num_threads: int = 0
    # Learner processes (>= 1): FSDP2 data parallel over this many devices (learners/fsdp.py);
    # the learner process is rank 0 and starts the others. On CUDA, rank r uses cuda:r.
    num_devices: int = 1
    # Deadline (s) for the extra learner ranks to start (model load, rendezvous) and of every
    # collective among the learner ranks.
    device_timeout_s: float = 300.0
    # Stop with an error if no trajectory arrives for this long.
    idle_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _check(self.batch_groups >= 1, f"trainer.batch_groups={self.batch_groups}: must be >= 1")
        _check(self.max_steps >= 0, f"trainer.max_steps={self.max_steps}: must be >= 0")
        _check(self.max_time_s >= 0, f"trainer.max_time_s={self.max_time_s}: must be >= 0 (0 = no limit)")
        _check(self.lr > 0, f"trainer.lr={self.lr}: must be > 0")
        _check(self.mini_batches >= 1, f"trainer.mini_batches={self.mini_batches}: must be >= 1")
        _check(
            self.mini_batches <= self.batch_groups,
            f"trainer.mini_batches={self.mini_batches} > trainer.batch_groups={self.batch_groups}",
        )
        _check(self.sync_every >= 1, f"trainer.sync_every={self.sync_every}: must be >= 1")
        _check(
            self.micro_batch_tokens >= 1,
            f"trainer.micro_batch_tokens={self.micro_batch_tokens}: must be >= 1 (padded tokens per pass)",
        )
        _check(
            self.autocast_dtype in ("", "bfloat16", "float16"),
            f"trainer.autocast_dtype={self.autocast_dtype!r}: use bfloat16, float16 or leave empty (off)",
        )
        _check(self.eval_every >= 0, f"trainer.eval_every={self.eval_every}: must be >= 0")
        _check(self.checkpoint_every >= 0, "trainer.checkpoint_every: must be >= 0")
        _check(
            self.keep_checkpoints >= 0,
            f"trainer.keep_checkpoints={self.keep_checkpoints}: must be >= 0 (0 = keep all)",
        )
        _check(self.warmup_sft_steps >= 0, "trainer.warmup_sft_steps: must be >= 0")
        _check(0 <= self.warmup_sft_target <= 1, "trainer.warmup_sft_target: must be in [0, 1]")
        _check(self.num_devices >= 1, f"trainer.num_devices={self.num_devices}: must be >= 1")
        _check(self.device_timeout_s > 0, f"trainer.device_timeout_s={self.device_timeout_s}: must be > 0")
        if self.num_devices > 1:
            _check(
                self.batch_groups >= self.mini_batches * self.num_devices,
                f"trainer.num_devices={self.num_devices} needs a group per device in every mini-batch: "
                f"raise trainer.batch_groups={self.batch_groups} to >= trainer.mini_batches * num_devices "
                f"= {self.mini_batches * self.num_devices}",
            )
            _check(
                self.device in ("auto", "cpu", "cuda"),
                f"trainer.device={self.device} with trainer.num_devices={self.num_devices}: use auto, cpu or "
                "cuda (rank r takes cuda:r; choose the GPUs with CUDA_VISIBLE_DEVICES)",
            )


@dataclass
class AlgorithmConfig:
    # Decoupled clip range (DAPO): ratio clipped to [1 - eps_low, 1 + eps_high].
    eps_low: float = 0.2
    eps_high: float = 0.28
    # Truncation of the behaviour -> proximal importance weight.
    is_cap: float = 2.0
    # Drop groups whose rewards are all equal (no signal) and lease more prompts instead.
    dynamic_sampling: bool = True
    # Soft overlong punishment: linear penalty over the last `overlong_buffer` tokens
    # before rollout.max_new_tokens (0 = off), reaching -overlong_penalty at the cap.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # Advantage estimator (docs/estimators.md). group is DAPO's; basis and kernel also work
    # with rollout.group_size=1; direct needs a critic (`async-rl critic`).
    advantage: AdvantageKind = AdvantageKind.GROUP
    # kernel: bandwidth rule ("cv": leave-one-out choice among multiples of the median
    # distance; "median": the median heuristic) or a fixed number; history size (samples).
    kernel_bandwidth: str = "cv"
    kernel_history: int = 4096
    # basis: shrinkage pseudo-count toward the batch mean (0 = estimate from the data),
    # per-step decay of the history, and online calibration of the batch drift.
    basis_shrinkage: float = 0.0
    basis_decay: float = 1.0
    basis_calibrate: bool = True
    # direct: text that ends a reasoning step, and the directory `async-rl critic` wrote.
    step_delimiter: str = "\n"
    critic_dir: str = ""

    def __post_init__(self) -> None:
        _check(0 <= self.eps_low < 1, f"algorithm.eps_low={self.eps_low}: must be in [0, 1)")
        _check(self.eps_high >= 0, f"algorithm.eps_high={self.eps_high}: must be >= 0")
        _check(self.is_cap >= 1, f"algorithm.is_cap={self.is_cap}: must be >= 1")
        _check(self.overlong_buffer >= 0, "algorithm.overlong_buffer: must be >= 0")
        _check(self.kernel_history >= 1, "algorithm.kernel_history: must be >= 1")
        _check(self.basis_shrinkage >= 0, "algorithm.basis_shrinkage: must be >= 0 (0 = estimate)")
        _check(0 < self.basis_decay <= 1, "algorithm.basis_decay: must be in (0, 1]")
        _check(bool(self.step_delimiter), "algorithm.step_delimiter: must not be empty")
        if self.kernel_bandwidth not in ("cv", "median"):
            try:
                ok = float(self.kernel_bandwidth) > 0
            except ValueError:
                ok = False
            _check(
                ok, f"algorithm.kernel_bandwidth={self.kernel_bandwidth!r}: use cv, median or a number > 0"
            )
        if self.advantage is AdvantageKind.DIRECT:
            _check(
                bool(self.critic_dir),
                "algorithm.advantage=direct needs algorithm.critic_dir=DIR, the output of `async-rl critic`",
            )

    def kernel_bandwidth_value(self) -> str | float:
        return (
            self.kernel_bandwidth
            if self.kernel_bandwidth in ("cv", "median")
            else float(self.kernel_bandwidth)
        )


@dataclass
class RayConfig:
    """``async-rl launch``: where the roles run on a Ray cluster."""

    # Ray cluster to join: "auto" (the cluster this machine is part of), HOST:6379 or
    # ray://HOST:10001. Empty: start a local Ray instance for this run and stop it afterwards.
    address: str = ""
    # Local instance only: logical CPUs (0 = what the roles reserve, rounded up).
    num_cpus: int = 0
    # Reservations per role, in Ray logical units: a scheduling share, not a thread count
    # (threads: trainer.num_threads, rollout.num_threads). GPUs > 0 put the role on CUDA.
    learner_num_cpus: float = 1.0
    learner_num_gpus: float = 0.0
    actor_num_cpus: float = 0.5
    actor_num_gpus: float = 0.0
    # Restarts of a dead actor process (-1 = unlimited). The learner is never restarted.
    max_restarts: int = 3
    # Deadline for placing a role and for the learner's endpoints.json (s).
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("learner_num_cpus", "learner_num_gpus", "actor_num_cpus", "actor_num_gpus"):
            _check(getattr(self, name) >= 0, f"ray.{name}: must be >= 0")
        _check(self.num_cpus >= 0, "ray.num_cpus: must be >= 0")
        _check(self.max_restarts >= -1, "ray.max_restarts: must be >= -1 (-1 = unlimited)")
        _check(self.start_timeout_s > 0, "ray.start_timeout_s: must be > 0")


@dataclass
class LearnerConfig:
    # Write every trained group to a trajectory store (the training data of `async-rl critic`).
    save_trajectories: bool = False
    # Where the store goes (empty: <run_dir>/trajectories).
    trajectory_dir: str = ""
    # Restart from the latest checkpoint in run_dir (model, optimizer, version, coordinator
    # state), on the endpoints of endpoints.json; an error if run_dir has no checkpoint.
    resume: bool = False


@dataclass
class TransportConfig:
    # Address the learner binds to and tells actors to connect to: 127.0.0.1 for one
    # machine, an address of the learner's machine that the actors can reach for a cluster.
    host: str = "127.0.0.1"
    # Ports (0 = pick a free one; the choice is written to endpoints.json).
    control_port: int = 0
    trajectory_port: int = 0
    store_port: int = 0
    # Bounded queues (messages) on every socket.
    high_water_mark: int = 1000
    # Largest accepted message (MiB); larger ones are dropped by ZMQ before decoding.
    max_message_mb: int = 64
    # Receive timeout of a request/reply round trip (s). An actor whose lease request got no
    # answer within it asks again, and re-pushes any group not acknowledged within it.
    request_timeout_s: float = 30.0
    # Actor heartbeat period (s).
    heartbeat_s: float = 2.0
    # An actor that hears nothing from the learner for this long (s; the learner answers
    # every heartbeat) takes it for gone, reconnects and registers again, with backoff.
    learner_timeout_s: float = 30.0
    # CURVE authentication and encryption of both channels: a key directory written by
    # `async-rl keys out=DIR`. Empty: off. The learner admits only actors whose public key is
    # in DIR/authorized_clients; actors need keys=DIR (server.key, client.key_secret).
    curve_keys_dir: str = ""

    def __post_init__(self) -> None:
        _check(self.heartbeat_s > 0, f"transport.heartbeat_s={self.heartbeat_s}: must be > 0")
        _check(
            self.learner_timeout_s > self.heartbeat_s,
            f"transport.learner_timeout_s={self.learner_timeout_s}: must be > transport.heartbeat_s="
            f"{self.heartbeat_s} (a few heartbeat periods, or every pause looks like a dead learner)",
        )


@dataclass
class WeightSyncConfig:
    backend: SyncBackend = SyncBackend.AUTO
    # Flat bucket size per dtype (MiB).
    bucket_mb: int = 64
    # Deadline of every collective and of group formation (s).
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check(self.bucket_mb >= 1, f"weight_sync.bucket_mb={self.bucket_mb}: must be >= 1")
        _check(self.timeout_s > 0, f"weight_sync.timeout_s={self.timeout_s}: must be > 0")


@dataclass
class Config:
    seed: int = 0
    mode: Mode = Mode.ASYNC
    # Run directory. Empty: outputs/<date>/<time> under the working directory.
    run_dir: str = ""
    # Console log level of every process.
    log_level: str = "INFO"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)

    def __post_init__(self) -> None:
        if self.mode is Mode.SYNC:
            # Sync mode is the same system with no staleness: generation waits for training.
            self.rollout.max_staleness = 0
        # Admission grants leases up to (v + max_staleness + 1) * batch_groups accepted groups,
        # v being the version last broadcast; the learner trains sync_every steps on v before
        # it broadcasts again, so step v + sync_every needs sync_every <= max_staleness + 1.
        # Past that the learner waits for groups admission never lets the actors make.
        staleness, every = self.rollout.max_staleness, self.trainer.sync_every
        sync = self.mode is Mode.SYNC
        _check(
            every <= staleness + 1,
            f"trainer.sync_every={every} > rollout.max_staleness + 1 = {staleness + 1}"
            f"{' (mode=sync sets rollout.max_staleness=0)' if sync else ''}: admission would stop "
            "granting leases before the next weight sync and training would stall; lower "
            f"trainer.sync_every to <= {staleness + 1} or raise rollout.max_staleness to >= {every - 1}"
            f"{' (with mode=async)' if sync else ''}",
        )
        _check(
            not (self.learner.resume and self.trainer.num_devices > 1),
            f"learner.resume with trainer.num_devices={self.trainer.num_devices} is not supported yet: "
            "resume with trainer.num_devices=1 (the checkpoint format is the same)",
        )


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def compose(config_name: str = "train", overrides: list[str] | None = None) -> Config:
    """Compose ``configs/<config_name>.yaml`` with ``overrides`` into a typed ``Config``.

    Raises ``ValueError`` with one readable line for a typo, a wrong type or a bad value.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not (CONFIG_DIR / f"{config_name}.yaml").is_file():
        names = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"--config-name {config_name}: no configs/{config_name}.yaml; choose one of {names}")
    overrides = _without_hydra_keys(overrides or [])
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
        obj: Any = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(f"bad configuration: {_first_line(err)}") from None
    assert isinstance(obj, Config)
    return obj


def _without_hydra_keys(overrides: list[str]) -> list[str]:
    """``overrides`` with ``hydra.run.dir=DIR`` as ``run_dir=DIR`` (the run directory, as Hydra
    users expect; the later of the two wins, as for any key). Any other of Hydra's own
    settings (``hydra.*``, ``hydra/...``) is an error: the commands compose the config without
    running a Hydra app, so such a setting would be silently ignored."""
    kept = []
    for item in overrides:
        key, sep, value = item.partition("=")
        name = key.lstrip("+~")
        if name != "hydra" and not name.startswith(("hydra.", "hydra/")):
            kept.append(item)
        elif name == "hydra.run.dir" and sep and not key.startswith("~"):
            kept.append(f"run_dir={value}")
        else:
            raise ValueError(
                f"bad configuration: {item}: of Hydra's own settings (hydra.*) async-rl takes only "
                "hydra.run.dir, as run_dir; set the run directory with run_dir=DIR"
            )
    return kept


def _first_line(err: BaseException) -> str:
    """Hydra's messages span lines (the key, the value, the schema): keep them on one, with
    enum values as the user types them."""
    text = str(err) + ("\n" + str(err.__cause__) if err.__cause__ else "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    noise = ("full_key:", "object_type=", "reference_type=")
    lines = [line for line in lines if not line.startswith(noise)] or lines
    return _as_typed(" ".join(lines)) if lines else type(err).__name__


def to_dict(cfg: Any) -> Any:
    """Plain-Python view of a config (enums as their values), for YAML and msgpack."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg


def flat_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict (``to_dict``'s) as dotted override keys: ``{"trainer.lr": 3e-4, ...}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_keys(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of ``to_dict``: validated through the same schema as the CLI."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(Config), data)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return obj


def default_threads(num_processes: int) -> int:
    """Cores per process when ``num_processes`` share this machine."""
    return max(1, (os.cpu_count() or 1) // max(1, num_processes))
