"""``trainer.sync_every > rollout.max_staleness + 1`` would deadlock: admission stops granting
leases before the learner has the groups for its next weight sync. The config refuses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from async_rl.config import Mode, compose
from async_rl.coordinator import Coordinator
from async_rl.data import Prompt, PromptSource

_BATCH = 2


def _groups_before_the_next_sync(max_staleness: int) -> int:
    """Every lease admission grants while the actors hold v0, all accepted (none filtered)."""
    prompts = [Prompt(i, f"q{i}", str(i)) for i in range(100)]
    c = Coordinator(
        PromptSource(prompts, seed=0), batch_groups=_BATCH, max_staleness=max_staleness, lease_timeout_s=60
    )
    total = 0
    while leases := c.grant("a", 100):
        for lease in leases:
            c.finish(lease.lease_id, accepted=True)
        total += len(leases)
    return total


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_the_bound_is_what_admission_lets_the_learner_train_before_a_sync(max_staleness: int) -> None:
    # The learner trains sync_every steps of batch_groups groups on the actors' v0, then syncs.
    granted = _groups_before_the_next_sync(max_staleness)
    for sync_every in range(1, 6):
        deadlocks = granted < sync_every * _BATCH
        overrides = [
            f"rollout.max_staleness={max_staleness}",
            f"trainer.sync_every={sync_every}",
            f"trainer.batch_groups={_BATCH}",
        ]
        if deadlocks:
            with pytest.raises(ValueError, match=r"trainer\.sync_every=\d+ > rollout\.max_staleness \+ 1"):
                compose("train", overrides)
        else:
            assert compose("train", overrides).trainer.sync_every == sync_every


def test_sync_mode_names_both_keys_and_why() -> None:
    with pytest.raises(ValueError) as err:
        compose("train", ["mode=sync", "trainer.sync_every=2"])
    message = str(err.value)
    assert "trainer.sync_every=2 > rollout.max_staleness + 1 = 1" in message
    assert "mode=sync sets rollout.max_staleness=0" in message
    assert "lower trainer.sync_every to <= 1 or raise rollout.max_staleness to >= 1" in message
    cfg = compose("train", ["mode=sync", "trainer.sync_every=1"])
    assert cfg.mode is Mode.SYNC and cfg.rollout.max_staleness == 0


def test_the_command_line_refuses_it_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "async_rl.cli",
            "learner",
            f"run_dir={tmp_path}",
            "mode=sync",
            "trainer.sync_every=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("async-rl learner: error: trainer.sync_every=2 > rollout.max_staleness")
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
