"""benchmarks/weight_broadcast.py --quick: real receiver processes on loopback, every method run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "weight_broadcast.py"


@pytest.mark.slow
def test_quick_benchmark_measures_every_method(tmp_path: Path) -> None:
    """The script checks every receiver's bytes after every transfer and exits non-zero if one
    is wrong; here: it ends, and the JSON holds every method for 1 and 2 receivers."""
    out = tmp_path / "weight_sync.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--timeout-s", "30", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,  # on expiry subprocess.run kills the script by its pid
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [c["receivers"] for c in result["cells"]] == [1, 2]
    for cell in result["cells"]:
        assert cell["size_mb"] == 10 and abs(cell["bytes"] - 10 * 2**20) < 2 * 128 * 4
        assert int(cell["buckets"]["1"]) > 1 and cell["buckets"]["64"] == 1
        labels = {
            "bucketed 64 MiB (default)",
            "bucketed 1 MiB",
            "bucketed 64 MiB, packed",
            "flat broadcast",
            "tcp (parallel)",
        }
        assert set(cell["methods"]) == labels
        for label in labels:
            assert len(cell["seconds"][label]) == 2 and min(cell["seconds"][label]) > 0
            assert cell["methods"][label]["gbps_per_receiver"] > 0
    assert "| 10 MiB | 84 | 2 | flat broadcast |" in proc.stdout
