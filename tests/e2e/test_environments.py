"""End to end: `async-rl train` with each multi-turn environment, one learner and two actors,
real processes over ZeroMQ and gloo. Observation tokens travel with their mask, the metrics
count turns and tool calls, and both actors' groups are trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from async_rl.metrics import read_metrics

pytestmark = pytest.mark.slow


def _train(run_dir: Path, config: str, *overrides: str) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "async_rl.cli",
        "train",
        "--config-name",
        config,
        f"run_dir={run_dir}",
        "rollout.num_actors=2",
        "trainer.max_steps=4",
        "trainer.batch_groups=4",
        "rollout.group_size=4",
        "trainer.eval_every=4",
        "transport.heartbeat_s=0.5",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ledger = json.loads((run_dir / "accounting.json").read_text())
    assert ledger["ok"], ledger
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if r["step"] > 0]
    assert [r["version"] for r in steps] == [1, 2, 3, 4]
    by_actor: dict[str, int] = {}
    for r in steps:
        for actor, n in r["rollout/groups_by_actor"].items():
            by_actor[actor] = by_actor.get(actor, 0) + n
    assert set(by_actor) == {"actor-0", "actor-1"} and min(by_actor.values()) > 0, by_actor
    assert max(s for r in steps for s in r["rollout/trained_staleness"]) <= 1
    assert "eval/accuracy" in rows[-1]
    return steps


def test_guess_episodes_take_several_turns(tmp_path: Path) -> None:
    steps = _train(tmp_path, "guess", "trainer.warmup_sft_steps=200")
    turns = [r["rollout/turns_mean"] for r in steps]
    # A warm-started guesser wins in one turn 1 time in 15: most episodes take several.
    assert all(1.5 < t <= 4 for t in turns), turns
    # "higher\n" and "lower\n" are longer than a guess: most response tokens are observations.
    assert all(0.3 < r["rollout/observation_tokens_frac"] < 0.9 for r in steps)
    assert all(r["rollout/tool_calls_mean"] == 0 for r in steps)
    _observations_are_not_trained(steps)


def test_calculator_episodes_call_the_tool(tmp_path: Path) -> None:
    # All demonstrations use the tool, so the warm-started policy calls it.
    steps = _train(tmp_path, "calculator", "trainer.warmup_sft_steps=300", "env.demo_tool_frac=1.0")
    calls = [r["rollout/tool_calls_mean"] for r in steps]
    assert all(0.3 < c <= 1.0 for c in calls), calls  # at most max_turns - 1 = 1 call each
    assert all(r["rollout/turns_mean"] > 1.2 for r in steps)
    assert all(r["rollout/observation_tokens_frac"] > 0.05 for r in steps)
    _observations_are_not_trained(steps)


def _observations_are_not_trained(steps: list[dict]) -> None:
    for r in steps:
        # 16 rows a step: the loss counts exactly the response tokens that are not observations.
        response_tokens = r["rollout/response_len_mean"] * 16
        expected = response_tokens * (1 - r["rollout/observation_tokens_frac"])
        assert r["train/tokens"] == pytest.approx(expected, abs=1e-3)
        # The mismatch metric sees sampled tokens only (observations carry logprob 0).
        assert r["rollout/mismatch_kl"] < 1e-3
