"""End to end: the real learner with ``trainer.num_devices=2`` (itself plus one FSDP2 rank it
starts, on a gloo group over loopback) trains what the one-process learner trains, to 1e-5.

Both runs are `async-rl train` in sync mode with the same seed: the warm start (on rank 0, before
the ranks start: its weights must reach rank 1), the samples and so the batches are the same, so
each step's loss and the weights and optimizer state in the checkpoints after steps 1 and 2 must
agree. Step 2's batch was sampled with the weights the 2-process learner gathered and sent after
step 1, so the weight sync from the mirror is in the loop too. AdamW in float32 leaves the
differences at a few 1e-6 (the two ranks add the gradient in another order)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from async_rl.metrics import read_metrics

pytestmark = pytest.mark.slow

_TOL = 1e-5
_RUN = [
    "mode=sync",
    "seed=7",
    "trainer.max_steps=2",
    "trainer.checkpoint_every=1",
    "trainer.warmup_sft_steps=30",
    "trainer.batch_groups=4",
    "rollout.group_size=4",
    "trainer.eval_every=0",
    "data.eval_size=16",
    "rollout.max_new_tokens=4",
    "transport.heartbeat_s=0.5",
]
# Per-step metrics that depend on the step's math (the rest are timings and counters).
_PREFIXES = ("loss/", "reward/", "train/", "rollout/mismatch_kl")


def _train(run_dir: Path, num_devices: int) -> list[dict]:
    cmd = [sys.executable, "-m", "async_rl.cli", "train", f"run_dir={run_dir}", *_RUN]
    cmd.append(f"trainer.num_devices={num_devices}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return read_metrics(run_dir / "metrics.jsonl")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_fsdp_learner_ranks_match_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    rows = {1: _train(one, 1), 2: _train(two, 2)}
    # The second run really was sharded: rank 0 formed a 2-rank world and started rank 1.
    assert "FSDP learner: 2 ranks on gloo" in (two / "learner.log").read_text()
    rank1_log = (two / "learner-rank1.log").read_text()
    assert "learner rank 1 of 2 up" in rank1_log and "learner rank 1: stopping" in rank1_log
    assert not (one / "learner-rank1.log").exists()

    steps = {n: {r["step"]: r for r in rows[n] if r["step"] > 0} for n in rows}
    assert sorted(steps[1]) == sorted(steps[2]) == [1, 2]
    for step in (1, 2):
        expected, got = steps[1][step], steps[2][step]
        assert got["rollout/trained_seqs"] == expected["rollout/trained_seqs"], "not the same batch"
        keys = [k for k in expected if k.startswith(_PREFIXES)]
        assert "loss/loss" in keys
        for key in keys:
            assert got[key] == pytest.approx(expected[key], rel=_TOL, abs=_TOL), f"step {step}: {key}"

    for step in (1, 2):
        ckpt = {n: run / "checkpoints" / f"step_{step}" for n, run in ((1, one), (2, two))}
        weights = {n: load_file(ckpt[n] / "model.safetensors") for n in ckpt}
        assert _max_diff(weights[1], weights[2]) < _TOL, f"weights after step {step}"
        # Full optimizer state in the one-process format (parameters by index).
        optim = {n: torch.load(ckpt[n] / "optimizer.pt", weights_only=True) for n in ckpt}
        assert optim[1]["param_groups"] == optim[2]["param_groups"]
        assert optim[1]["state"].keys() == optim[2]["state"].keys()
        for index, state in optim[1]["state"].items():
            assert _max_diff(state, optim[2]["state"][index]) < _TOL, f"optimizer state {index}"
    # The RL step moved the weights far more than the tolerance, so agreeing means something.
    before = load_file(one / "checkpoints" / "step_1" / "model.safetensors")
    after = load_file(one / "checkpoints" / "step_2" / "model.safetensors")
    assert _max_diff(before, after) > 20 * _TOL
