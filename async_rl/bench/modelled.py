"""``bench.compute=modelled``: the runs, the modelled pipeline bound and the report, with the
learner and actors of ``async_rl.bench.costmodel`` (see there for what is real and what is
modelled)."""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from async_rl.bench.costmodel import (
    MODELLED_NOTE,
    Clock,
    Costs,
    ModelledActor,
    ModelledEngine,
    ModelledLearner,
    Workload,
)
from async_rl.data import PromptSource
from async_rl.schema import Lease

if TYPE_CHECKING:
    from async_rl.bench.config import BenchRootConfig


def run_modelled(
    cfg: BenchRootConfig, run_dir: Path, max_staleness: int, on_step: Callable[[int], None]
) -> tuple[list[dict[str, Any]], float]:
    """One modelled run: the learner in this thread, ``cost.num_actors`` actor threads.
    Returns its metrics rows (modelled seconds) and the real seconds it took."""
    from async_rl.metrics import read_metrics

    cfg = copy.deepcopy(cfg)
    cfg.rollout.max_staleness = max_staleness
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    clock = Clock(cfg.cost.time_scale)
    workload = Workload(cfg)
    learner = ModelledLearner(cfg, run_dir, clock)
    errors: list[BaseException] = []

    def actor_main(actor: ModelledActor) -> None:
        try:
            actor.run()
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    actors = [
        ModelledActor(f"actor-{i}", cfg, learner.server.control_endpoint, workload, clock)
        for i in range(cfg.cost.num_actors)
    ]
    threads = [threading.Thread(target=actor_main, args=(a,), name=a.actor_id, daemon=True) for a in actors]
    for thread in threads:
        thread.start()
    try:
        progress = threading.Thread(target=_follow, args=(learner, on_step), daemon=True)
        progress.start()
        learner.run()
    finally:
        learner.close()
        for thread in threads:
            thread.join(timeout=10.0)
    if errors:
        raise RuntimeError(f"a modelled actor failed: {errors[0]!r}") from errors[0]
    return read_metrics(run_dir / "metrics.jsonl"), time.monotonic() - started


def _follow(learner: ModelledLearner, on_step: Callable[[int], None]) -> None:
    while not learner.stop.is_set():
        on_step(learner.version)
        time.sleep(0.25)


def modelled_capacity(cfg: BenchRootConfig, workload: Workload) -> dict[str, Any]:
    """Generation capacity (one modelled engine kept full, played in virtual time, times the
    number of actors) and training capacity (modelled step time of an average batch)."""
    c, costs = cfg.cost, Costs(cfg.cost)
    engine = ModelledEngine(costs, c.max_num_seqs, c.prompt_tokens)
    source = PromptSource(workload.prompts, seed=cfg.seed)
    done: dict[int, int] = {}
    # Several of the longest responses back to back: long enough for a steady state.
    horizon = 8 * c.max_response_tokens * costs.decode_s(c.max_num_seqs)
    t, samples, tokens, groups, informative = 0.0, 0, 0, 0, 0
    while t < horizon:
        for seq, prompt in source.take(engine.free_slots() // c.group_size):
            engine.add(
                Lease(seq, prompt.prompt_id, seq, prompt.question, prompt.answer),
                workload.lengths(prompt, seq),
            )
        elapsed, finished = engine.advance(horizon / 100)
        t += elapsed
        for row, _ in finished:
            samples, tokens = samples + 1, tokens + row.length
            done[row.lease.seq] = done.get(row.lease.seq, 0) + 1
            if done[row.lease.seq] == c.group_size:
                rewards = workload.rewards(row.lease.prompt_id, row.lease.seq)
                groups += 1
                informative += max(rewards) > min(rewards) or not c.dynamic_sampling
    accept = informative / max(groups, 1)
    per_actor = samples / t
    batch_tokens = c.batch_groups * c.group_size * (tokens / max(samples, 1) + c.prompt_tokens)
    train_step_s = costs.train_s(batch_tokens)
    return {
        "modelled": True,
        "generation": {
            "seconds": t,
            "groups": groups,
            "accepted_frac": accept,
            "samples_per_s_per_actor": per_actor,
            "tokens_per_s_per_actor": tokens / t,
            "gen_samples_per_s": per_actor * c.num_actors,
            "gen_tokens_per_s": tokens / t * c.num_actors,
            "trained_samples_per_s": per_actor * c.num_actors * accept,
            "response_len_mean": tokens / max(samples, 1),
        },
        "training": {
            "step_s_mean": train_step_s,
            "trained_samples_per_s": c.batch_groups * c.group_size / train_step_s,
            "train_tokens_per_s": batch_tokens / train_step_s,
            "broadcast_s": costs.broadcast_s(),
        },
    }


def run_cost_model(cfg: BenchRootConfig, run_dir: Path, show: Callable[[float, str], None]) -> dict[str, Any]:
    """Every planned run (sync/async or the sweep) with modelled compute; the report."""
    from async_rl.bench import report as br
    from async_rl.bench.runner import headline, machine_info, plan_runs
    from async_rl.config import to_dict

    started, load_start = time.monotonic(), os.getloadavg()
    workload = Workload(cfg)
    capacity = modelled_capacity(cfg, workload)
    bound = br.pipeline_bound(
        capacity["generation"]["trained_samples_per_s"], capacity["training"]["trained_samples_per_s"]
    )
    runs = plan_runs(cfg)
    c = cfg.cost
    summaries: dict[str, dict[str, Any]] = {}
    for i, (name, fixed) in enumerate(runs):
        staleness = (
            0
            if fixed["mode"] == "sync"
            else int(fixed.get("rollout.max_staleness", cfg.rollout.max_staleness))
        )

        def on_step(k: int, i: int = i, name: str = name) -> None:
            show((i + k / c.max_steps) / len(runs), f"{name} (modelled) step {k}/{c.max_steps}")

        rows, real_s = run_modelled(cfg, run_dir / f"modelled-{name}", staleness, on_step)
        summary = br.summarize_run(
            rows,
            group_size=c.group_size,
            batch_groups=c.batch_groups,
            skip_steps=cfg.bench.skip_steps,
            gen_capacity_samples_per_s=capacity["generation"]["gen_samples_per_s"],
        )
        steps = [r for r in rows if r["step"] > 0]
        intended = sum(r["time/train_intended_s"] for r in steps)
        # How much longer the learner's modelled sleeps took than modelled (scheduling delay
        # on this machine, amplified by 1 / time_scale): the error bar of every modelled time.
        overshoot = sum(r["time/train_s"] for r in steps) / intended - 1 if intended else 0.0
        summaries[name] = summary | {"real_s": real_s, "timing_overshoot_frac": overshoot}
    show(1.0, "done")
    report: dict[str, Any] = {
        "compute": "modelled",
        "modelled_note": MODELLED_NOTE,
        "machine": machine_info(load_start),
        "wall_s": time.monotonic() - started,
        "bound": bound,
        "capacity": capacity,
        "workload": {"cost": to_dict(c), "async_max_staleness": cfg.rollout.max_staleness, "seed": cfg.seed}
        | {"data": cfg.data.kind.value},
        "estimates": br.estimates(summaries),
    }
    return report | headline(cfg, summaries, bound)
