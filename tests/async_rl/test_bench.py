"""`async-rl bench`: the report arithmetic on hand-made metrics rows, the override round trip,
and (slow) a tiny real run whose bench.json is checked against the schema it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from async_rl.bench.config import compose_bench, train_overrides
from async_rl.bench.report import (
    accuracy_curve,
    compare,
    learning_summary,
    pipeline_bound,
    reward_at,
    summarize_run,
    time_to_accuracy,
    write_outputs,
)
from async_rl.config import compose, to_dict
from async_rl.metrics import read_metrics


def _row(step: int, t: float, **kw: object) -> dict[str, object]:
    names = {
        "wait": "time/wait_s",
        "train": "time/train_s",
        "sync": "time/weight_sync_s",
        "tokens": "train/tokens",
        "gen": "throughput/gen_tokens_per_s",
        "leases": "rollout/trained_leases",
        "stale": "rollout/trained_staleness",
        "accepted": "leases/accepted",
        "filtered": "leases/filtered",
        "reward": "reward/mean",
    }
    return {"step": step, "time_s": t} | {names[k]: v for k, v in kw.items()}


# Four steps of a run: step 0 (before training), then three steps of 2 groups each.
_ROWS = [
    _row(0, 0.0, accepted=0, filtered=0),
    *(
        _row(
            step,
            t,
            wait=w,
            train=tr,
            sync=0.1,
            tokens=tok,
            gen=gen,
            leases=leases,
            stale=stale,
            accepted=acc,
            filtered=filt,
            reward=rew,
        )
        for step, t, w, tr, tok, gen, leases, stale, acc, filt, rew in (
            (1, 2.0, 1.5, 0.4, 100, 50, [0, 1], [0, 0], 2, 1, 0.0),
            (2, 3.0, 0.2, 0.7, 120, 200, [2, 3], [1, 0], 4, 1, 0.5),
            (3, 4.0, 0.0, 0.9, 80, 100, [4, 5], [1, 1], 6, 2, 1.0),
        )
    ),
]


def test_time_to_accuracy_by_hand() -> None:
    sync = [[0.0, 0.30], [10.0, 0.40], [20.0, 0.55], [30.0, 0.60]]
    async_ = [[0.0, 0.30], [4.0, 0.50], [8.0, 0.62], [12.0, 0.70]]
    out = learning_summary({"sync": sync, "async": async_})
    # The best both reached is sync's 0.60: sync at 30 s, async at 8 s.
    assert out["target_accuracy"] == 0.60
    assert out["modes"]["sync"]["time_to_target_s"] == 30.0
    assert out["modes"]["async"]["time_to_target_s"] == 8.0
    assert out["time_to_accuracy_ratio"] == pytest.approx(8 / 30)
    assert out["modes"]["async"]["best_accuracy"] == 0.70 and out["modes"]["sync"]["start_accuracy"] == 0.30
    # A run that never beats its start gives no target and no ratio.
    flat = learning_summary({"sync": [[0.0, 0.3], [10.0, 0.3]], "async": async_})
    assert flat["target_accuracy"] is None and flat["time_to_accuracy_ratio"] is None
    assert accuracy_curve(
        [{"step": 0, "time_s": 0.5, "eval/accuracy": 0.25}, {"step": 1, "time_s": 2.0}]
    ) == [[0.5, 0.25]]
    assert time_to_accuracy(sync, 0.9) is None


def test_summary_rates_are_over_the_steady_window_by_hand() -> None:
    s = summarize_run(_ROWS, group_size=4, batch_groups=2, skip_steps=1, gen_capacity_samples_per_s=20.0)
    # Window: steps 2..3, from t=2 to t=4.
    assert s["steady_window_s"] == pytest.approx(2.0)
    assert s["trained_samples_per_s"] == pytest.approx(2 * 2 * 4 / 2.0)
    assert s["trained_tokens_per_s"] == pytest.approx((120 + 80) / 2.0)
    assert s["gen_tokens_per_s"] == pytest.approx((200 * 1.0 + 100 * 1.0) / 2.0)
    # Groups that ended (accepted or filtered) in the window: 8 - 3.
    assert s["gen_samples_per_s"] == pytest.approx(5 * 4 / 2.0)
    assert s["trained_samples_per_s_overall"] == pytest.approx(3 * 2 * 4 / 4.0)
    assert s["learner_idle_frac"] == pytest.approx(0.2 / 2.0)
    assert s["learner_train_frac"] == pytest.approx(1.6 / 2.0)
    # The rest of the window (2 - 0.2 waiting - 1.6 training) went to syncs, evals, logging.
    assert s["learner_other_frac"] == pytest.approx(0.2 / 2.0)
    assert s["weight_sync_s"] == pytest.approx(0.1)
    assert s["actor_idle_frac"] == pytest.approx(1 - 10.0 / 20.0)
    assert s["staleness_mean"] == pytest.approx(3 / 6) and s["staleness_max"] == 1
    assert s["filtered_group_frac"] == pytest.approx(2 / 8)
    assert s["samples_curve"] == [[2.0, 8.0], [3.0, 16.0], [4.0, 24.0]]
    assert s["reward_curve"][-1] == [4.0, 1.0]


def test_summary_of_a_run_without_steps_says_where_to_look() -> None:
    with pytest.raises(RuntimeError, match=r"learner\.out"):
        summarize_run(_ROWS[:1], group_size=4, batch_groups=2, skip_steps=1, gen_capacity_samples_per_s=None)


def test_reported_actor_idle_and_pause_replace_the_estimates() -> None:
    from async_rl.bench.report import estimates

    estimated = summarize_run(
        _ROWS, group_size=4, batch_groups=2, skip_steps=1, gen_capacity_samples_per_s=20.0
    )
    assert set(estimates({"a": estimated})) == {"actor_idle_frac", "generation_pause_s"}
    rows = [r | {"actors/idle_frac": 0.25, "time/gen_pause_s": 0.01} if r["step"] else r for r in _ROWS]
    measured = summarize_run(
        rows, group_size=4, batch_groups=2, skip_steps=1, gen_capacity_samples_per_s=20.0
    )
    assert measured["actor_idle_frac"] == 0.25 and measured["generation_pause_s"] == 0.01
    assert estimates({"a": measured}) == {}


def test_pipeline_bound_async_is_the_min_sync_the_harmonic_sum() -> None:
    b = pipeline_bound(100.0, 50.0)
    assert b["async_bound"] == 50.0
    assert b["sync_bound"] == pytest.approx(1 / (1 / 100 + 1 / 50))
    assert b["bottleneck"] == "training"
    assert pipeline_bound(10.0, 50.0)["bottleneck"] == "generation"


def test_compare_and_reward_at_equal_time() -> None:
    s = summarize_run(_ROWS, group_size=4, batch_groups=2, skip_steps=1, gen_capacity_samples_per_s=None)
    assert compare(s, s)["trained_samples_per_s"] == pytest.approx(1.0)
    curve = [[1.0, 0.0], [2.0, 0.2], [3.0, 0.4], [4.0, 0.6]]
    assert reward_at(curve, 4.0) == pytest.approx(0.5)  # steps in [3, 4]
    assert reward_at(curve, 0.5) is None


def test_train_overrides_reproduce_the_bench_config_in_async_rl_train() -> None:
    cfg = compose_bench(["trainer.batch_groups=3", "data.question_key='it\\'s'", "sweep.max_staleness=[0,2]"])
    assert cfg.sweep.max_staleness == [0, 2]
    overrides = train_overrides(cfg, {"mode": "sync", "model.path": "/m"})
    composed = to_dict(compose("train", overrides))
    expected = {k: v for k, v in to_dict(cfg).items() if k not in ("bench", "sweep", "cost")}
    expected["mode"], expected["model"]["path"], expected["rollout"]["max_staleness"] = "sync", "/m", 0
    assert composed == expected


def test_bad_bench_values_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"sweep\.max_staleness"):
        compose_bench(["sweep.max_staleness=[1,1]"])
    with pytest.raises(ValueError, match=r"bench\.skip_steps"):
        compose_bench(["bench.skip_steps=-1"])


def test_outputs_from_a_report(tmp_path: Path) -> None:
    s = summarize_run(_ROWS, group_size=4, batch_groups=2, skip_steps=1, gen_capacity_samples_per_s=20.0)
    report = {
        "compute": "real",
        "speedup": 1.5,
        "async_bound_fraction": 0.9,
        "sync_bound_fraction": 0.5,
        "bound": pipeline_bound(20.0, 10.0),
        "wall_s": 10.0,
        "machine": {"summary": "2 CPUs"},
        "estimates": {"actor_idle_frac": "how"},
        "modes": {"sync": s, "async": s},
        "ratios": compare(s, s),
        "capacity": {
            "training": {
                "step_over_bare": 1.25,
                "paired_steps": 3,
                "phase_frac": {"backward": 0.5, "logprobs": 0.25, "optimizer": 0.25},
            }
        },
    }
    paths = write_outputs(report, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["speedup"] == 1.5
    md = (tmp_path / "bench.md").read_text()
    assert "| trained samples/s (steady) | 8 | 8 | 1 |" in md
    assert "actor_idle_frac: how" in md
    assert "3 capacity steps paired): **1.25**" in md
    assert "backward 50.0%, logprobs 25.0%, optimizer 25.0%" in md
    assert {p.name for p in paths} >= {"bench.json", "bench.md"}


# ------------------------------------------------------------------------------ a real run

_TINY = [
    "trainer.warmup_sft_steps=4",
    "trainer.warmup_sft_batch=4",
    "trainer.max_steps=4",
    "trainer.batch_groups=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=8",
    "rollout.max_num_seqs=4",
    "bench.capacity_gen_s=1.5",
    "bench.capacity_train_steps=3",  # the third is also timed as a bare step
    "bench.skip_steps=1",
    "transport.heartbeat_s=0.5",
    # The learning workload: the embedded demo's config, shrunk, 4 s of RL per mode.
    "bench.learning_s=4",
    "bench.learning_eval_every=2",
    'bench.learning_overrides=["trainer.warmup_sft_steps=20","trainer.batch_groups=4","data.eval_size=16"]',
]

_MODE_KEYS = {
    "wall_s",
    "trained_samples_per_s",
    "trained_tokens_per_s",
    "gen_tokens_per_s",
    "learner_idle_frac",
    "learner_other_frac",
    "actor_idle_frac",
    "weight_sync_s",
    "generation_pause_s",
    "staleness_mean",
    "staleness_max",
    "filtered_group_frac",
    "reward_curve",
    "samples_curve",
}


@pytest.mark.slow
def test_tiny_bench_writes_the_promised_bench_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "async_rl.cli", "bench", f"run_dir={tmp_path}", *_TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["compute"] == "real"
    for key in ("speedup", "async_bound_fraction", "sync_bound_fraction", "ratios", "bound", "capacity"):
        assert key in report, key
    assert isinstance(report["speedup"], float) and report["speedup"] > 0
    assert isinstance(report["async_bound_fraction"], float) and report["async_bound_fraction"] > 0
    assert set(report["modes"]) == {"sync", "async"}
    for name, mode in report["modes"].items():
        assert set(mode) >= _MODE_KEYS, (name, _MODE_KEYS - set(mode))
        assert mode["trained_samples_per_s"] > 0
        assert len(mode["reward_curve"]) == 4
    assert report["modes"]["sync"]["staleness_max"] == 0
    assert report["bound"]["bottleneck"] in ("generation", "training")
    assert report["capacity"]["generation"]["gen_tokens_per_s"] > 0
    assert report["capacity"]["training"]["trained_samples_per_s"] > 0
    training = report["capacity"]["training"]
    assert training["paired_steps"] == 1 and training["step_over_bare"] > 0
    assert sum(training["phase_frac"].values()) == pytest.approx(1.0)
    assert {"batching", "advantages", "logprobs", "backward", "optimizer"} <= set(training["phase_frac"])
    assert "| trained samples/s (steady) |" in (tmp_path / "bench.md").read_text()
    learning = report["learning"]
    assert learning["config"] == "train" and learning["learning_s"] == 4
    for mode in ("sync", "async"):
        rows = read_metrics(tmp_path / f"learning-{mode}" / "metrics.jsonl")
        # trainer.max_time_s stopped the run: its last step is past 4 s of RL and evaluated.
        assert rows[-1]["time_s"] >= 4 and "eval/accuracy" in rows[-1]
        curve = learning["modes"][mode]["curve"]
        assert curve == [[r["time_s"], r["eval/accuracy"]] for r in rows if "eval/accuracy" in r]
        assert len(curve) >= 2
    # Both runs started from the same warm-started checkpoint: the same step-0 accuracy.
    assert learning["modes"]["sync"]["start_accuracy"] == learning["modes"]["async"]["start_accuracy"]
    assert "Time to accuracy" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "sync" / "metrics.jsonl").is_file() and (
        tmp_path / "async" / "metrics.jsonl"
    ).is_file()


# ------------------------------------------------------------------------------ the cost model


def test_modelled_engine_charges_each_decode_step_for_the_batch_it_runs() -> None:
    from async_rl.bench.config import CostConfig
    from async_rl.bench.costmodel import Costs, ModelledEngine
    from async_rl.schema import Lease

    costs = Costs(CostConfig(decode_base_ms=10.0, decode_per_seq_ms=1.0, prefill_per_token_ms=0.5))
    engine = ModelledEngine(costs, max_num_seqs=4, prompt_tokens=8)
    engine.add(Lease(0, 0, 0, "q", "a"), np.array([3, 5]))
    engine.set_version(0)
    elapsed, finished = engine.advance(budget_s=1.0)
    # Prefill 8 * 0.5 ms; 3 steps with 2 sequences (12 ms each); 2 steps with 1 (11 ms each).
    assert elapsed == pytest.approx((4 + 3 * 12 + 2 * 11) / 1000)
    assert [(row.index, row.length) for row, _ in finished] == [(0, 3), (1, 5)]
    assert not engine.has_work()


def test_modelled_tokens_carry_the_version_that_sampled_them() -> None:
    from async_rl.bench.config import CostConfig
    from async_rl.bench.costmodel import Costs, ModelledEngine
    from async_rl.schema import Lease

    engine = ModelledEngine(Costs(CostConfig(decode_base_ms=10.0)), max_num_seqs=2, prompt_tokens=1)
    engine.add(Lease(0, 0, 0, "q", "a"), np.array([4]))
    engine.advance(budget_s=0.015)  # 2 decode steps: one that starts within the budget ends
    engine.set_version(3)
    _, finished = engine.advance(budget_s=1.0)
    assert finished[0][1].tolist() == [0, 0, 3, 3]


@pytest.mark.slow
def test_modelled_bench_runs_the_coordinator_and_transport_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from async_rl.bench.runner import bench

    overrides = [
        f"run_dir={tmp_path}",
        "bench.compute=modelled",
        "bench.skip_steps=1",
        "cost.num_actors=4",
        "cost.learner_gpus=1",
        "cost.batch_groups=4",
        "cost.group_size=4",
        "cost.max_num_seqs=16",
        "cost.max_steps=4",
        "cost.length_scale=2",
        "cost.max_response_tokens=256",
        "cost.time_scale=0.01",
    ]
    assert bench(overrides) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["compute"] == "modelled" and "MODELLED" in report["modelled_note"]
    assert report["speedup"] > 0 and report["async_bound_fraction"] > 0
    assert report["bound"]["bottleneck"] in ("generation", "training")
    sync, async_ = report["modes"]["sync"], report["modes"]["async"]
    assert sync["staleness_max"] == 0 and len(sync["reward_curve"]) == 4
    assert async_["trained_samples_per_s"] > 0 and async_["generation_pause_measured"]
    assert "MODELLED" in (tmp_path / "bench.md").read_text()
    assert "MODELLED" in capsys.readouterr().out
