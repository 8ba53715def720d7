"""A real learner killed with SIGKILL in the middle of a checkpoint save, then resumed: the
resumed learner loads the last complete checkpoint and trains on, and the run directory keeps
``trainer.keep_checkpoints`` checkpoints and nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# The fleet helpers (pytest puts this directory on sys.path: tests/ has no packages).
from test_fleet import _SMALL, _check_ledger, _Fleet

pytestmark = [pytest.mark.slow, pytest.mark.faults]

_ARGS = [
    *(a for a in _SMALL if not a.startswith("trainer.max_steps=")),
    "transport.learner_timeout_s=3.0",  # the actor notices the dead learner quickly
    "trainer.checkpoint_every=2",
]

# Test only: `async-rl` with every rename and deletion under a checkpoints/ directory followed
# by a pause, so that the test sees the moment it wants and kills the learner there.
_SLOW_CHECKPOINTS = """
    import os, shutil, sys, time

    def slowed(real):
        def op(*args, **kwargs):
            out = real(*args, **kwargs)
            if f"{os.sep}checkpoints{os.sep}" in os.fspath(args[0]):
                time.sleep(1.0)
            return out
        return op

    os.replace, os.rename, shutil.rmtree = slowed(os.replace), slowed(os.rename), slowed(shutil.rmtree)
    from async_rl.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_save_then_resume_loads_the_last_complete_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    wrapper = tmp_path / "slow_checkpoints.py"
    wrapper.write_text(textwrap.dedent(_SLOW_CHECKPOINTS))
    fleet = _Fleet(tmp_path)
    args = [f"run_dir={tmp_path}", "rollout.num_actors=1", *_ARGS]
    try:
        # Two steps: the periodic save of v2, then the final save writes v2 again. The learner is
        # killed during that second save, once the checkpoint `latest` names is out of its place.
        with (tmp_path / "learner-killed.out").open("wb") as log:
            first = subprocess.Popen(
                [sys.executable, str(wrapper), "learner", *args, "trainer.max_steps=2"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        fleet.procs["learner"] = first
        fleet.wait("endpoints.json", (tmp_path / "endpoints.json").exists)
        fleet.start_actor("a0")

        def mid_resave() -> bool:
            try:
                named = (checkpoints / "latest").read_text()
            except FileNotFoundError:
                return False
            return named == "step_2" and not (checkpoints / "step_2").exists()

        fleet.wait("the re-save of step_2, mid-way", mid_resave, timeout_s=180, poll_s=0.01)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert (checkpoints / ".tmp_step_2").is_dir()  # killed mid-save, before the rename
        assert not (checkpoints / "step_2").exists()
        # Resume in the same run directory; the actor, still running, reconnects on its own.
        resumed = fleet.start("learner", "learner", *args, "trainer.max_steps=4", "learner.resume=true")
        fleet.wait("the resumed learner to finish", lambda: resumed.poll() is not None, timeout_s=240)
        assert resumed.returncode == 0, fleet.log()[-3000:]
    finally:
        fleet.stop_all()
    log = fleet.log()
    assert f"resumed from {checkpoints / 'step_2'} at v2 (learner incarnation 1)" in log, log[-3000:]
    assert "was cut short: restored the checkpoint it was replacing" in log
    assert log.count("actor a0 registered") >= 2  # the same actor process, before and after
    rows = [r for r in fleet.steps() if r["learner/incarnation"] == 1 and "rollout/trained_leases" in r]
    assert [r["version"] for r in rows] == [3, 4]
    state = json.loads((checkpoints / "step_4" / "state.json").read_text())
    assert state["version"] == 4 and state["incarnation"] == 1
    assert (checkpoints / "latest").read_text() == "step_4"
    # trainer.keep_checkpoints=3 (the default) and two versions saved; nothing half-written left.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_2", "step_4"]
    _check_ledger(tmp_path)
