"""The lease ledger the learner writes at shutdown: accounting.json and one log line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from async_rl.coordinator import Coordinator
from async_rl.data import Prompt, PromptSource
from learners.restart import write_accounting


def _coordinator() -> Coordinator:
    prompts = [Prompt(i, f"q{i}", str(i)) for i in range(20)]
    return Coordinator(PromptSource(prompts, seed=0), batch_groups=2, max_staleness=1, lease_timeout_s=10.0)


def test_a_consistent_ledger_is_written_and_logged_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = _coordinator()
    leases = c.grant("a", 4)  # (0 + 1 + 1) * 2 = 4 leases
    c.finish(leases[0].lease_id, accepted=True)
    c.finish(leases[1].lease_id, accepted=True)
    c.trained([leases[0].lease_id, leases[1].lease_id])
    c.finish(leases[2].lease_id, accepted=False)
    c.release("a")  # lease 3 re-issued
    c.finish(leases[0].lease_id, accepted=True)  # a resend: dropped
    with caplog.at_level(logging.INFO, logger="learners.restart"):
        write_accounting(tmp_path, c.accounting())
    ledger = json.loads((tmp_path / "accounting.json").read_text())
    assert {k: ledger[k] for k in ("granted", "trained", "filtered", "reissued", "duplicates_dropped")} == {
        "granted": 4,
        "trained": 2,
        "filtered": 1,
        "reissued": 1,
        "duplicates_dropped": 1,
    }
    assert ledger["ok"] is True
    assert [r.getMessage() for r in caplog.records] == [
        "lease accounting holds: granted 4 = trained 2 + buffered 0 + filtered 1 + reissued 1 + stale 0 + "
        "in flight 0; duplicates dropped 1"
    ]


def test_a_violated_ledger_is_an_error_naming_the_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = _coordinator()
    c.grant("a", 3)
    c.counts["granted"] += 1  # a lease granted without a trace: the books do not balance
    with caplog.at_level(logging.INFO, logger="learners.restart"):
        write_accounting(tmp_path, c.accounting())
    assert json.loads((tmp_path / "accounting.json").read_text())["ok"] is False
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith(
        "lease accounting VIOLATED: granted 4 = trained 0 + buffered 0 + filtered 0 + reissued 0 + "
        "stale 0 + in flight 3; duplicates dropped 0 is false (the right side sums to 3"
    )
