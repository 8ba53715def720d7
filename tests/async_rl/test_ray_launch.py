"""End to end: `async-rl launch` starts a local Ray instance, places the learner and two actors
on it as Ray actors, and they train over the usual ZeroMQ sockets and gloo weight broadcast.
Afterwards the role processes and the Ray instance are gone. An actor killed mid-run is
restarted by Ray and rejoins the learner."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from async_rl.metrics import read_metrics

pytestmark = pytest.mark.slow

# As tests/e2e/test_train_processes.py's _SMALL: well under a minute of training on 2 cores.
_SMALL = [
    "trainer.warmup_sft_steps=30",
    "trainer.batch_groups=4",
    "rollout.group_size=4",
    "trainer.eval_every=0",
    "data.eval_size=16",
    "rollout.max_new_tokens=4",
    "transport.heartbeat_s=0.5",
]


def _alive(pid: int) -> bool:
    """True while ``pid`` is a running process (a zombie awaiting its parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def ray_tmpdir() -> Iterator[str]:
    """A private Ray temp directory: this test's Ray processes name it on their command lines,
    and no other Ray instance on the machine is seen. Short, for Ray's unix socket paths."""
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _launch(run_dir: Path, ray_tmpdir: str, *overrides: str) -> subprocess.Popen[str]:
    """`async-rl launch` with 1 learner and 2 actors on a Ray instance of its own. That instance
    is sized to the roles' reservations: 1 (learner) + 2 x 0.5 (actors) = 2 logical CPUs."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmpdir}
    cmd = [sys.executable, "-m", "async_rl.cli", "launch", f"run_dir={run_dir}", *_SMALL]
    cmd += ["rollout.num_actors=2", "ray.num_cpus=2", *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(proc: subprocess.Popen[str], timeout_s: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by pid
        out, _ = proc.communicate()
        pytest.fail(f"launch did not finish in {timeout_s:.0f} s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"launch failed:\n{out[-3000:]}"
    return out


def _assert_all_gone(run_dir: Path, ray_tmpdir: str) -> None:
    """The role processes (by the pids the launch recorded) and the Ray instance it started
    (every process naming its temp directory: GCS, raylet, workers) have exited."""
    pids = {
        name: where["pid"] for name, where in json.loads((run_dir / "placement.json").read_text()).items()
    }
    assert os.getpid() not in pids.values()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [name for name, pid in pids.items() if _alive(pid)], "role processes outlived the launch"
    while [p for p in _processes_mentioning(ray_tmpdir) if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in _processes_mentioning(ray_tmpdir) if _alive(p)], "the Ray instance outlived it"


def test_launch_on_local_ray_trains_and_cleans_up(
    tiny_model_dir: Path, tmp_path: Path, ray_tmpdir: str
) -> None:
    run_dir = tmp_path / "run"
    out = _finish(_launch(run_dir, ray_tmpdir, "trainer.max_steps=3"), timeout_s=300)
    assert "step    3/3" in out

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["version"] for r in rows if r["step"] > 0] == [1, 2, 3]
    leases = [lease for r in rows if r["step"] > 0 for lease in r["rollout/trained_leases"]]
    assert len(leases) == len(set(leases)) == 12
    assert (run_dir / "checkpoints" / "step_3" / "model.safetensors").exists()
    # Both actors registered with the learner and ran until it said bye.
    log = (run_dir / "learner.log").read_text()
    assert "actor actor-0 registered" in log and "actor actor-1 registered" in log
    for name in ("actor-0", "actor-1"):
        assert "stopping: training finished" in (run_dir / f"{name}.log").read_text()
    # The launch recorded where the roles landed while they ran, not after.
    placement = run_dir / "placement.json"
    assert placement.stat().st_mtime < (run_dir / "checkpoints" / "step_3").stat().st_mtime
    assert sorted(json.loads(placement.read_text())) == ["actor-0", "actor-1", "learner"]
    _assert_all_gone(run_dir, ray_tmpdir)


@pytest.mark.faults
def test_an_actor_killed_mid_run_is_restarted_and_rejoins(
    tiny_model_dir: Path, tmp_path: Path, ray_tmpdir: str
) -> None:
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, ray_tmpdir, "trainer.max_steps=20", "weight_sync.timeout_s=20")
    deadline = time.monotonic() + 180
    while len(read_metrics(run_dir / "metrics.jsonl")) < 3 and proc.poll() is None:
        assert time.monotonic() < deadline, "no training steps within 180 s"
        time.sleep(0.2)
    assert proc.poll() is None, f"launch ended early:\n{proc.communicate()[0][-3000:]}"
    first = json.loads((run_dir / "placement.json").read_text())["actor-0"]["pid"]
    os.kill(first, signal.SIGKILL)  # the actor process this launch placed, by pid
    _finish(proc, timeout_s=300)

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["version"] for r in rows if r["step"] > 0] == list(range(1, 21))
    assert "restarted by Ray" in (run_dir / "actor-0.log").read_text()
    # The restarted process registered again under its id and trained to the end. The kill
    # comes at step 2 of 20: about 18 s of training left on 2 cores, for a restart that takes
    # about 3 s (Ray starts a worker, the actor loads the model and registers).
    log = (run_dir / "learner.log").read_text()
    assert log.count("actor actor-0 registered") == 2, log[-3000:]
    assert (run_dir / "actor-0.log").read_text().count("stopping: training finished") == 1
    _assert_all_gone(run_dir, ray_tmpdir)
