"""``async-rl bench``: the same workload in sync mode, then in async mode, in one invocation.

Phases, each timed separately (bench.json records all of them):

1. **Model.** ``trainer.warmup_sft_*`` is applied once, before any mode runs, and the warmed
   model is shared by every phase (and cached between bench runs). The short warm start
   teaches the tiny model the answer format, which is what gives the long-tail task its
   long-tailed response lengths.
2. **Pipeline bound.** Generation capacity: one engine alone, no training, kept full by
   continuous batching. Training capacity: the learner's step alone, on the groups the
   generation phase buffered. Both run in this process with the thread count each role gets
   in the runs.
3. **Runs.** ``async-rl train`` with ``mode=sync``, then with ``mode=async`` (or, with
   ``sweep.max_staleness=[...]``, once per value), as real learner and actor processes.
   Everything else (model, prompts, seed, group size, batch, steps, actors) is identical.

With ``bench.compute=modelled`` none of this runs: ``async_rl.bench.costmodel`` plays the workload
on the real coordinator and transport with modelled compute costs instead.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from async_rl.bench.config import BenchRootConfig, Compute, compose_bench, train_overrides
from async_rl.supervise import (
    REPEAT_WINDOW_S,
    ParentWatch,
    StopRequests,
    child_env,
    interrupt_on_stop_signals,
)

logger = logging.getLogger(__name__)

# How long `async-rl train` gets to stop its processes after SIGTERM before it is killed
# (twice its own grace for them, so that it is not killed before it has killed them).
_STOP_GRACE_S = 30.0
# How often a running mode's metrics.jsonl is read for progress.
_POLL_S = 0.5


# ------------------------------------------------------------------------------ runs


def run_train(
    name: str, overrides: list[str], run_dir: Path, timeout_s: float, on_step: Callable[[int], None]
) -> dict[str, Any]:
    """``async-rl train OVERRIDES`` as a subprocess (learner and actors are its children);
    returns its metrics rows. Stopped with SIGTERM, then killed, on timeout or on SIGINT,
    SIGTERM or SIGHUP (then KeyboardInterrupt is raised once it is stopped)."""
    from async_rl.metrics import read_metrics

    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train.out"
    metrics = run_dir / "metrics.jsonl"
    load = LoadMeter(children=True)
    start = time.monotonic()
    # While the run is up, signals are counted, not raised: none can land between starting
    # it and recording it, nor cut its stop short. Each one is passed on to the run, which
    # escalates its own stop (async_rl.supervise).
    with StopRequests() as stop, log_path.open("wb") as log:
        # A session of its own: Ctrl-C reaches the bench only, which then stops the run in
        # order (the launcher stops the learner and actors it started). The run watches the
        # bench and stops on its own if the bench dies.
        proc = subprocess.Popen(
            [sys.executable, "-m", "async_rl.cli", "train", *overrides],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        try:
            while proc.poll() is None and not stop.requested:
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError(
                        f"the {name} run took more than bench.run_timeout_s={timeout_s:.0f} s; see {log_path}"
                    )
                on_step(_steps_logged(metrics))
                time.sleep(_POLL_S)
        finally:
            _stop(proc, stop)
    if stop.requested:
        raise KeyboardInterrupt
    if proc.returncode != 0:
        raise RuntimeError(f"the {name} run exited with code {proc.returncode}; see {log_path}")
    return {"rows": read_metrics(metrics), "process_wall_s": time.monotonic() - start} | load.read()


class LoadMeter:
    """CPU cores used on average since creation, by this process (or its finished children)
    and by everything else on the machine (Linux /proc/stat; empty elsewhere). Async needs
    both cores of a 2-core machine at once: other load is what most often explains a low
    speedup or bound fraction."""

    def __init__(self, *, children: bool) -> None:
        self._who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
        self._start = (time.monotonic(), _own_cpu_s(self._who), _machine_busy_s())

    def read(self) -> dict[str, float]:
        wall, own, busy = time.monotonic(), _own_cpu_s(self._who), _machine_busy_s()
        elapsed = max(wall - self._start[0], 1e-9)
        if busy is None or self._start[2] is None:
            return {}
        own_s = own - self._start[1]
        return {
            "own_cpu_cores": own_s / elapsed,
            "other_cpu_cores": max(0.0, busy - self._start[2] - own_s) / elapsed,
        }


def _own_cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _machine_busy_s() -> float | None:
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _steps_logged(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)  # line 0 is step 0 (before training)
    except FileNotFoundError:
        return 0


def _stop(proc: subprocess.Popen[bytes], stop: StopRequests) -> None:
    """SIGTERM to the run, and one more for each further request: the run escalates its own
    stop (faster, then SIGKILL of its children) and exits. The run itself is killed only if
    it is still there after ``_STOP_GRACE_S`` (its learner and actors, which watch it, then
    stop on their own). SIGTERM, not SIGINT: a process started in the background of a
    shell ignores SIGINT."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    passed_on, passed_at = stop.level, time.monotonic()
    deadline = passed_at + _STOP_GRACE_S
    while proc.poll() is None and time.monotonic() < deadline:
        # Spaced by more than the run's repeat window, or it would count two as one.
        if stop.level > passed_on and time.monotonic() - passed_at > 1.5 * REPEAT_WINDOW_S:
            proc.send_signal(signal.SIGTERM)
            passed_on, passed_at = passed_on + 1, time.monotonic()
        time.sleep(_POLL_S / 10)
    if proc.poll() is None:
        logger.warning("the run (pid %d) did not stop within %.0f s; killing it", proc.pid, _STOP_GRACE_S)
        proc.kill()
        proc.wait(timeout=5)


def plan_runs(cfg: BenchRootConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, fixed overrides) of every run, in order."""
    if cfg.sweep.max_staleness:
        return [
            (f"staleness-{v}", {"mode": "async", "rollout.max_staleness": v}) for v in cfg.sweep.max_staleness
        ]
    return [("sync", {"mode": "sync"}), ("async", {"mode": "async"})]


# ------------------------------------------------------------------------------ the bench


class Phases:
    """Progress over the bench's phases, each weighted by its expected share of the time."""

    def __init__(self, weights: dict[str, float], show: Callable[[float, str], None]) -> None:
        total = sum(weights.values()) or 1.0
        self._start: dict[str, float] = {}
        acc = 0.0
        for name, w in weights.items():
            self._start[name] = acc / total
            acc += w
        self._share = {name: w / total for name, w in weights.items()}
        self._show = show

    def update(self, phase: str, fraction: float, detail: str = "") -> None:
        done = self._start[phase] + self._share[phase] * min(max(fraction, 0.0), 1.0)
        self._show(done, f"{phase} {detail}".strip())


def run_bench(cfg: BenchRootConfig, run_dir: Path, show: Callable[[float, str], None]) -> dict[str, Any]:
    """All phases; returns the report (bench.json's content)."""
    from async_rl.bench import report as br
    from async_rl.bench.capacity import measure_capacity, prepare_model

    started, load_start = time.monotonic(), os.getloadavg()
    runs = plan_runs(cfg)
    steps = cfg.trainer.max_steps
    learning = cfg.bench.learning_s > 0
    phases = Phases(
        {"model": 0.4 * cfg.trainer.warmup_sft_steps, "capacity": cfg.bench.capacity_gen_s + 0.3 * steps}
        | {name: 15.0 + steps * (1.0 if fixed["mode"] == "sync" else 0.5) for name, fixed in runs}
        | ({f"learning-{m}": 60.0 + cfg.bench.learning_s for m in ("sync", "async")} if learning else {}),
        show,
    )
    phases.update("model", 0.0, "warm start")
    model_path, model_info = prepare_model(cfg, run_dir, cache=cfg.bench.cache_warm_model)
    phases.update("capacity", 0.0)
    load = LoadMeter(children=False)
    capacity = measure_capacity(cfg, model_path, lambda f: phases.update("capacity", f)) | load.read()
    gen_cap = capacity["generation"]
    bound = br.pipeline_bound(gen_cap["trained_samples_per_s"], capacity["training"]["trained_samples_per_s"])
    summaries: dict[str, dict[str, Any]] = {}
    for name, fixed in runs:
        fixed = fixed | {
            "run_dir": str(run_dir / name),
            "model.path": model_path,
            "trainer.warmup_sft_steps": 0,
        }
        phases.update(name, 0.0, "starting")

        def on_step(k: int, name: str = name) -> None:
            phases.update(name, k / max(steps, 1), f"step {k}/{steps}")

        out = run_train(name, train_overrides(cfg, fixed), run_dir / name, cfg.bench.run_timeout_s, on_step)
        summary = br.summarize_run(
            out["rows"],
            group_size=cfg.rollout.group_size,
            batch_groups=cfg.trainer.batch_groups,
            skip_steps=cfg.bench.skip_steps,
            gen_capacity_samples_per_s=gen_cap["gen_samples_per_s"],
        )
        summaries[name] = summary | {k: v for k, v in out.items() if k != "rows"}
    learning_report = run_learning(cfg, run_dir, phases) if learning else None
    show(1.0, "done")
    report: dict[str, Any] = {
        "compute": "real",
        "machine": machine_info(load_start),
        "wall_s": time.monotonic() - started,
        "bound": bound,
        "capacity": capacity,
        "model": model_info,
        "workload": _workload(cfg),
        "estimates": br.estimates(summaries),
    }
    if learning_report is not None:
        report["learning"] = learning_report
    return report | headline(cfg, summaries, bound)


def run_learning(cfg: BenchRootConfig, run_dir: Path, phases: Phases) -> dict[str, Any]:
    """The learning workload: ``bench.learning_config`` from its warm-started checkpoint (made
    once, cached like the throughput workload's), sync then async for ``bench.learning_s``
    seconds of RL each, held-out accuracy every ``bench.learning_eval_every`` steps."""
    from async_rl.bench import report as br
    from async_rl.bench.capacity import prepare_model
    from async_rl.config import compose

    b = cfg.bench
    learn = compose(b.learning_config, [f"seed={cfg.seed}", *b.learning_overrides])
    phases.update("learning-sync", 0.0, "warm start")
    model_path, model_info = prepare_model(learn, run_dir, cache=b.cache_warm_model)
    curves: dict[str, list[list[float]]] = {}
    for mode in ("sync", "async"):
        name = f"learning-{mode}"
        fixed = {
            "mode": mode,
            "run_dir": str(run_dir / name),
            "model.path": model_path,
            "trainer.warmup_sft_steps": 0,
            "trainer.max_steps": 1_000_000,
            "trainer.max_time_s": b.learning_s,
            "trainer.eval_every": b.learning_eval_every,
            "trainer.checkpoint_every": 0,
        }
        started = time.monotonic()

        def on_step(k: int, name: str = name, started: float = started) -> None:
            phases.update(name, (time.monotonic() - started) / (60.0 + b.learning_s), f"step {k}")

        out = run_train(name, train_overrides(learn, fixed), run_dir / name, b.run_timeout_s, on_step)
        curves[mode] = br.accuracy_curve(out["rows"])
    return br.learning_summary(curves) | {
        "config": b.learning_config,
        "learning_s": b.learning_s,
        "model": model_info,
        "eval_every": b.learning_eval_every,
    }


def headline(cfg: BenchRootConfig, runs: dict[str, dict[str, Any]], bound: dict[str, Any]) -> dict[str, Any]:
    """The top-level figures: speedup and bound fractions (for a sweep, best value vs 0)."""
    from async_rl.bench import report as br

    if cfg.sweep.max_staleness:
        by_value = {v: runs[f"staleness-{v}"] for v in cfg.sweep.max_staleness}
        best = max(
            (v for v in by_value if v > 0), key=lambda v: by_value[v]["trained_samples_per_s"], default=None
        )
        rate = lambda v: by_value[v]["trained_samples_per_s"] if v is not None else None  # noqa: E731
        return {
            "speedup": br.ratio(rate(best), rate(0) if 0 in by_value else None),
            "async_bound_fraction": br.ratio(rate(best), bound["async_bound"]),
            "sync_bound_fraction": br.ratio(rate(0) if 0 in by_value else None, bound["sync_bound"]),
            "best_max_staleness": best,
            "runs": by_value,
            "sweep": br.sweep_summary(by_value, bound),
        }
    sync, async_ = runs["sync"], runs["async"]
    return {
        "speedup": br.ratio(async_["trained_samples_per_s"], sync["trained_samples_per_s"]),
        "speedup_overall": br.ratio(
            async_["trained_samples_per_s_overall"], sync["trained_samples_per_s_overall"]
        ),
        "async_bound_fraction": br.ratio(async_["trained_samples_per_s"], bound["async_bound"]),
        "sync_bound_fraction": br.ratio(sync["trained_samples_per_s"], bound["sync_bound"]),
        "ratios": br.compare(sync, async_),
        "modes": runs,
    }


def machine_info(load_start: tuple[float, float, float]) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    load_end = os.getloadavg()
    return {
        "cpu_count": cpus,
        "loadavg_start": list(load_start),
        "loadavg_end": list(load_end),
        "summary": f"{cpus} CPUs, load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end",
    }


def _workload(cfg: BenchRootConfig) -> dict[str, Any]:
    r, t = cfg.rollout, cfg.trainer
    return {
        "data": cfg.data.kind.value,
        "seed": cfg.seed,
        "num_actors": r.num_actors,
        "group_size": r.group_size,
        "batch_groups": t.batch_groups,
        "max_steps": t.max_steps,
        "max_new_tokens": r.max_new_tokens,
        "max_num_seqs": r.max_num_seqs,
        "async_max_staleness": r.max_staleness,
        "sweep_max_staleness": list(cfg.sweep.max_staleness),
        "dynamic_sampling": cfg.algorithm.dynamic_sampling,
        "skip_steps": cfg.bench.skip_steps,
    }


# ------------------------------------------------------------------------------ entry point


def bench(overrides: list[str]) -> int:
    """``async-rl bench``: run every phase with a progress bar; write bench.json/md/png."""
    from async_rl.bench.report import write_outputs
    from async_rl.launcher import make_run_dir, write_config
    from async_rl.logs import setup_logging

    cfg = compose_bench(overrides)
    run_dir = make_run_dir(cfg)
    setup_logging(cfg.log_level, run_dir / "bench.log")
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)  # the progress bar owns the terminal
    write_config(cfg, run_dir)
    print(f"run directory: {run_dir}", flush=True)
    bar = ProgressBar()
    # SIGTERM and SIGHUP stop the bench as Ctrl-C does (run_train stops a run in progress).
    with interrupt_on_stop_signals(), ParentWatch():
        try:
            if cfg.bench.compute is Compute.MODELLED:
                from async_rl.bench.modelled import run_cost_model

                report = run_cost_model(cfg, run_dir, bar.show)
            else:
                report = run_bench(cfg, run_dir, bar.show)
        finally:
            bar.close()
    paths = write_outputs(report, run_dir)
    print((run_dir / "bench.md").read_text(), flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


class ProgressBar:
    """One redrawn line on a terminal; a line per phase change otherwise."""

    def __init__(self, width: int = 30) -> None:
        self._width = width
        self._start = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._last_phase = ""
        self._last_draw = 0.0

    def show(self, fraction: float, detail: str) -> None:
        now = time.monotonic()
        phase = detail.split(" ", 1)[0]
        if self._tty and now - self._last_draw < 0.2 and phase == self._last_phase and fraction < 1:
            return
        filled = int(self._width * fraction)
        elapsed = int(now - self._start)
        line = (
            f"[{'#' * filled}{'.' * (self._width - filled)}] {fraction:4.0%}  "
            f"{elapsed // 60}:{elapsed % 60:02d}  {detail}"
        )
        if self._tty:
            sys.stderr.write("\r\033[K" + line)
        elif phase != self._last_phase:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self._last_phase, self._last_draw = phase, now

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
