"""`async-rl launch` stopped by signals: SIGTERM, then SIGINT 50 ms later (GNU timeout signals
the command and its process group). The learner saves and writes its ledger, and the role
processes and the Ray instance the launch started are gone within 30 s, checked by pid."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

# The launch helpers (pytest puts this directory on sys.path: tests/ has no packages).
from test_ray_launch import _assert_all_gone, _launch, ray_tmpdir  # noqa: F401 (a fixture)

from async_rl.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_sigterm_then_sigint_stops_the_roles_and_the_ray_instance(
    tiny_model_dir: Path,
    tmp_path: Path,
    ray_tmpdir: str,  # noqa: F811
) -> None:
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, ray_tmpdir, "trainer.max_steps=100000")
    try:
        deadline = time.monotonic() + 180
        while len(read_metrics(run_dir / "metrics.jsonl")) < 3 or not (run_dir / "placement.json").exists():
            assert proc.poll() is None, f"launch ended early:\n{proc.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "no training steps within 180 s"
            time.sleep(0.2)
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        launcher_s = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by pid
            proc.communicate()
    # One request, delivered twice: whichever handler Python ran first (both may be pending
    # when a Ray call returns, and then SIGINT's runs first) names it.
    assert proc.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT), out[-3000:]
    assert ": stopping the roles" in out and "Traceback" not in out, out[-3000:]
    _assert_all_gone(run_dir, ray_tmpdir)  # by pid, within 30 s
    print(
        f"\nlaunch, SIGTERM + SIGINT: launcher gone after {launcher_s:.1f} s, all within {time.monotonic() - start:.1f} s"
    )
    ledger = json.loads((run_dir / "accounting.json").read_text())
    assert ledger["ok"] is True and ledger["version"] >= 2, ledger
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (
        json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())["version"]
        == ledger["version"]
    )
