"""End to end: `async-rl train` starts a real learner and real actor processes that talk
over ZeroMQ on 127.0.0.1 and broadcast weights over a gloo group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from async_rl.config import compose
from async_rl.metrics import read_metrics
from async_rl.reference import run_reference

pytestmark = pytest.mark.slow

# Small enough to finish in well under a minute on 2 cores.
_SMALL = [
    "trainer.warmup_sft_steps=30",
    "trainer.batch_groups=4",
    "rollout.group_size=4",
    "trainer.eval_every=0",
    "data.eval_size=16",
    "rollout.max_new_tokens=4",
    "transport.heartbeat_s=0.5",
]


def _train(run_dir: Path, *overrides: str, timeout_s: float = 150) -> list[dict]:
    cmd = [sys.executable, "-m", "async_rl.cli", "train", f"run_dir={run_dir}", *_SMALL, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_async_two_actors_respect_staleness_and_train_each_lease_once(
    tiny_model_dir: Path, tmp_path: Path, max_staleness: int
) -> None:
    rows = _train(
        tmp_path, "rollout.num_actors=2", "trainer.max_steps=6", f"rollout.max_staleness={max_staleness}"
    )
    steps = [r for r in rows if r["step"] > 0]
    # Versions advance one per step.
    assert [r["version"] for r in steps] == list(range(1, 7))
    # Every trained group is within the staleness bound.
    staleness = [s for r in steps for s in r["rollout/trained_staleness"]]
    assert len(staleness) == 6 * 4
    assert max(staleness) <= max_staleness
    # No lease is trained twice.
    leases = [lease for r in steps for lease in r["rollout/trained_leases"]]
    assert len(leases) == len(set(leases)) == 24
    # Both actors took part: each generated groups that were trained.
    by_actor: dict[str, int] = {}
    for r in steps:
        for actor, n in r["rollout/groups_by_actor"].items():
            by_actor[actor] = by_actor.get(actor, 0) + n
    assert set(by_actor) == {"actor-0", "actor-1"} and min(by_actor.values()) > 0, by_actor
    # The learner's accounting adds up: each granted lease ended once or is still in flight.
    ledger = json.loads((tmp_path / "accounting.json").read_text())
    assert ledger["ok"], ledger
    assert rows[-1]["leases/duplicates"] == 0
    # The keys every metrics line promises.
    for key in (
        "step",
        "version",
        "time_s",
        "reward/mean",
        "rollout/staleness_mean",
        "rollout/staleness_max",
        "rollout/filtered_groups",
        "loss/clip_frac_low",
        "loss/clip_frac_high",
        "loss/is_weight_mean",
        "rollout/mismatch_kl",
        "throughput/gen_tokens_per_s",
        "throughput/train_tokens_per_s",
        "time/weight_sync_s",
    ):
        assert all(key in r for r in rows), key
    # Actor and learner agree on the logprobs of tokens sampled by the learner's version.
    assert all(r["rollout/mismatch_kl"] < 1e-4 for r in steps)


_SYNC = ["mode=sync", "seed=7", "trainer.max_steps=3"]


def test_sync_mode_is_bit_identical_run_to_run_and_matches_the_reference_loop(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    weights = []
    for name in ("a", "b"):
        rows = _train(tmp_path / name, *_SYNC)
        assert all(s == 0 for r in rows if r["step"] > 0 for s in r["rollout/trained_staleness"])
        weights.append(load_file(tmp_path / name / "checkpoints" / "step_3" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert weights[0][key].equal(weights[1][key]), key
    # The RL steps moved the weights: the same run with no RL step (the warm start alone, which
    # is deterministic too) ends elsewhere.
    _train(tmp_path / "warm", *_SYNC, "trainer.max_steps=0")
    warm = load_file(tmp_path / "warm" / "checkpoints" / "step_0" / "model.safetensors")
    moved = max(float((weights[0][k] - warm[k]).abs().max()) for k in warm)
    assert moved > 1e-4, f"three RL steps moved no weight by more than {moved}"
    # The learner and actor processes (ZeroMQ, gloo broadcast, admission control) train on
    # exactly what the single-process loop trains on: same prompts, samples and batches.
    reference = run_reference(compose("train", [*_SMALL, *_SYNC]), tiny_model_dir)
    expected = dict(reference.named_parameters())
    compared = [k for k in weights[0] if k in expected]
    assert compared, "no parameter names in common"
    for key in compared:
        torch.testing.assert_close(weights[0][key], expected[key].detach(), rtol=0, atol=1e-6, msg=key)


def test_bfloat16_engines_train_float32_master_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """model.dtype=bfloat16: the engines hold bfloat16 weights, the learner float32 masters it
    casts as it broadcasts. At lr 1e-6 nearly every update is below bfloat16's resolution, so a
    learner training bfloat16 weights leaves almost all of them unchanged; with float32 masters
    almost every weight moves. Both runs warm-start the same way (sync mode is deterministic),
    so the difference between them is the three RL steps alone."""
    common = ["mode=sync", "model.dtype=bfloat16", "trainer.lr=1e-6", "trainer.warmup_sft_steps=200"]
    _train(tmp_path / "warm", *common, "trainer.max_steps=0")
    rows = _train(tmp_path / "rl", *common, "trainer.max_steps=3", "trainer.batch_groups=2")
    steps = [r for r in rows if r["step"] > 0]
    assert len(steps) == 3
    # The bfloat16 engine and the learner (autocast to bfloat16 on float32 weights) agree on
    # logprobs to bfloat16 precision.
    assert all(r["rollout/mismatch_kl"] < 1e-2 for r in steps)
    warm = load_file(tmp_path / "warm" / "checkpoints" / "step_0" / "model.safetensors")
    trained = load_file(tmp_path / "rl" / "checkpoints" / "step_3" / "model.safetensors")
    assert {t.dtype for t in trained.values()} == {torch.float32}
    changed = sum(int((trained[k] != warm[k]).sum()) for k in warm)
    total = sum(t.numel() for t in warm.values())
    assert changed / total > 0.9, changed / total
