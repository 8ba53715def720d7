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
import time
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
from learners.fsdp import (
    ShardedTrainer,
    broadcast_groups,
    full_parameters,
    shard_model,
    sharded_train_step,
    split_groups,
)
from learners.trainer import StepParams, make_batch, micro_batches, train_step

_GROUP_SIZE = 4
_N_GROUPS = 5  # odd: shards of 3 and 2 groups, mini-batches of 2 and 3 groups
# name -> (estimator, optimizer, mini_batches, grad_clip, dtype, micro_batch_tokens)
_CASES: dict[str, tuple[str, str, int, float, torch.dtype, int]] = {
    "sgd_two_mini_batches": ("group", "sgd", 2, 0.0, torch.float32, 4096),
    "adamw_batch_estimator": ("batch", "adamw", 1, 1.0, torch.float64, 4096),
    # Rows of 4..14 tokens, two or three per micro-batch: the ranks hold different numbers of
    # micro-batches, so the one with fewer must run zero-weight passes to keep in step.
    "sgd_micro_batches": ("group", "sgd", 2, 0.0, torch.float32, 24),
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


def _params(mini_batches: int, grad_clip: float, micro_batch_tokens: int = 4096) -> StepParams:
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
        micro_batch_tokens=micro_batch_tokens,
    )


def _run_case(model_path: str, name: str, *, sharded: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """One learner step of case ``name``: the metrics and the weights after it (on rank 0)."""
    from transformers import AutoModelForCausalLM

    kind, opt, mini_batches, grad_clip, dtype, micro_batch_tokens = _CASES[name]
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
        _params(mini_batches, grad_clip, micro_batch_tokens),
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
    # ... and in the micro-batched case, different numbers of micro-batches in a mini-batch.
    batch = make_batch(_groups(seed=3), pad_id=0, device=torch.device("cpu"))
    counts = [
        [
            len(micro_batches(batch, slice((start + lo) * _GROUP_SIZE, (start + hi) * _GROUP_SIZE), 24))
            for lo, hi in split_groups(end - start, 2)
        ]
        for start, end in ((0, 2), (2, 5))  # the two mini-batches of 5 groups
    ]
    assert any(a != b for a, b in counts), counts

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


@pytest.mark.slow
def test_rank_waits_out_a_warm_start_longer_than_the_device_timeout(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Rank 1 (a real ``python -m learners.fsdp``) is ready long before rank 0 shards, as during a
    warm start: it must not join the gloo group until then, or its rendezvous times out after
    trainer.device_timeout_s and rank 0 cannot connect. Then one step matches one process."""
    from transformers import AutoModelForCausalLM

    from async_rl.config import compose
    from async_rl.text import load_tokenizer
    from learners.advantages import estimator_from_config
    from weight_sync.group import host_store

    timeout_s = 3.0
    cfg = compose(
        "train",
        [
            "trainer.num_devices=2",
            "trainer.device=cpu",
            f"trainer.device_timeout_s={timeout_s}",
            "trainer.num_threads=1",
            "trainer.batch_groups=4",
            f"rollout.group_size={_GROUP_SIZE}",
            "rollout.max_new_tokens=8",
        ],
    )
    model_path = str(tiny_model_dir)
    tokenizer = load_tokenizer(model_path)
    batch = make_batch(_groups(seed=3), pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    p = StepParams.from_config(cfg)
    store = host_store("127.0.0.1", 0, timeout_s)
    trainer = ShardedTrainer(
        cfg,
        model_path=model_path,
        store=store,
        store_host="127.0.0.1",
        run_dir=tmp_path,
        device=torch.device("cpu"),
    )
    procs = list(trainer._procs)
    try:
        mirror: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        deadline = time.monotonic() + 60.0
        while not trainer._store.check(["ready/1"]):  # rank 1 has loaded the model
            assert procs[0].poll() is None and time.monotonic() < deadline, "rank 1 did not start"
            time.sleep(0.05)
        time.sleep(2 * timeout_s)  # the "warm start": rank 1 idles for twice its timeout
        assert procs[0].poll() is None, "rank 1 died while rank 0 was warm-starting"
        trainer.shard(mirror, version=0)
        got = trainer.train_step(
            _groups(seed=3), batch, p, version=0, estimator=estimator_from_config(cfg, tokenizer)
        )
        trainer.gather_into(mirror, version=1)
    finally:
        trainer.close()
    assert [proc.returncode for proc in procs] == [0]
    assert "learner rank 1: stopping" in (tmp_path / "learner-rank1.log").read_text()

    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay
    )
    expected = train_step(
        model, optimizer, batch, p, version=0, estimator=estimator_from_config(cfg, tokenizer)
    )
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=_TOL, abs=_TOL), key
    gathered = dict(mirror.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(gathered[name], param, rtol=_TOL, atol=_TOL, msg=name)


@pytest.mark.slow
def test_rank_waiting_for_shard_stops_when_rank_0_closes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rank 0 closes before sharding (a failed warm start): the waiting rank exits 0 at once."""
    from async_rl.config import compose
    from weight_sync.group import host_store

    cfg = compose("train", ["trainer.num_devices=2", "trainer.device=cpu", "trainer.num_threads=1"])
    store = host_store("127.0.0.1", 0, 30.0)
    trainer = ShardedTrainer(
        cfg,
        model_path=str(tiny_model_dir),
        store=store,
        store_host="127.0.0.1",
        run_dir=tmp_path,
        device=torch.device("cpu"),
    )
    procs = list(trainer._procs)
    try:
        trainer._wait_ready()
    finally:
        start = time.monotonic()
        trainer.close()
    assert [proc.returncode for proc in procs] == [0]
    assert time.monotonic() - start < 5.0, "rank 1 had to be terminated"
    assert "stopping before the group formed" in (tmp_path / "learner-rank1.log").read_text()


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
