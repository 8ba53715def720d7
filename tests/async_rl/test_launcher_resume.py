"""``async-rl learner learner.resume=true``: what the launcher checks before resuming."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from async_rl.config import compose
from async_rl.launcher import warn_config_changes, write_config


def test_resuming_with_other_overrides_warns_per_changed_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_config(compose("train", ["trainer.batch_groups=4"]), tmp_path)
    again = compose("train", ["trainer.batch_groups=8", "learner.resume=true"])
    with caplog.at_level(logging.WARNING, logger="async_rl.launcher"):
        assert warn_config_changes(again, tmp_path) == ["trainer.batch_groups"]
    assert [r.getMessage() for r in caplog.records] == [
        "resuming with trainer.batch_groups=8; the run was started with 4"
    ]
