"""A learner restarted in its run directory, and the lease ledger it leaves there.

``learner.resume=true`` restores the latest checkpoint (``checkpoint_to_resume``). Each
learner start in a run directory gets an incarnation number (``next_incarnation``, kept in
``learner_incarnation``) and grants lease ids from its own range, so a group an actor made
for a crashed predecessor can never pass for a lease of its successor. A resumed learner
listens on its predecessor's ports (``previous_ports``) so running actors reconnect on their
own. At shutdown the learner writes the lease ledger (``write_accounting``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from async_rl.transport import Endpoints
from learners.checkpoint import latest_checkpoint

logger = logging.getLogger(__name__)


def write_accounting(run_dir: Path, ledger: dict[str, Any]) -> None:
    """Write the lease ledger (``Coordinator.accounting``) to ``accounting.json`` and log it
    on one line: at INFO when every lease ended exactly once, as an ERROR naming the counts
    when not."""
    tmp = run_dir / "accounting.json.tmp"
    tmp.write_text(json.dumps(ledger, indent=1))
    tmp.replace(run_dir / "accounting.json")
    summary = (
        f"granted {ledger['granted']} = trained {ledger['trained']} + buffered {ledger['buffered']} + "
        f"filtered {ledger['filtered']} + reissued {ledger['reissued']} + stale {ledger['stale']} + "
        f"in flight {ledger['in_flight']}; duplicates dropped {ledger['duplicates_dropped']}"
    )
    if ledger["ok"]:
        logger.info("lease accounting holds: %s", summary)
    else:
        logger.error(
            "lease accounting VIOLATED: %s is false (the right side sums to %d; accepted %d should "
            "equal trained + buffered)",
            summary,
            ledger["accounted"],
            ledger["accepted"],
        )


# Lease ids of learner incarnation k are k * 2**32 + 0, 1, ...: 4 billion leases per start,
# and room for 2**30 restarts within the wire schema's 2**62 bound.
LEASE_ID_BITS = 32
_INCARNATION_FILE = "learner_incarnation"


def checkpoint_to_resume(run_dir: Path) -> Path:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(
            f"learner.resume=true but {run_dir / 'checkpoints'} holds no checkpoint; give the run_dir= "
            "of a run that saved one (trainer.checkpoint_every=N saves every N steps), or start "
            "afresh without learner.resume"
        )
    return checkpoint


def next_incarnation(run_dir: Path) -> int:
    """How many learners started in ``run_dir`` before this one (recorded there)."""
    path = run_dir / _INCARNATION_FILE
    try:
        incarnation = int(path.read_text()) + 1
    except (FileNotFoundError, ValueError):
        incarnation = 0
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{incarnation}\n")
    tmp.replace(path)
    return incarnation


def previous_ports(run_dir: Path, control_port: int, trajectory_port: int) -> tuple[int, int] | None:
    """The ports of the previous learner in ``run_dir`` (endpoints.json), unless set explicitly."""
    if control_port or trajectory_port:
        return None
    try:
        previous = Endpoints.load(run_dir / "endpoints.json")
        return int(previous.control.rsplit(":", 1)[1]), int(previous.trajectory.rsplit(":", 1)[1])
    except (FileNotFoundError, ValueError, IndexError):
        logger.warning("no usable endpoints.json in %s; the resumed learner takes new ports", run_dir)
        return None
