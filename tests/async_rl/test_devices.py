"""One GPU per NCCL rank: the device layout of ``async-rl train`` (``async_rl/devices.py``),
with fake GPU counts (no CUDA needed), and its wiring into the launcher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from async_rl import launcher
from async_rl.config import SyncBackend, compose
from async_rl.devices import DeviceLayout, plan_devices, plan_from_config


def _plan(
    visible: int,
    actors: int,
    *,
    device: str = "auto",
    ranks: int = 1,
    backend: SyncBackend = SyncBackend.AUTO,
    per_actor: int = 1,
) -> DeviceLayout:
    return plan_devices(
        visible_gpus=visible,
        learner_device=device,
        learner_ranks=ranks,
        num_actors=actors,
        sync_backend=backend,
        gpus_per_actor=per_actor,
    )


def test_on_cpu_every_process_stays_on_cpu() -> None:
    assert _plan(0, 3) == DeviceLayout((), ("cpu", "cpu", "cpu"))  # auto without a GPU
    assert _plan(8, 2, device="cpu") == DeviceLayout((), ("cpu", "cpu"))  # GPUs there, CPU asked for
    assert plan_from_config(compose("train", ["rollout.num_actors=2"]), 0).actor_devices == ("cpu", "cpu")
    assert launcher.visible_gpus("cpu") == 0  # a CPU learner never asks CUDA


def test_each_actor_gets_a_gpu_of_its_own_after_the_learner_ranks() -> None:
    assert _plan(4, 3) == DeviceLayout((0,), ("cuda:1", "cuda:2", "cuda:3"))
    assert _plan(4, 2, device="cuda", ranks=2) == DeviceLayout((0, 1), ("cuda:2", "cuda:3"))
    # A learner on cuda:N leaves the GPUs before and after it to the actors.
    assert _plan(4, 3, device="cuda:2") == DeviceLayout((2,), ("cuda:0", "cuda:1", "cuda:3"))
    # In-process SGLang with tp 2: each actor takes 2 consecutive GPUs, the first its own.
    assert _plan(5, 2, per_actor=2) == DeviceLayout((0,), ("cuda:1", "cuda:3"))
    assert _plan(8, 3, device="cuda:1", per_actor=2).actor_devices == ("cuda:2", "cuda:4", "cuda:6")


def test_two_nccl_ranks_on_one_gpu_are_refused_naming_the_keys() -> None:
    # The shape of the bug: one GPU, the learner and an actor on it, NCCL weight sync.
    with pytest.raises(ValueError, match=r"NCCL weight sync needs a GPU per process") as err:
        _plan(1, 1)
    assert "rollout.num_actors=1" in str(err.value) and "weight_sync.backend=gloo" in str(err.value)
    assert "CUDA_VISIBLE_DEVICES" in str(err.value)
    with pytest.raises(ValueError, match=r"lower rollout.num_actors to 2, lower trainer.num_devices"):
        _plan(4, 3, device="cuda", ranks=2)
    with pytest.raises(ValueError, match=r"lower rollout.num_actors to 1"):
        _plan(4, 2, backend=SyncBackend.NCCL, per_actor=2)  # GPUs 1-2 for one actor, 3 is too few
    with pytest.raises(ValueError, match=r"trainer.num_devices=4 needs 4 GPUs .* 2 are visible"):
        _plan(2, 1, device="cuda", ranks=4)
    with pytest.raises(ValueError, match=r"trainer.device=cuda:3 but 2 GPUs are visible"):
        _plan(2, 1, device="cuda:3")
    with pytest.raises(ValueError, match=r"trainer.device=cuda but no GPU is visible"):
        _plan(0, 1, device="cuda")


def test_with_gloo_actors_share_gpus_round_robin() -> None:
    gloo = SyncBackend.GLOO
    assert _plan(1, 2, backend=gloo) == DeviceLayout((0,), ("cuda:0", "cuda:0"))  # nothing left free
    assert _plan(3, 4, backend=gloo).actor_devices == ("cuda:1", "cuda:2", "cuda:1", "cuda:2")
    assert _plan(2, 1, device="cuda", ranks=2, backend=gloo).actor_devices == ("cuda:0",)


def test_in_process_sglang_with_an_nccl_relay_is_refused() -> None:
    sglang = ["rollout.engine=sglang", "trainer.device=cuda"]
    with pytest.raises(ValueError, match=r"set rollout.sglang_relay_backend=gloo"):
        plan_from_config(compose("train", sglang), 4)
    with pytest.raises(ValueError, match=r"set rollout.sglang_relay_backend=gloo"):
        plan_from_config(compose("train", [*sglang, "rollout.sglang_relay_backend=nccl"]), 4)
    relay_gloo = compose("train", [*sglang, "rollout.sglang_relay_backend=gloo", "rollout.sglang_tp_size=2"])
    assert plan_from_config(relay_gloo, 3).actor_devices == ("cuda:1",)
    # An SGLang server is started by the user: the actor itself takes one GPU.
    served = compose("train", [*sglang, "rollout.sglang_url=http://127.0.0.1:30000"])
    assert plan_from_config(served, 2).actor_devices == ("cuda:1",)


@given(
    visible=st.integers(1, 9),
    actors=st.integers(1, 6),
    ranks=st.integers(1, 4),
    per_actor=st.integers(1, 3),
    pinned=st.integers(-1, 8),
)
def test_an_nccl_layout_never_puts_two_processes_on_one_gpu(
    visible: int, actors: int, ranks: int, per_actor: int, pinned: int
) -> None:
    device = f"cuda:{pinned}" if pinned >= 0 else "cuda"
    ranks = 1 if pinned >= 0 else ranks
    try:
        layout = _plan(visible, actors, device=device, ranks=ranks, per_actor=per_actor)
    except ValueError:
        return
    used = list(layout.learner_gpus)
    for dev in layout.actor_devices:
        first = int(dev.removeprefix("cuda:"))
        used += range(first, first + per_actor)
    assert len(used) == len(set(used)) and all(0 <= g < visible for g in used)
    assert len(layout.actor_devices) == actors


class _FakePopen:
    """Stands in for a child process (nothing is started): records what it was given."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.returncode = 0

    def poll(self) -> int:
        return 0


def _fake_train(monkeypatch: pytest.MonkeyPatch, gpus: int, overrides: list[str]) -> list[list[str]]:
    spawned: list[list[str]] = []

    def spawn(run_dir: Path, name: str, args: list[str]) -> Any:
        spawned.append(args)
        return _FakePopen(args)

    monkeypatch.setattr(launcher, "visible_gpus", lambda device: gpus)
    monkeypatch.setattr(launcher, "_spawn", spawn)
    monkeypatch.setattr(launcher, "_wait_for", lambda *a, **k: None)
    monkeypatch.setattr(launcher, "_follow", lambda *a, **k: 0)
    monkeypatch.setattr("async_rl.logs.setup_logging", lambda *a, **k: None)
    assert launcher.train(overrides) == 0
    return spawned


def _devices(spawned: list[list[str]]) -> list[str]:
    return [a.removeprefix("device=") for args in spawned[1:] for a in args if a.startswith("device=")]


def test_train_passes_each_actor_its_own_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spawned = _fake_train(monkeypatch, 3, [f"run_dir={tmp_path}", "rollout.num_actors=2"])
    assert spawned[0][0] == "learner" and _devices(spawned) == ["cuda:1", "cuda:2"]
    # CPU: as before, every actor on the CPU.
    spawned = _fake_train(monkeypatch, 0, [f"run_dir={tmp_path}", "rollout.num_actors=2"])
    assert _devices(spawned) == ["cpu", "cpu"]


def test_train_refuses_a_shared_gpu_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"weight_sync.backend=gloo"):
        _fake_train(monkeypatch, 1, [f"run_dir={run_dir}", "rollout.num_actors=1"])
    assert not run_dir.exists()  # no run directory, no process
