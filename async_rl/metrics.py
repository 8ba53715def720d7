"""The one metrics sink: ``metrics.jsonl`` (one line per learner step), plus TensorBoard
event files when the optional ``tensorboard`` extra is installed.

Keys are hierarchical with units: ``loss/clip_frac_high``, ``rollout/staleness_mean``,
``time/weight_sync_s``, ``throughput/gen_tokens_per_s``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)  # line-buffered: readers see whole lines
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                logger.debug("tensorboard not installed; metrics go to metrics.jsonl only")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step} | {k: _clean(v) for k, v in metrics.items()}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than produce an unreadable line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics.jsonl (a line being written is skipped)."""
    rows: list[dict[str, Any]] = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
