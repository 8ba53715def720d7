"""Mistakes a user can make get one clear line that names the thing and the fix: a missing
model directory, a bad config value, a learner address nobody answers at, an actor of
another wire-schema version. (A dataset without the expected columns: tests/async_rl/test_data.py.)"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from actors.actor import register
from async_rl.cli import main
from async_rl.schema import SCHEMA_VERSION, Rejected, decode
from async_rl.transport import ActorClient, Endpoints


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "async_rl.cli", *args], capture_output=True, text=True, timeout=timeout_s
    )


def _one_error_line(out: subprocess.CompletedProcess[str], command: str) -> str:
    assert out.returncode == 1, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith(f"async-rl {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return lines[0]


def test_a_missing_model_directory(tmp_path: Path) -> None:
    line = _one_error_line(
        _cli("learner", f"run_dir={tmp_path}", f"model.path={tmp_path / 'nope'}"), "learner"
    )
    assert line.endswith(
        f"model.path={tmp_path / 'nope'}: no such directory (give a local Hugging Face model directory)"
    )


def test_a_run_directory_that_holds_a_run_is_refused_unless_resumed(tmp_path: Path) -> None:
    """A second run into a used run_dir would append to its metrics, and its actors would read
    the old run's endpoints.json (old ports) before the learner rewrote it, then wait for ever."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "endpoints.json").write_text("{}")
    for command in ("train", "learner"):
        line = _one_error_line(_cli(command, f"run_dir={tmp_path}"), command)
        assert line.endswith(
            f"run_dir={tmp_path} already holds a run (metrics.jsonl); continue it with "
            "learner.resume=true, or give another run_dir"
        )
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    (bench_dir / "bench.json").write_text("{}")
    assert "already holds a run (bench.json)" in _one_error_line(
        _cli("bench", f"run_dir={bench_dir}"), "bench"
    )
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'  # nothing was touched


def test_a_bad_config_value_names_the_field(tmp_path: Path) -> None:
    line = _one_error_line(_cli("learner", f"run_dir={tmp_path}", "trainer.batch_groups=0"), "learner")
    assert "trainer.batch_groups=0: must be >= 1" in line
    line = _one_error_line(
        _cli("learner", f"run_dir={tmp_path}", "transport.heartbeat_s=2", "transport.learner_timeout_s=1"),
        "learner",
    )
    assert "transport.learner_timeout_s=1.0: must be > transport.heartbeat_s=2.0" in line


def test_an_unanswered_learner_address_is_retried_with_backoff_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"  # nobody listens there
    client = ActorClient(endpoint, "a0", high_water_mark=10, max_message_mb=1)
    try:
        with caplog.at_level(logging.INFO, logger="actors.actor"), pytest.raises(TimeoutError) as err:
            register(client, timeout_s=0.2, give_up_s=1.8)
    finally:
        client.close()
    assert str(err.value).startswith(f"no learner answered at {endpoint} within 2 s")
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    # Tries at 0, 1.2 and 2.4 s: waits of 0.2 s, then backoff 1 s, then 2 s (doubling).
    assert retries == [
        f"no answer from the learner at {endpoint} yet; retrying in 1 s",
        f"no answer from the learner at {endpoint} yet; retrying in 2 s",
    ]


@pytest.mark.slow
def test_an_actor_of_another_schema_version_is_refused_in_one_line(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    learner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "async_rl.cli",
            "learner",
            f"run_dir={tmp_path}",
            "trainer.warmup_sft_steps=0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ctx = zmq.Context()
    try:
        endpoints_file = tmp_path / "endpoints.json"
        deadline = time.monotonic() + 120
        while not endpoints_file.exists():
            assert learner.poll() is None, f"the learner exited ({learner.returncode})"
            assert time.monotonic() < deadline, "the learner wrote no endpoints.json within 120 s"
            time.sleep(0.1)
        control = Endpoints.load(endpoints_file).control
        # A peer one version ahead, envelope and field alike, is answered, not dropped.
        other = SCHEMA_VERSION + 1
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, b"future")
        dealer.connect(control)
        dealer.send(
            msgpack.packb(
                {
                    "v": other,
                    "k": "register",
                    "actor_id": "future",
                    "schema_version": other,
                    "pid": 1,
                    "hostname": "h",
                }
            )
        )
        assert dealer.poll(30_000), "the learner did not answer a Register of another schema version"
        reply = decode(dealer.recv())
        dealer.close()
        assert reply == Rejected(
            f"the actor speaks wire schema {other}, the learner {SCHEMA_VERSION}: run the same async-rl version on both"
        )
        # The actor command itself: one line, exit code 1, no retrying.
        monkeypatch.setattr("actors.actor.SCHEMA_VERSION", other)
        monkeypatch.setattr("async_rl.cli.setup_logging", lambda *_: None)  # leave pytest's logging be
        code = main(["actor", f"learner={endpoints_file}", "id=future2"])
        err = capsys.readouterr().err.strip()
        assert code == 1
        assert err == (
            "async-rl actor: error: the learner refused this actor: the actor speaks wire schema "
            f"{other}, the learner {SCHEMA_VERSION}: run the same async-rl version on both"
        )
    finally:
        ctx.term()
        if learner.poll() is None:
            os.kill(learner.pid, signal.SIGTERM)
        try:
            learner.wait(timeout=20)
        except subprocess.TimeoutExpired:
            learner.kill()
            learner.wait(timeout=5)


@pytest.mark.slow
def test_prompts_without_signal_stop_the_learner_with_the_reason(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """One-token responses can never hold a 2-digit sum: every group's rewards are all 0, so
    dynamic sampling drops every one. Groups keep arriving, so "are the actors alive?" would
    be wrong: the error says that no group carried signal, and what to change."""
    out = _cli(
        "train",
        f"run_dir={tmp_path}",
        "rollout.max_new_tokens=1",
        "trainer.warmup_sft_steps=0",
        "trainer.eval_every=0",
        "trainer.idle_timeout_s=20",  # also the deadline for the actor to register: not too short
        "trainer.batch_groups=4",
        "rollout.group_size=4",
        timeout_s=180,
    )
    assert out.returncode == 1, out.stdout[-2000:]
    log = (tmp_path / "learner.out").read_text()
    assert "no group passed dynamic sampling for trainer.idle_timeout_s=20 s" in log
    assert "algorithm.dynamic_sampling=false" in log and "are the actors alive" not in log
