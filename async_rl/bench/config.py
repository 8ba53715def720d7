"""The bench's configuration: the train config of every run plus the ``bench``, ``sweep`` and
``cost`` sections, composed from ``configs/bench.yaml``; and the overrides that make
``async-rl train`` run exactly the train part of it."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from async_rl.config import Config, _ByValue, _check, compose, flat_keys, to_dict

# Sections of the bench config that are not part of the train config.
_BENCH_KEYS = ("bench", "sweep", "cost")


class Compute(enum.Enum, metaclass=_ByValue):
    REAL = "real"  # the configured model, real learner and actor processes
    MODELLED = "modelled"  # async_rl.bench.costmodel: real coordinator + transport, modelled compute


@dataclass
class BenchConfig:
    compute: Compute = Compute.REAL
    # Steps at the start of every run left out of the steady-state rates (pipeline fill:
    # the first batch is generated with nothing to overlap it, in either mode).
    skip_steps: int = 2
    # Generation capacity: seconds one engine generates alone, kept full, no training.
    capacity_gen_s: float = 15.0
    # Training capacity: learner steps alone on the groups buffered by the generation phase,
    # in draw order, so the batches are the sync run's (reused in order if fewer were
    # generated). 0: trainer.max_steps.
    capacity_train_steps: int = 0
    # Reuse the warm-started model of an earlier bench with the same model, data and
    # trainer.warmup_sft_* settings (kept next to the embedded model's cache).
    cache_warm_model: bool = True
    # Longest one run (one mode, or one sweep value) may take, start-up included (s).
    run_timeout_s: float = 600.0
    # The learning workload: configs/<learning_config>.yaml (default the embedded demo, the
    # arithmetic task) from its warm-started checkpoint, trained in sync and in async mode for
    # learning_s seconds of RL each; the report compares the time each needs to reach the same
    # held-out accuracy. 0: skip it.
    learning_s: float = 60.0
    learning_config: str = "train"
    # Overrides of that config, e.g. ["trainer.warmup_sft_target=0.3"] (quote the list in a shell).
    learning_overrides: list[str] = field(default_factory=list)
    # Evaluate every this many steps in the learning runs (the accuracy-against-time curve).
    learning_eval_every: int = 5

    def __post_init__(self) -> None:
        _check(self.skip_steps >= 0, f"bench.skip_steps={self.skip_steps}: must be >= 0")
        _check(self.capacity_gen_s > 0, f"bench.capacity_gen_s={self.capacity_gen_s}: must be > 0")
        _check(self.capacity_train_steps >= 0, "bench.capacity_train_steps: must be >= 0")
        _check(self.run_timeout_s > 0, f"bench.run_timeout_s={self.run_timeout_s}: must be > 0")
        _check(self.learning_s >= 0, f"bench.learning_s={self.learning_s}: must be >= 0 (0 = skip)")
        _check(self.learning_eval_every >= 1, "bench.learning_eval_every: must be >= 1")
        _check(
            self.learning_s <= 0 or self.learning_s + 120 <= self.run_timeout_s,
            f"bench.learning_s={self.learning_s:g} leaves under 120 s of bench.run_timeout_s="
            f"{self.run_timeout_s:g} for start-up: raise bench.run_timeout_s",
        )


@dataclass
class SweepConfig:
    # Values of rollout.max_staleness to run (async mode, one run each) instead of the
    # sync/async pair, e.g. [0,1,2,4,8]. 0 is the synchronous schedule. Empty: no sweep.
    max_staleness: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(
            all(v >= 0 for v in self.max_staleness),
            f"sweep.max_staleness={self.max_staleness}: values must be >= 0",
        )
        _check(
            len(set(self.max_staleness)) == len(self.max_staleness),
            f"sweep.max_staleness={self.max_staleness}: values must be distinct",
        )


@dataclass
class CostConfig:
    """``bench.compute=modelled`` only: the cluster being planned and its compute costs.
    Defaults: a 7B model in bf16 on H100-class GPUs with long reasoning responses (configured
    figures, not measurements; docs/bench.md derives them)."""

    # Generator actors (one inference engine, one GPU each) and learner GPUs (data parallel).
    num_actors: int = 64
    learner_gpus: int = 8
    # The cluster-scale workload (trainer.* and rollout.* in bench.yaml are sized for the
    # tiny CPU run): prompts per step, samples per prompt, sequences in flight per engine,
    # learner steps per mode. rollout.max_staleness, the seed and the data come from the
    # train config as for real runs.
    batch_groups: int = 128
    group_size: int = 16
    max_num_seqs: int = 256
    max_steps: int = 20
    # Decode step time (ms) = decode_base_ms + decode_per_seq_ms * sequences in the batch
    # (weights read once per step, KV cache read per sequence).
    decode_base_ms: float = 12.0
    decode_per_seq_ms: float = 0.03
    # Prefill time per prompt token (ms); the G samples of a prompt share one prefill.
    prefill_per_token_ms: float = 0.07
    # Prompt length (tokens) and the cap on response length (tokens).
    prompt_tokens: int = 256
    max_response_tokens: int = 16384
    # Response lengths: the long-tail task's reference lengths (tokens of the tiny model's
    # character tokenizer) times this, each sample jittered by a factor in [0.5, 1.5].
    length_scale: float = 128.0
    # DAPO's dynamic sampling (algorithm.dynamic_sampling is off in bench.yaml because the tiny
    # model is never right; modelled rewards vary, so about 2 / (G + 1) of groups are filtered).
    dynamic_sampling: bool = True
    # Learner time per trained token (prompt + response) on ONE GPU (ms), and per step (ms).
    train_per_token_ms: float = 0.3
    train_step_overhead_ms: float = 300.0
    # Weight broadcast (the learner blocks; actors keep generating): bytes over bandwidth
    # (GB/s) plus a latency (ms). Then each actor pauses swap_ms to swap the weights in.
    weight_gb: float = 15.2
    bandwidth_gb_s: float = 25.0
    broadcast_latency_ms: float = 50.0
    swap_ms: float = 20.0
    # Modelled seconds pass as modelled * time_scale real seconds (results are reported in
    # modelled seconds). Small enough that a run takes seconds, large enough that the sleeps
    # dominate the real coordinator and transport overhead.
    time_scale: float = 0.005

    def __post_init__(self) -> None:
        _check(self.num_actors >= 1, f"cost.num_actors={self.num_actors}: must be >= 1")
        _check(self.learner_gpus >= 1, f"cost.learner_gpus={self.learner_gpus}: must be >= 1")
        _check(self.batch_groups >= 1, f"cost.batch_groups={self.batch_groups}: must be >= 1")
        _check(
            1 <= self.group_size <= self.max_num_seqs,
            f"cost.group_size={self.group_size}: must be in [1, cost.max_num_seqs={self.max_num_seqs}]",
        )
        _check(self.max_steps >= 1, f"cost.max_steps={self.max_steps}: must be >= 1")
        _check(self.bandwidth_gb_s > 0, f"cost.bandwidth_gb_s={self.bandwidth_gb_s}: must be > 0")
        _check(self.length_scale > 0, f"cost.length_scale={self.length_scale}: must be > 0")
        _check(self.prompt_tokens >= 1, f"cost.prompt_tokens={self.prompt_tokens}: must be >= 1")
        _check(self.max_response_tokens >= 1, "cost.max_response_tokens: must be >= 1")
        _check(0 < self.time_scale <= 1, f"cost.time_scale={self.time_scale}: must be in (0, 1]")
        for name in (
            "decode_base_ms",
            "decode_per_seq_ms",
            "prefill_per_token_ms",
            "train_per_token_ms",
            "train_step_overhead_ms",
            "weight_gb",
            "broadcast_latency_ms",
            "swap_ms",
        ):
            _check(getattr(self, name) >= 0, f"cost.{name}={getattr(self, name)}: must be >= 0")


@dataclass
class BenchRootConfig(Config):
    """The train config of every run, plus the bench's own sections."""

    bench: BenchConfig = field(default_factory=BenchConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    cost: CostConfig = field(default_factory=CostConfig)


def compose_bench(overrides: list[str]) -> BenchRootConfig:
    """``configs/bench.yaml`` plus ``overrides``, typed."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="bench_base_config", node=BenchRootConfig)
    cfg = compose("bench", overrides)
    if not isinstance(cfg, BenchRootConfig):
        raise ValueError("configs/bench.yaml must list bench_base_config first in its defaults")
    return cfg


# ------------------------------------------------------------------------------ overrides


def train_overrides(cfg: Config, fixed: dict[str, Any]) -> list[str]:
    """Hydra overrides that make ``async-rl train`` (configs/train.yaml) compose exactly the
    train part of ``cfg``, with the ``fixed`` keys (dotted) set on top."""
    base = flat_keys(to_dict(compose("train", [])))
    mine = flat_keys({k: v for k, v in to_dict(cfg).items() if k not in _BENCH_KEYS})
    values = {k: v for k, v in mine.items() if base.get(k) != v} | fixed
    return [f"{key}={_hydra_value(value)}" for key, value in values.items()]


def _hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar (strings always quoted, so '1e-3' stays text)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"cannot pass {text!r} to a run as a command-line override; keep the default")
    # Hydra unescapes backslashes only before a quote or at the end of a quoted string.
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"
