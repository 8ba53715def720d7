"""What ``async-rl bench`` reports: per-run summaries from metrics rows, the pipeline bound,
the async/sync ratios, and the three files (bench.json, bench.md, bench.png).

Everything here is a pure function of metrics rows (the learner's ``metrics.jsonl`` lines,
or the cost model's rows in the same format) and the capacity measurement, so it is tested
without running anything.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Fraction of the common wall time over which "reward at equal wall time" is averaged
# (per-step rewards of a small batch are noisy).
_REWARD_WINDOW = 0.25

# Other processes' CPU use (cores, averaged over a run) above which bench.md warns that the
# machine was shared: a quarter core already takes a visible share from a 2-process run.
_BUSY_MACHINE_CORES = 0.25

# Figures that are estimated rather than measured, and how; listed in bench.json and bench.md.
ESTIMATES = {
    "actor_idle_frac": (
        "1 - generated samples/s in the run / the engines' measured capacity: unused generation "
        "capacity, which counts idle time and the low occupancy of sync waves alike (actors do not "
        "report their own idle time)"
    ),
}
# Used only for runs whose metrics lack the actors' own time/gen_pause_s.
PAUSE_ESTIMATE = (
    "the learner's time/weight_sync_s, an upper bound on how long an actor pauses to load weights "
    "(these metrics carry no time/gen_pause_s from the actors)"
)


def estimates(runs: dict[Any, dict[str, Any]]) -> dict[str, str]:
    """The figures of ``runs`` that are estimated rather than measured, and how."""
    out = {} if all(r.get("actor_idle_measured") for r in runs.values()) else dict(ESTIMATES)
    if not all(r.get("generation_pause_measured") for r in runs.values()):
        out["generation_pause_s"] = PAUSE_ESTIMATE
    return out


def summarize_run(
    rows: list[dict[str, Any]],
    *,
    group_size: int,
    batch_groups: int,
    skip_steps: int,
    gen_capacity_samples_per_s: float | None,
) -> dict[str, Any]:
    """Rates of one run. Steady-state rates are over steps ``skip_steps+1 .. last`` (the
    first steps fill the pipeline); ``*_overall`` rates are over the whole RL phase."""
    start = next((r for r in rows if r["step"] == 0), None)
    steps = [r for r in rows if r["step"] > 0]
    if start is None or not steps:
        raise RuntimeError("the run logged no training step; see its learner.out")
    times = [float(start["time_s"])] + [float(r["time_s"]) for r in steps]
    k0 = min(skip_steps, len(steps) - 1)
    window = steps[k0:]
    window_s = max(times[-1] - times[k0], 1e-9)
    samples = [len(r.get("rollout/trained_leases") or [None] * batch_groups) * group_size for r in steps]
    gen_tokens = [
        float(r.get("throughput/gen_tokens_per_s", 0.0)) * (times[i + 1] - times[i])
        for i, r in enumerate(steps)
    ]
    generated_groups = _leases(steps[-1]) - _leases(steps[k0 - 1] if k0 else start)
    staleness = [s for r in steps for s in r.get("rollout/trained_staleness") or []]
    syncs = [float(r["time/weight_sync_s"]) for r in window if r.get("time/weight_sync_s")]
    # Actors report how long generation stood still for each weight swap; a learner that does
    # not forward those reports leaves the learner-side broadcast time as the upper bound.
    pauses = [float(r["time/gen_pause_s"]) for r in window if r.get("time/gen_pause_s") is not None]
    # Used as soon as the learner logs the actors' own idle fraction; estimated until then.
    idle = [float(r["actors/idle_frac"]) for r in window if r.get("actors/idle_frac") is not None]
    ended = _leases(steps[-1]) - _leases(start)
    filtered = _get(steps[-1], "leases/filtered") - _get(start, "leases/filtered")
    gen_samples_per_s = generated_groups * group_size / window_s
    out = {
        "steps": len(steps),
        "wall_s": times[-1],
        "steady_window_s": window_s,
        "trained_samples_per_s": sum(samples[k0:]) / window_s,
        "trained_tokens_per_s": sum(_get(r, "train/tokens") for r in window) / window_s,
        "gen_samples_per_s": gen_samples_per_s,
        "gen_tokens_per_s": sum(gen_tokens[k0:]) / window_s,
        "trained_samples_per_s_overall": sum(samples) / max(times[-1], 1e-9),
        "learner_idle_frac": sum(_get(r, "time/wait_s") for r in window) / window_s,
        "learner_train_frac": sum(_get(r, "time/train_s") for r in window) / window_s,
        # Neither training nor waiting for a batch: the weight broadcast, evaluation,
        # checkpoints and logging, each of which holds up the next step.
        "learner_other_frac": max(
            0.0,
            1.0 - sum(_get(r, "time/wait_s") + _get(r, "time/train_s") for r in window) / window_s,
        ),
        "weight_sync_frac": sum(syncs) / window_s,
        "weight_sync_s": _mean(syncs),
        "generation_pause_s": _mean(pauses) if pauses else _mean(syncs),
        "generation_pause_measured": bool(pauses),
        "actor_idle_frac": _mean(idle) if idle else _unused(gen_samples_per_s, gen_capacity_samples_per_s),
        "actor_idle_measured": bool(idle),
        "staleness_mean": _mean(staleness),
        "staleness_max": max(staleness, default=0),
        "filtered_group_frac": filtered / ended if ended else 0.0,
        # Generated tokens of groups dropped as stale (re-sampled): wasted generation.
        "stale_groups": _get(steps[-1], "leases/stale") - _get(start, "leases/stale"),
        "dropped_token_frac": _get(steps[-1], "rollout/dropped_token_frac"),
        "response_len_mean": _mean([_get(r, "rollout/response_len_mean") for r in steps]),
        "reward_mean": _mean([_get(r, "reward/mean") for r in steps]),
        "reward_curve": [[float(r["time_s"]), _get(r, "reward/mean")] for r in steps],
        "samples_curve": [[t, float(n)] for t, n in zip(times[1:], _cumsum(samples))],
    }
    return out


def _unused(rate: float, capacity: float | None) -> float | None:
    return min(1.0, max(0.0, 1.0 - rate / capacity)) if capacity else None


def _get(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if value is not None else 0.0


def _leases(row: dict[str, Any]) -> float:
    return _get(row, "leases/accepted") + _get(row, "leases/filtered")


def _mean(values: list[float] | list[int]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def pipeline_bound(gen_samples_per_s: float, train_samples_per_s: float) -> dict[str, Any]:
    """What each schedule can reach at best, in trained samples/s: async overlaps generation
    and training, so the slower of the two bounds it; sync alternates, so their times add."""
    gen, train = gen_samples_per_s, train_samples_per_s
    return {
        "gen_trained_samples_per_s": gen,
        "train_trained_samples_per_s": train,
        "async_bound": min(gen, train),
        "sync_bound": 1.0 / (1.0 / gen + 1.0 / train) if gen > 0 and train > 0 else 0.0,
        "bottleneck": "generation" if gen < train else "training",
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


_RATIO_KEYS = (
    "trained_samples_per_s",
    "trained_tokens_per_s",
    "gen_tokens_per_s",
    "gen_samples_per_s",
    "trained_samples_per_s_overall",
)


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other / base`` for every rate (``wall_s``: base / other, so > 1 means faster)."""
    out = {key: ratio(other[key], base[key]) for key in _RATIO_KEYS}
    out["wall_s"] = ratio(base["wall_s"] / max(base["steps"], 1), other["wall_s"] / max(other["steps"], 1))
    return out


def reward_at(curve: list[list[float]], t: float) -> float | None:
    """Mean reward of the steps that finished in the last ``_REWARD_WINDOW`` of ``[0, t]``."""
    picked = [r for s, r in curve if t * (1 - _REWARD_WINDOW) <= s <= t]
    if not picked:
        before = [r for s, r in curve if s <= t]
        return before[-1] if before else None
    return sum(picked) / len(picked)


def accuracy_curve(rows: list[dict[str, Any]]) -> list[list[float]]:
    """[[RL seconds, held-out accuracy], ...] of the evaluated steps of one run."""
    return [
        [float(r["time_s"]), float(r["eval/accuracy"])] for r in rows if r.get("eval/accuracy") is not None
    ]


def time_to_accuracy(curve: list[list[float]], target: float) -> float | None:
    """The first time the curve reaches ``target`` (None if it never does)."""
    return next((t for t, acc in curve if acc >= target), None)


def learning_summary(curves: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Time to the same accuracy in sync and async mode. The target is the lower of the two
    runs' best accuracies, the highest level both reached; with no gain over the start in
    either run there is no target (and no ratio)."""
    modes: dict[str, dict[str, Any]] = {}
    for mode, curve in curves.items():
        modes[mode] = {
            "curve": curve,
            "start_accuracy": curve[0][1] if curve else None,
            "best_accuracy": max((acc for _, acc in curve), default=None),
            "steps_evaluated": len(curve),
        }
    bests = [m["best_accuracy"] for m in modes.values()]
    starts = [m["start_accuracy"] for m in modes.values() if m["start_accuracy"] is not None]
    target = min(bests) if bests and None not in bests else None
    if target is not None and starts and target <= max(starts):
        target = None  # one of the runs learnt nothing: no level both reached by learning
    for m in modes.values():
        m["time_to_target_s"] = time_to_accuracy(m["curve"], target) if target is not None else None
    sync_t = modes.get("sync", {}).get("time_to_target_s")
    async_t = modes.get("async", {}).get("time_to_target_s")
    return {
        "target_accuracy": target,
        "time_to_accuracy_ratio": ratio(async_t, sync_t),
        "modes": modes,
    }


def sweep_summary(runs: dict[int, dict[str, Any]], bound: dict[str, Any]) -> dict[str, Any]:
    """Per max_staleness value: throughput, bound fraction, reward at the common wall time."""
    common_t = min(r["wall_s"] for r in runs.values())
    base = runs.get(0)
    rows = []
    for value, run in sorted(runs.items()):
        rows.append(
            {
                "max_staleness": value,
                "trained_samples_per_s": run["trained_samples_per_s"],
                "speedup_vs_0": ratio(run["trained_samples_per_s"], base["trained_samples_per_s"])
                if base
                else None,
                "bound_fraction": ratio(
                    run["trained_samples_per_s"], bound["async_bound"] if value else bound["sync_bound"]
                ),
                "reward_at_equal_wall_time": reward_at(run["reward_curve"], common_t),
                "staleness_mean": run["staleness_mean"],
                "staleness_max": run["staleness_max"],
            }
        )
    return {"equal_wall_time_s": common_t, "values": rows}


# ------------------------------------------------------------------------------ files


def write_outputs(report: dict[str, Any], run_dir: Path) -> list[Path]:
    """bench.json, bench.md and (with matplotlib) bench.png in ``run_dir``."""
    paths = [run_dir / "bench.json", run_dir / "bench.md"]
    paths[0].write_text(json.dumps(_finite(report), indent=2) + "\n")
    paths[1].write_text(markdown(report))
    try:
        plot(report, run_dir / "bench.png")
        paths.append(run_dir / "bench.png")
    except ImportError:
        logger.warning("bench.png not written: matplotlib is missing (pip install 'async-rl[bench]')")
    return paths


def _finite(value: Any) -> Any:
    """JSON has no NaN or inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


_TABLE = (
    ("wall time of the RL phase (s)", "wall_s"),
    ("trained samples/s (steady)", "trained_samples_per_s"),
    ("trained tokens/s (steady)", "trained_tokens_per_s"),
    ("generated tokens/s (steady)", "gen_tokens_per_s"),
    ("trained samples/s (whole run)", "trained_samples_per_s_overall"),
    ("learner idle fraction", "learner_idle_frac"),
    ("learner training fraction", "learner_train_frac"),
    ("learner other fraction (sync, eval, checkpoints)", "learner_other_frac"),
    ("actor idle fraction (estimated)", "actor_idle_frac"),
    ("weight sync per step (s)", "weight_sync_s"),
    ("generation pause per sync (s)", "generation_pause_s"),
    ("staleness mean", "staleness_mean"),
    ("staleness max", "staleness_max"),
    ("filtered-group fraction", "filtered_group_frac"),
    ("groups dropped as stale", "stale_groups"),
    ("dropped-token fraction (stale groups)", "dropped_token_frac"),
    ("response length mean (tokens)", "response_len_mean"),
    ("reward mean", "reward_mean"),
    ("CPU cores used by the run (whole process)", "own_cpu_cores"),
    ("CPU cores used by other processes meanwhile", "other_cpu_cores"),
)


def markdown(report: dict[str, Any]) -> str:
    modelled = report["compute"] == "modelled"
    lines = [f"# async-rl bench ({'MODELLED compute' if modelled else 'measured'})", ""]
    if modelled:
        over = [
            m.get("timing_overshoot_frac", 0.0)
            for m in (report.get("modes") or report.get("runs", {})).values()
        ]
        lines += [
            f"> {report['modelled_note']}",
            "",
            f"Timing error: the learner's modelled sleeps overran by up to {max(over, default=0.0):.1%} "
            "(scheduling delay on this machine); raise cost.time_scale to shrink it.",
            "",
        ]
    lines += [
        f"speedup (async/sync trained samples/s): **{_fmt(report['speedup'])}**  ",
        f"async throughput / pipeline bound: **{_fmt(report['async_bound_fraction'])}**  ",
        f"bottleneck: **{report['bound']['bottleneck']}**  ",
        f"bench wall time: {_fmt(report['wall_s'])} s; machine: {report['machine']['summary']}",
        "",
    ]
    runs = report.get("modes") or report.get("runs") or {}
    others = max((r.get("other_cpu_cores") or 0.0 for r in runs.values()), default=0.0)
    if not modelled and others > _BUSY_MACHINE_CORES:
        lines += [
            f"**Warning: other processes used up to {others:.2f} CPU cores during the runs.** Async needs "
            "a core per process at once, sync one at a time: these figures understate async on a "
            "dedicated machine. Run the bench on an idle machine.",
            "",
        ]
    modes = report.get("modes", {})
    if modes:
        names = list(modes)
        lines += ["| | " + " | ".join(names) + " | async/sync |", "|---" * (len(names) + 2) + "|"]
        for label, key in _TABLE:
            if all(modes[n].get(key) is None for n in names):
                continue  # not measured in these runs (e.g. CPU use in a modelled run)
            cells = [_fmt(modes[n].get(key)) for n in names]
            rel = report.get("ratios", {}).get(key)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(rel)} |")
        lines.append("")
    if "sweep" in report:
        sweep = report["sweep"]
        lines += [
            f"Staleness sweep (reward averaged over the last {_REWARD_WINDOW:.0%} of the common wall "
            f"time {_fmt(sweep['equal_wall_time_s'])} s):",
            "",
            "| max_staleness | trained samples/s | vs 0 | of bound | reward at equal time | staleness mean/max |",
            "|---|---|---|---|---|---|",
        ]
        for v in sweep["values"]:
            lines.append(
                f"| {v['max_staleness']} | {_fmt(v['trained_samples_per_s'])} | {_fmt(v['speedup_vs_0'])} | "
                f"{_fmt(v['bound_fraction'])} | {_fmt(v['reward_at_equal_wall_time'])} | "
                f"{_fmt(v['staleness_mean'])}/{v['staleness_max']} |"
            )
        lines.append("")
    b = report["bound"]
    lines += [
        "Pipeline bound (trained samples/s"
        + (", modelled" if modelled else ", measured in this run")
        + f"): generation {_fmt(b['gen_trained_samples_per_s'])}, training "
        f"{_fmt(b['train_trained_samples_per_s'])}; async bound min(gen, train) = {_fmt(b['async_bound'])}, "
        f"sync bound 1/(1/gen + 1/train) = {_fmt(b['sync_bound'])}; sync reaches "
        f"{_fmt(report.get('sync_bound_fraction'))} of its bound. Generation capacity is "
        f"{_fmt(ratio(b['gen_trained_samples_per_s'], b['train_trained_samples_per_s']))}x training capacity.",
        "",
    ]
    training = (report.get("capacity") or {}).get("training") or {}
    if training.get("step_over_bare") is not None:
        phases = ", ".join(f"{name} {frac:.1%}" for name, frac in training["phase_frac"].items())
        lines += [
            f"Learner step / bare step (forward, backward and optimizer of the same batch, "
            f"{training['paired_steps']} capacity steps paired): **{_fmt(training['step_over_bare'])}**. "
            f"Where the step's time goes: {phases}.",
            "",
        ]
    learning = report.get("learning")
    if learning:
        lines += _learning_lines(learning)
    lines += [
        "Estimated, not measured:",
        "",
    ]
    lines += [f"* {key}: {how}" for key, how in report["estimates"].items()]
    return "\n".join(lines) + "\n"


def _learning_lines(learning: dict[str, Any]) -> list[str]:
    modes = learning["modes"]
    target = learning["target_accuracy"]
    lines = [
        f"Learning: configs/{learning['config']}.yaml from its warm start, {_fmt(learning['learning_s'])} s "
        f"of RL in each mode, held-out greedy accuracy every {learning['eval_every']} steps. "
        f"Time to accuracy {_fmt(target)} (the best both reached), async / sync: "
        f"**{_fmt(learning['time_to_accuracy_ratio'])}**.",
        "",
        "| mode | accuracy at step 0 | best accuracy | evaluations | time to target (s) |",
        "|---|---|---|---|---|",
    ]
    for name, m in modes.items():
        lines.append(
            f"| {name} | {_fmt(m['start_accuracy'])} | {_fmt(m['best_accuracy'])} | {m['steps_evaluated']} | "
            f"{_fmt(m['time_to_target_s'])} |"
        )
    if target is None:
        lines += ["", "No target: one run did not improve on its starting accuracy."]
    return [*lines, ""]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report.get("modes") or {f"max_staleness={k}": v for k, v in report.get("runs", {}).items()}
    sweep = report.get("sweep")
    learning = report.get("learning")
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(16 if sweep else 11, 4))
    ax_t, ax_r = axes[0], axes[1]
    for name, run in runs.items():
        t, n = zip(*run["samples_curve"]) if run["samples_curve"] else ((), ())
        ax_t.plot(t, n, label=name)
        if not learning:
            rt, rv = zip(*run["reward_curve"]) if run["reward_curve"] else ((), ())
            ax_r.plot(rt, _moving_mean(list(rv), max(1, len(rv) // 10)), label=name, alpha=0.8)
    unit = "modelled s" if report["compute"] == "modelled" else "s"
    ax_t.set(xlabel=f"wall time ({unit})", ylabel="trained samples (cumulative)", title="throughput")
    if learning:
        # The learning workload: what the throughput buys, held-out accuracy against wall time.
        for name, m in learning["modes"].items():
            at, av = zip(*m["curve"]) if m["curve"] else ((), ())
            ax_r.plot(at, av, marker=".", label=name)
        if learning["target_accuracy"] is not None:
            ax_r.axhline(learning["target_accuracy"], color="grey", linestyle=":", label="target")
        ax_r.set(
            xlabel="wall time of RL (s)",
            ylabel="held-out accuracy (greedy)",
            title=f"learning (time to target, async/sync {_fmt(learning['time_to_accuracy_ratio'])})",
        )
    else:
        ax_r.set(
            xlabel=f"wall time ({unit})", ylabel="reward/mean (moving mean, 10% of steps)", title="reward"
        )
    for ax in (ax_t, ax_r):
        ax.grid(alpha=0.3)
        ax.legend()
    if sweep:
        _plot_sweep(axes[2], sweep)
    fig.suptitle(
        f"async-rl bench: speedup {_fmt(report['speedup'])}, async at {_fmt(report['async_bound_fraction'])} "
        f"of the pipeline bound" + (" (MODELLED)" if report["compute"] == "modelled" else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _plot_sweep(ax: Any, sweep: dict[str, Any]) -> None:
    """Throughput and reward at equal wall time against max_staleness (two y axes)."""
    values = sweep["values"]
    x = [str(v["max_staleness"]) for v in values]
    ax.bar(x, [v["trained_samples_per_s"] for v in values], color="tab:blue", alpha=0.6)
    ax.set(xlabel="rollout.max_staleness", ylabel="trained samples/s", title="staleness sweep")
    twin = ax.twinx()
    rewards = [v["reward_at_equal_wall_time"] for v in values]
    twin.plot(x, [r if r is not None else float("nan") for r in rewards], "o-", color="tab:red")
    twin.set_ylabel(f"reward at {sweep['equal_wall_time_s']:.0f} s", color="tab:red")
