"""The measurements ``async-rl bench`` makes before its runs: the shared warm-started model
and the pipeline bound (generation capacity and training capacity, each role alone).

Both run in the bench process and import the roles lazily, like every entry point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from async_rl.config import Config, default_threads, to_dict

if TYPE_CHECKING:
    from async_rl.bench.config import BenchRootConfig

logger = logging.getLogger(__name__)


def prepare_model(cfg: Config, run_dir: Path, *, cache: bool) -> tuple[str, dict[str, Any]]:
    """The model every phase of a workload uses: the configured one after
    ``trainer.warmup_sft_steps`` of supervised warm start (done once here; with ``cache``
    (``bench.cache_warm_model``) kept next to the embedded model for later benches)."""
    from async_rl.launcher import resolve_model

    base = resolve_model(cfg)
    tr = cfg.trainer
    if tr.warmup_sft_steps == 0:
        return base, {"path": base, "warmup_sft_steps": 0}
    key_src = json.dumps(
        {"model": _fingerprint_dir(Path(base)), "data": to_dict(cfg.data), "seed": cfg.seed}
        | {k: v for k, v in to_dict(tr).items() if k.startswith("warmup_sft")}
        | {"dtype": cfg.model.dtype},
        sort_keys=True,
    )
    key = hashlib.blake2b(key_src.encode(), digest_size=8).hexdigest()
    if cache:
        from async_rl.tiny_model import default_model_dir

        target = default_model_dir(cfg.model.init_seed).parent / f"bench-warm-{key}"
    else:
        target = run_dir / f"warm_model-{key}"
    info: dict[str, Any] = {"path": str(target), "warmup_sft_steps": tr.warmup_sft_steps, "cached": True}
    if (target / "config.json").is_file():
        return str(target), info
    start = time.monotonic()
    _warm_start_into(cfg, base, target)
    return str(target), info | {"cached": False, "warm_start_s": time.monotonic() - start}


def _fingerprint_dir(path: Path) -> list[Any]:
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.iterdir() if p.is_file())


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def _warm_start_into(cfg: Config, base: str, target: Path) -> None:
    """Warm-start ``base`` and write it to ``target`` atomically (tokenizer files copied)."""
    import torch
    from transformers import AutoModelForCausalLM

    from async_rl.data import build_datasets
    from async_rl.text import load_tokenizer, stop_token_ids
    from learners.warmstart import warm_start_from_config

    torch.set_num_threads(os.cpu_count() or 1)  # nothing else runs yet
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # as the learner
    train_prompts, _ = build_datasets(cfg.data, seed=cfg.seed)
    result = warm_start_from_config(model, tokenizer, train_prompts, cfg, stop_token_ids(base, tokenizer))
    logger.info("bench warm start: %d steps, loss %.3f", result.steps, result.loss)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for item in Path(base).iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, tmp / item.name)
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)  # atomic; fails if another bench finished the same model first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ capacity


def measure_capacity(
    cfg: BenchRootConfig, model_path: str, on_progress: Callable[[float], None]
) -> dict[str, Any]:
    """Generation capacity (one engine alone, kept full) and training capacity (the learner
    step alone on the groups generated), in the units of the runs."""
    import torch

    from async_rl.text import load_tokenizer
    from learners.advantages import estimator_from_config

    threads = cfg.rollout.num_threads or default_threads(1 + cfg.rollout.num_actors)
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_path)
    on_cpu = _actor_device(cfg.trainer.device) == "cpu" and threads == 1
    groups, lengths, gen_clock = _generate(cfg, model_path, tokenizer, lambda f: on_progress(f / 2))
    gen_s = gen_clock.seconds(on_cpu)
    estimator = estimator_from_config(cfg, tokenizer)
    # The learner's dynamic-sampling rule: a group whose rewards are all equal is dropped when
    # the estimator gets no signal from it.
    filters = cfg.algorithm.dynamic_sampling and estimator.filters_zero_variance
    accepted = [grp for grp in groups if not filters or _reward_spread(grp) > 0]
    n = cfg.rollout.num_actors
    accept_frac = len(accepted) / max(1, len(groups))
    samples, tokens = len(lengths), sum(lengths)
    p50, p99 = (float(q) for q in np.percentile(lengths, [50, 99])) if lengths else (0.0, 0.0)
    gen = {
        "seconds": gen_s,
        "wall_s": gen_clock.wall_s,
        "groups": len(groups),
        "accepted_groups": len(accepted),
        "accepted_frac": accept_frac,
        # The long tail, as generated: response length percentiles (tokens).
        "response_len_p50": p50,
        "response_len_p99": p99,
        "response_len_p99_over_p50": p99 / p50 if p50 else None,
        # One engine's rates; the capacity of N actors assumes each has its own core(s).
        "samples_per_s_per_actor": samples / gen_s,
        "tokens_per_s_per_actor": tokens / gen_s,
        "gen_samples_per_s": samples / gen_s * n,
        "gen_tokens_per_s": tokens / gen_s * n,
        # What generation can feed the learner: the samples that pass the filter.
        "trained_samples_per_s": samples / gen_s * n * accept_frac,
    }
    train = _train_capacity(
        cfg, model_path, tokenizer, estimator, accepted, on_cpu, lambda f: on_progress(0.5 + f / 2)
    )
    return {
        "threads_per_process": threads,
        "timed_by": "process CPU time" if on_cpu else "wall time",
        "generation": gen,
        "training": train,
    }


class _Clock:
    """Wall and process CPU time of a phase. On a CPU with one torch thread, the CPU time
    is what the phase takes on a dedicated core, whatever else runs on the machine: the
    capacity of a role that has its core to itself. On a GPU, or with several threads, CPU
    time does not measure that, and wall time is used."""

    def __init__(self) -> None:
        self.wall_s = self.cpu_s = 0.0

    def __enter__(self) -> _Clock:
        self._start = (time.monotonic(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s += time.monotonic() - self._start[0]
        self.cpu_s += time.process_time() - self._start[1]

    def seconds(self, on_cpu: bool) -> float:
        return max(self.cpu_s if on_cpu else self.wall_s, 1e-9)


def _generate(
    cfg: BenchRootConfig, model_path: str, tokenizer: Any, on_progress: Callable[[float], None]
) -> tuple[list[Any], list[int], _Clock]:
    """``bench.capacity_gen_s`` of generation by one engine kept full, the way an actor keeps
    it full, with the runs' prompts in the runs' order. Returns the scored groups, every
    response's length and the time taken."""
    from actors.actor import score_group
    from actors.engine import make_engine
    from actors.torch_engine import Request
    from async_rl.data import PromptSource, build_datasets
    from async_rl.schema import Lease
    from async_rl.text import render_prompt, stop_token_ids

    stop_ids = frozenset(stop_token_ids(model_path, tokenizer))
    engine = make_engine(
        cfg,
        model_path,
        device=_actor_device(cfg.trainer.device),
        stop_token_ids=sorted(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    source = PromptSource(build_datasets(cfg.data, seed=cfg.seed)[0], seed=cfg.seed)
    g = cfg.rollout.group_size
    pending: dict[int, tuple[Lease, list[int], list[Any]]] = {}
    groups: list[Any] = []
    lengths: list[int] = []
    budget = cfg.bench.capacity_gen_s
    start = time.monotonic()
    try:
        with _Clock() as clock:
            while (elapsed := time.monotonic() - start) < budget:
                on_progress(elapsed / budget)
                take = min(engine.free_slots() // g, cfg.rollout.prompts_per_request)
                for seq, prompt in source.take(take):
                    lease = Lease(seq, prompt.prompt_id, seq, prompt.question, prompt.answer)
                    ids = render_prompt(tokenizer, prompt.question, cfg.data.template)
                    pending[seq] = (lease, ids, [])
                    engine.add(Request(seq, ids, g, seq))
                for sample in engine.step():
                    lengths.append(len(sample.token_ids))
                    lease, ids, done = pending[sample.request_id]
                    done.append(sample)
                    if len(done) == g:
                        del pending[sample.request_id]
                        groups.append(score_group(tokenizer, lease, ids, done, "bench-capacity", stop_ids))
    finally:
        engine.close()
    return groups, lengths, clock


def _reward_spread(group: Any) -> float:
    rewards = [r.reward for r in group.responses]
    return max(rewards) - min(rewards)


def _train_capacity(
    cfg: BenchRootConfig,
    model_path: str,
    tokenizer: Any,
    estimator: Any,
    accepted: list[Any],
    on_cpu: bool,
    on_progress: Callable[[float], None],
) -> dict[str, Any]:
    """Learner steps alone, batch after batch of the buffered groups, timed as the learner
    times ``time/train_s`` (batching included, weight broadcast not), with the step's phases.
    Every third step is also run as a bare step (``bare_step``) on the same batch right after
    it: ``step_over_bare`` is what the learner's step adds to the model's own work."""
    import torch
    from transformers import AutoModelForCausalLM

    from learners.trainer import MASTER_DTYPE, StepParams, StepTimer, make_batch, train_step

    b = cfg.trainer.batch_groups
    if not accepted:
        raise RuntimeError(
            "the generation phase produced no group that passes the dynamic-sampling filter; "
            "raise bench.capacity_gen_s or trainer.warmup_sft_steps, or set algorithm.dynamic_sampling=false"
        )
    torch.set_num_threads(cfg.trainer.num_threads or default_threads(1 + cfg.rollout.num_actors))
    torch.manual_seed(cfg.seed)
    device = torch.device(_actor_device(cfg.trainer.device))
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=MASTER_DTYPE)  # as the learner
    model = model.to(device).eval()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay
    )
    params = StepParams.from_config(cfg)
    steps = cfg.bench.capacity_train_steps or max(1, cfg.trainer.max_steps)
    # Draw order (the capacity phase leased prompt `seq` as lease id `seq`): the sync run's batches.
    accepted = sorted(accepted, key=lambda grp: grp.lease_id)
    clock, tokens = _Clock(), 0.0
    timer = StepTimer(device)
    paired_step, paired_bare = _Clock(), _Clock()
    for step in range(steps):
        on_progress(step / steps)
        groups = [accepted[(step * b + i) % len(accepted)] for i in range(b)]
        paired = step % 3 == 2  # not the first steps: the heap is still growing there
        with clock, paired_step if paired else contextlib.nullcontext():
            with timer.phase("batching"):
                batch = make_batch(groups, pad_id=tokenizer.pad_token_id, device=device)
            metrics = train_step(
                model, optimizer, batch, params, version=step, estimator=estimator, timer=timer
            )
        tokens += metrics["train/tokens"]
        if paired:
            with paired_bare:
                batch = make_batch(groups, pad_id=tokenizer.pad_token_id, device=device)
                bare_step(model, batch, params, optimizer)
    seconds = clock.seconds(on_cpu)
    samples = steps * b * cfg.rollout.group_size
    phases_s = sum(timer.seconds.values())
    return {
        "steps": steps,
        "distinct_groups": min(len(accepted), steps * b),
        "wall_s": clock.wall_s,
        "seconds": seconds,
        "step_s_mean": seconds / steps,
        "trained_samples_per_s": samples / seconds,
        "train_tokens_per_s": tokens / seconds,
        "paired_steps": len(range(2, steps, 3)),
        "step_over_bare": (paired_step.seconds(on_cpu) / paired_bare.seconds(on_cpu) if steps > 2 else None),
        # Wall-time share of each phase in the timed steps (they add up to about 1).
        "phase_frac": {name: s / max(phases_s, 1e-9) for name, s in sorted(timer.seconds.items())},
    }


def bare_step(model: Any, batch: Any, p: Any, optimizer: Any | None) -> None:
    """The plainest update on ``batch`` with the learner's mini- and micro-batches: the model's
    forward, the LM head on the response positions in one piece, a log-softmax, the sum of the
    targets' logprobs, backward, and (``optimizer`` given) one optimizer step per mini-batch.
    No advantages, importance weights, clipping, loss metrics or proximal pass: the reference a
    learner step is timed against."""
    import torch

    from learners.logprobs import final_hidden
    from learners.trainer import autocast, micro_batches, mini_batch_rows

    head = model.get_output_embeddings()
    model.train()
    for mini in mini_batch_rows(batch, p.mini_batches):
        model.zero_grad(set_to_none=True)
        total = int(batch.mask[mini].sum())
        for rows in micro_batches(batch, mini, p.micro_batch_tokens):
            width = int((batch.prompt_lengths[rows] + batch.lengths[rows]).max())
            with autocast(p.autocast_dtype, batch.input_ids.device):
                with final_hidden(model) as box:
                    model(input_ids=batch.input_ids[rows, :width], use_cache=False)
                mask, index = batch.mask[rows], batch.index[rows]
                at = torch.arange(len(rows), device=index.device).unsqueeze(1).expand_as(index)
                logits = head(box["hidden"][at[mask], index[mask]])
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            chosen = logprobs.gather(-1, batch.targets[rows][mask].unsqueeze(-1))
            (chosen.sum() / max(total, 1)).backward()
        if optimizer is not None:
            optimizer.step()
    model.eval()
    if optimizer is None:
        model.zero_grad(set_to_none=True)


def _actor_device(learner_device: str) -> str:
    if learner_device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return learner_device
