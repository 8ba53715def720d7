"""Hydra conventions a user brings along: ``hydra.run.dir=DIR`` chooses the run directory,
Hydra's other settings are refused with a message that names ``run_dir``, and a bad enum
value lists the values as they are typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from async_rl.bench.config import compose_bench
from async_rl.config import compose
from async_rl.launcher import make_run_dir


def test_hydra_run_dir_is_the_run_directory(tmp_path: Path) -> None:
    cfg = compose("train", [f"hydra.run.dir={tmp_path / 'a'}"])
    assert cfg.run_dir == str(tmp_path / "a")
    assert make_run_dir(cfg) == (tmp_path / "a").resolve()
    # The later of the two wins, as for any key: `async-rl train` passes the user's overrides
    # on to its learner with the resolved run_dir= after them.
    assert compose("train", ["hydra.run.dir=x", f"run_dir={tmp_path}"]).run_dir == str(tmp_path)
    assert compose("train", ["run_dir=x", "++hydra.run.dir=y"]).run_dir == "y"
    # Hydra's resolvers work there as in a Hydra app.
    assert compose("train", ["hydra.run.dir=out/${now:%Y}"]).run_dir.startswith("out/20")
    assert compose_bench([f"hydra.run.dir={tmp_path}"]).run_dir == str(tmp_path)


@pytest.mark.parametrize(
    "override", ["hydra.job.chdir=true", "hydra/job_logging=disabled", "+hydra.foo=1", "~hydra.run.dir"]
)
def test_other_hydra_settings_are_refused_naming_run_dir(override: str) -> None:
    with pytest.raises(ValueError) as err:
        compose("train", [override])
    assert str(err.value) == (
        f"bad configuration: {override}: of Hydra's own settings (hydra.*) async-rl takes only "
        "hydra.run.dir, as run_dir; set the run directory with run_dir=DIR"
    )


def test_a_bad_enum_value_lists_the_values_a_user_types() -> None:
    with pytest.raises(ValueError) as err:
        compose("train", ["algorithm.advantage=grpo"])
    assert str(err.value) == (
        "bad configuration: Error merging override algorithm.advantage=grpo Invalid value 'grpo', "
        "expected one of [group, rloo, batch, basis, kernel, direct]"
    )
    with pytest.raises(ValueError, match=r"expected one of \[async, sync\]$"):
        compose("train", ["mode=SYNCH"])
    with pytest.raises(
        ValueError, match=r"expected one of \[arithmetic, long_tail, jsonl, parquet, gsm8k, guess\]$"
    ):
        compose("train", ["data.kind=csv"])
    with pytest.raises(ValueError, match=r"expected one of \[real, modelled\]$"):
        compose_bench(["bench.compute=simulated"])
    assert compose("train", ["mode=sync"]).mode.value == "sync"  # what the message offers works


def test_the_command_line_says_it_in_one_line(tmp_path: Path) -> None:
    for override, expected in (
        ("hydra.job.chdir=true", "set the run directory with run_dir=DIR"),
        ("rollout.engine=vllm", "expected one of [torch, sglang]"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "async_rl.cli", "train", f"run_dir={tmp_path}", override],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert (
            out.stderr.startswith("async-rl train: error: bad configuration: ")
            and out.stderr.count("\n") == 1
        )
        assert expected in out.stderr
