"""FSDP2 data parallel (learners/fsdp.py): two processes on a real gloo group over loopback give
the loss, metrics and updated weights that one process gets from ``train_step`` on the same batch.

The batch is real ``TrajectoryGroup``s for the embedded tiny model, with responses of different
lengths so the two ranks hold different numbers of tokens (the case the token-mean scale is
for), an odd number of groups (unequal shards) and a mix of rewards. Two cases:

* SGD with no gradient clip and two mini-batches: the update is ``lr * gradient``, so any error
  in the gradient's scale shows in the weights (AdamW's first step is nearly ``lr * sign(g)``
  and would hide it); the second mini-batch trains with ratio != 1 against the proximal policy.
* AdamW with the default clip and the batch-normalised estimator, whose advantages depend on
  every reward in the batch, not only the rank's own groups. In float64: AdamW's first step is
  ``lr * g / (|g| + 1e-8)``, which turns float32 rounding of the gradient sum (the two ranks add
  in another order) into differences of 1e-5 in the few weights whose gradient is near 1e-8.
"""

from __future__ import annotations

import itertools
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from async_rl.schema import FinishReason, Response, TrajectoryGroup
from learners.advantages import make_estimator
from learners.fsdp import broadcast_groups, full_parameters, shard_model, sharded_train_step, split_groups
from learners.trainer import StepParams, make_batch, train_step

_GROUP_SIZE = 4
_N_GROUPS = 5  # odd: shards of 3 and 2 groups, mini-batches of 2 and 3 groups
# name -> (estimator, optimizer, mini_batches, grad_clip, dtype)
_CASES: dict[str, tuple[str, str, int, float, torch.dtype]] = {
    "sgd_two_mini_batches": ("group", "sgd", 2, 0.0, torch.float32),
    "adamw_batch_estimator": ("batch", "adamw", 1, 1.0, torch.float64),
}
_TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _groups(seed: int) -> list[TrajectoryGroup]:
    """Seeded groups of the tiny model's token ids: lengths 1..8, rewards 0/1 (never all equal),
    behaviour logprobs that differ from the learner's so importance weights are not all 1."""
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(_N_GROUPS):
        rewards = rng.permutation([1.0, 0.0] + [float(rng.integers(0, 2)) for _ in range(_GROUP_SIZE - 2)])
        responses = []
        for j in range(_GROUP_SIZE):
            length = int(rng.integers(1, 9))
            responses.append(
                Response(
                    token_ids=rng.integers(3, 130, length).astype(np.int32),
                    logprobs=rng.uniform(-6.0, -4.0, length).astype(np.float32),
                    versions=np.zeros(length, dtype=np.int32),
                    reward=rewards[j],
                    finish_reason=FinishReason.LENGTH if length == 8 else FinishReason.STOP,
                )
            )
        prompt = rng.integers(3, 130, int(rng.integers(3, 7))).astype(np.int32)
        groups.append(TrajectoryGroup(i, i, "test", prompt, responses))
    return groups


def _params(mini_batches: int, grad_clip: float) -> StepParams:
    return StepParams(
        eps_low=0.2,
        eps_high=0.28,
        is_cap=2.0,
        temperature=1.0,
        grad_clip=grad_clip,
        mini_batches=mini_batches,
        max_new_tokens=8,
        overlong_buffer=2,
        overlong_penalty=1.0,
    )


def _run_case(model_path: str, name: str, *, sharded: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """One learner step of case ``name``: the metrics and the weights after it (on rank 0)."""
    from transformers import AutoModelForCausalLM

    kind, opt, mini_batches, grad_clip, dtype = _CASES[name]
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    if sharded:
        shard_model(model, device_type="cpu")
    if opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    groups = _groups(seed=3)
    if sharded:
        received = broadcast_groups(groups if dist.get_rank() == 0 else None, device=torch.device("cpu"))
        for mine, theirs in zip(groups, received, strict=True):
            for a, b in zip(mine.responses, theirs.responses, strict=True):
                assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.logprobs, b.logprobs)
        groups = received
    batch = make_batch(groups, pad_id=0, device=torch.device("cpu"))
    step = sharded_train_step if sharded else train_step
    metrics = step(
        model,
        optimizer,
        batch,
        _params(mini_batches, grad_clip),
        version=0,
        estimator=make_estimator(kind, group_size=_GROUP_SIZE),
    )
    if sharded:
        weights = full_parameters(model)
    else:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return metrics, weights


def _worker(rank: int, world_size: int, port: int, model_path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    try:
        results = {name: _run_case(model_path, name, sharded=True) for name in _CASES}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_split_groups_is_contiguous_and_balanced() -> None:
    assert split_groups(5, 2) == [(0, 2), (2, 5)]
    assert split_groups(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for n, w in ((7, 3), (16, 8), (9, 2)):
        spans = split_groups(n, w)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1


@pytest.mark.slow
def test_two_fsdp_ranks_match_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The ranks really hold different token counts, so the per-rank scale is exercised.
    mask = make_batch(_groups(seed=3), pad_id=0, device=torch.device("cpu")).mask
    rows = [sum(r.length for g in _groups(3)[lo:hi] for r in g.responses) for lo, hi in split_groups(5, 2)]
    assert int(mask.sum()) == sum(rows) and rows[0] != rows[1]

    out = tmp_path / "sharded.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_model_dir), str(out)), nprocs=2, join=True)
    sharded = torch.load(out)
    for name in _CASES:
        metrics, weights = _run_case(str(tiny_model_dir), name, sharded=False)
        got_metrics, got_weights = sharded[name]
        assert got_metrics.keys() == metrics.keys(), name
        for key, value in metrics.items():
            assert got_metrics[key] == pytest.approx(value, rel=_TOL, abs=_TOL), f"{name}: {key}"
        assert got_weights.keys() == weights.keys(), name
        for key, value in weights.items():
            torch.testing.assert_close(got_weights[key], value, rtol=_TOL, atol=_TOL, msg=f"{name}: {key}")
        start = _initial_weights(tiny_model_dir)
        moved = max(float((weights[k].float() - start[k]).abs().max()) for k in weights)
        assert moved > 100 * _TOL, f"{name}: the step barely moved the weights ({moved})"


def _initial_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["trainer.num_devices=0"], "trainer.num_devices=0"),
        (
            ["trainer.num_devices=2", "trainer.batch_groups=3", "trainer.mini_batches=2"],
            "trainer.batch_groups=3",
        ),
        (["trainer.num_devices=2", "trainer.device=cuda:1"], "trainer.device=cuda:1"),
        (["trainer.num_devices=2", "learner.resume=true"], "learner.resume"),
    ],
)
def test_num_devices_settings_are_checked(overrides: list[str], names: str) -> None:
    from async_rl.config import compose

    with pytest.raises(ValueError, match=names.replace(".", r"\.")):
        compose("train", overrides)
    assert compose("train", ["trainer.num_devices=2", "trainer.batch_groups=4", "trainer.mini_batches=2"])
