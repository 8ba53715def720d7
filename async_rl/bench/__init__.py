"""``async-rl bench``: one workload in sync mode, then async mode (or a staleness sweep), with
the pipeline bound measured in the same run; or the same runs with modelled compute for
cluster planning. ``runner`` holds the entry point; docs/bench.md explains the figures."""

from __future__ import annotations


def bench(overrides: list[str]) -> int:
    """``async-rl bench OVERRIDES`` (imports the runner, and through it the roles, lazily)."""
    from async_rl.bench.runner import bench as run

    return run(overrides)
