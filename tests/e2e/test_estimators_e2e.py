"""algorithm.advantage=direct end to end on the arithmetic demo: a run saves its trajectories,
`async-rl critic` trains the step critic on them, and a second run trains with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from async_rl.metrics import read_metrics

pytestmark = pytest.mark.slow

_SMALL = [
    "trainer.warmup_sft_steps=30",
    "trainer.batch_groups=4",
    "rollout.group_size=4",
    "trainer.eval_every=0",
    "data.eval_size=16",
    "rollout.max_new_tokens=4",
    "transport.heartbeat_s=0.5",
    "trainer.max_steps=3",
]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "async_rl.cli", *args], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_direct_advantage_trains_with_a_critic_fitted_on_saved_trajectories(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    first, critic_dir, second = tmp_path / "first", tmp_path / "critics", tmp_path / "second"
    _run("train", f"run_dir={first}", *_SMALL, "learner.save_trajectories=true")
    store = first / "trajectories"
    # 3 steps x 4 groups x 4 responses, one record per trained response.
    lines = [line for part in sorted(store.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    assert len(lines) == 3 * 4 * 4

    out = _run("critic", f"store={store}", f"out={critic_dir}", "epochs=1")
    assert "critic saved" in out.stdout
    assert sorted(p.name for p in critic_dir.iterdir() if p.name.startswith("critic_")) == [
        "critic_000001"
    ]  # numbered from 1

    _run(
        "train",
        f"run_dir={second}",
        *_SMALL,
        "algorithm.advantage=direct",
        f"algorithm.critic_dir={critic_dir}",
    )
    steps = [r for r in read_metrics(second / "metrics.jsonl") if r["step"] > 0]
    assert [r["version"] for r in steps] == [1, 2, 3]
    # The direct estimator ran: its metric is there and the advantages were not all zero.
    assert all("advantage/step_abs_mean" in r for r in steps)
    assert any(r["advantage/step_abs_mean"] > 0 for r in steps)


def test_critic_command_names_the_missing_option() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "async_rl.cli", "critic", "out=/tmp/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "critic needs store=DIR" in proc.stderr
