"""Process launching: ``async-rl train`` (learner + actors, with progress) and
``async-rl learner`` (the learner alone).

Every role is a separate OS process that talks only through ZeroMQ and
torch.distributed, exactly as on a cluster. The launcher starts them, shows progress from
``metrics.jsonl``, and at the end, or on SIGINT, SIGTERM or SIGHUP, stops the processes it
started, by pid; a repeated signal stops them faster, then kills them (``async_rl.supervise``).
The children watch the launcher and stop on their own if it dies.
"""

from __future__ import annotations

import datetime
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from async_rl.config import Config, compose, default_threads, flat_keys, to_dict
from async_rl.devices import plan_from_config
from async_rl.supervise import Grace, ParentWatch, StopRequests, child_env, wait_or_kill

logger = logging.getLogger(__name__)

# How long processes get to exit on their own after the learner is done or a first signal.
_EXIT_GRACE_S = 15.0


class Interrupted(Exception):
    """A stop was requested (SIGINT, SIGTERM or SIGHUP) while the launcher was waiting."""


# Files that say a run directory already holds a run (a learner's, or a bench's).
_RUN_MARKERS = ("metrics.jsonl", "bench.json")


def make_run_dir(cfg: Config) -> Path:
    """``run_dir``, or a new dated directory under ``outputs/``. A directory that already holds
    a run is refused unless ``learner.resume=true``: a second run would append to its metrics
    and its actors could read the old run's endpoints.json before the learner rewrote it."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        now = datetime.datetime.now()
        run_dir = Path("outputs") / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")
    used = [name for name in _RUN_MARKERS if (run_dir / name).is_file()]
    if used and not cfg.learner.resume:
        raise FileExistsError(
            f"run_dir={run_dir} already holds a run ({', '.join(used)}); continue it with "
            "learner.resume=true, or give another run_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir.resolve()


def write_config(cfg: Config, run_dir: Path) -> None:
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def warn_config_changes(cfg: Config, run_dir: Path) -> list[str]:
    """Before a resume: the keys whose values differ from the run's config.yaml (each logged
    as a warning, since a resumed run should normally be given the same overrides)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        return []
    before, now = flat_keys(yaml.safe_load(path.read_text()) or {}), flat_keys(to_dict(cfg))
    changed = sorted(
        k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k != "learner.resume"
    )
    for key in changed:
        logger.warning("resuming with %s=%r; the run was started with %r", key, now.get(key), before.get(key))
    return changed


def learner(overrides: list[str], config_name: str = "train") -> int:
    """``async-rl learner``: run the learner in this process until max_steps or a signal."""
    from async_rl.logs import setup_logging

    cfg = compose(config_name, overrides)
    run_dir = make_run_dir(cfg)
    setup_logging(cfg.log_level, run_dir / "learner.log")
    if cfg.learner.resume:
        warn_config_changes(cfg, run_dir)
    write_config(cfg, run_dir)
    # SIGINT, SIGTERM, SIGHUP and the death of the launcher that started it all make the
    # learner finish the step in hand, save, say bye and write accounting.json. A request
    # made while the model loads takes effect as soon as the learner exists.
    with StopRequests() as stop, ParentWatch():
        model_path = resolve_model(cfg)
        from learners.learner import Learner

        learner_ = Learner(cfg, run_dir, model_path)
        stop.forward_to(learner_.stop.set)
        logger.info("learner up: run dir %s, control %s", run_dir, learner_.endpoints.control)
        try:
            learner_.run()
        finally:
            learner_.close()
    return 0


def resolve_model(cfg: Config) -> str:
    return resolve_model_path(cfg.model.path, cfg.model.init_seed)


def resolve_model_path(path: str, init_seed: int = 0) -> str:
    """The model directory ``model.path`` names, absolute (actors may run elsewhere): the
    embedded tiny model when empty, a GGUF converted into the cache on first use for
    ``gguf:SPEC``."""
    from async_rl.convert import GGUF_SCHEME

    if path.startswith(GGUF_SCHEME):
        from async_rl.convert import cached_conversion

        return str(cached_conversion(path.removeprefix(GGUF_SCHEME)))
    if path:
        return str(Path(path).expanduser().resolve())
    from async_rl.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(init_seed))


def train(overrides: list[str], config_name: str = "train") -> int:
    """``async-rl train``: the learner and ``rollout.num_actors`` actors as processes."""
    from async_rl.logs import setup_logging

    cfg = compose(config_name, overrides)
    setup_logging(cfg.log_level)
    keys = curve_keys_for_actors(cfg)
    # Before any process starts: a layout NCCL would refuse fails here, naming the keys.
    devices = plan_from_config(cfg, visible_gpus(cfg.trainer.device)).actor_devices
    run_dir = make_run_dir(cfg)
    write_config(cfg, run_dir)
    threads = cfg.rollout.num_threads or default_threads(1 + cfg.rollout.num_actors)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    print(f"run directory: {run_dir}", flush=True)
    # Signals are only counted from here on (never raised): every wait below polls them, so
    # no signal can land between starting a child and recording it, nor cut a stop short.
    with StopRequests() as stop, ParentWatch():
        try:
            learner_args = ["learner", "--config-name", config_name, *overrides, f"run_dir={run_dir}"]
            procs["learner"] = _spawn(run_dir, "learner", learner_args)
            endpoints = run_dir / "endpoints.json"
            _wait_for(endpoints, procs["learner"], timeout_s=120.0, stop=stop)
            for i, device in enumerate(devices):
                _check(stop)
                name = f"actor-{i}"
                opts = [f"learner={endpoints}", f"id={name}", f"threads={threads}", f"device={device}"]
                opts.append(f"log_level={cfg.log_level}")
                if keys:
                    opts.append(f"keys={keys}")
                procs[name] = _spawn(run_dir, name, ["actor", *opts])
            code = _follow(run_dir, procs, cfg, stop)
        except Interrupted:
            code = stop.exit_code
        finally:
            _stop_all(procs, stop)
    if code == 0:
        print(f"done. metrics: {run_dir / 'metrics.jsonl'}", flush=True)
    return code


def _check(stop: StopRequests) -> None:
    if stop.requested:
        raise Interrupted(stop.name)


def curve_keys_for_actors(cfg: Config) -> str:
    """With transport.curve_keys_dir: its absolute path, for the actors this launcher starts
    (they authenticate before they receive the config). Both halves are loaded here first, so
    a missing key fails before any process starts, with the file's name and the fix."""
    if not cfg.transport.curve_keys_dir:
        return ""
    from async_rl.transport import load_client_keys, load_server_keys

    load_server_keys(cfg.transport.curve_keys_dir)
    load_client_keys(cfg.transport.curve_keys_dir)
    return str(Path(cfg.transport.curve_keys_dir).resolve())


def visible_gpus(learner_device: str) -> int:
    """GPUs this process sees (and so its children): 0 for a CPU learner, without asking CUDA."""
    if learner_device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def _spawn(run_dir: Path, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    # A new session: Ctrl-C in the terminal reaches only the launcher, which then stops
    # its children in order instead of all of them dying at once mid-collective. The child
    # watches this process (child_env) and stops on its own if the launcher dies.
    with (run_dir / f"{name}.out").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "async_rl.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout_s: float, stop: StopRequests) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        _check(stop)
        if proc.poll() is not None:
            raise RuntimeError(
                f"the learner exited with code {proc.returncode}; see {path.parent / 'learner.out'}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"the learner did not write {path} within {timeout_s:.0f} s")
        time.sleep(0.1)


def _follow(run_dir: Path, procs: dict[str, subprocess.Popen[bytes]], cfg: Config, stop: StopRequests) -> int:
    """Print one progress line per learner step until the learner exits (or a stop request:
    ``Interrupted``)."""
    from async_rl.metrics import read_metrics

    shown = 0
    learner_proc = procs["learner"]
    log = _LogRelay(run_dir / "learner.out")
    while True:
        _check(stop)
        log.relay()
        rows = read_metrics(run_dir / "metrics.jsonl")
        for row in rows[shown:]:
            print(progress_line(row, cfg.trainer.max_steps), flush=True)
        shown = len(rows)
        if learner_proc.poll() is not None:
            break
        for name, proc in procs.items():
            if name != "learner" and proc.poll() is not None and proc.returncode != 0:
                print(
                    f"{name} exited with code {proc.returncode}; see {run_dir / (name + '.out')}", flush=True
                )
                return 1
        time.sleep(0.25)
    for row in read_metrics(run_dir / "metrics.jsonl")[shown:]:
        print(progress_line(row, cfg.trainer.max_steps), flush=True)
    if learner_proc.returncode != 0:
        print(
            f"learner exited with code {learner_proc.returncode}; see {run_dir / 'learner.out'}", flush=True
        )
        print_tail(run_dir / "learner.out")
        return 1
    return 0


class _LogRelay:
    """Shows the learner's warm-start progress and its warnings and errors while they happen
    (metrics.jsonl starts only with RL step 0)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def relay(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = self.partial + f.read()
            self.offset = f.tell()
        *lines, self.partial = data.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if " learners.warmstart: " in line or " W " in line[:12] or " E " in line[:12]:
                print(f"learner | {line}", flush=True)


def progress_line(row: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {row['step']:>4}/{max_steps}", f"{row.get('time_s', 0):7.1f}s"]
    if "reward/mean" in row:
        parts.append(f"reward {row['reward/mean']:.3f}")
    if row.get("eval/accuracy") is not None:
        parts.append(f"eval acc {row['eval/accuracy']:.3f}")
    parts.append(
        f"staleness {row.get('rollout/staleness_mean', 0):.2f}/{row.get('rollout/staleness_max', 0)}"
    )
    parts.append(f"gen {row.get('throughput/gen_tokens_per_s', 0):7.0f} tok/s")
    parts.append(f"filtered {row.get('rollout/filtered_groups', 0)}")
    return "  ".join(parts)


def print_tail(path: Path, lines: int = 20) -> None:
    if path.exists():
        for line in path.read_text(errors="replace").splitlines()[-lines:]:
            print(f"  | {line}", flush=True)


def _stop_all(procs: dict[str, subprocess.Popen[bytes]], stop: StopRequests) -> None:
    """Stop the processes this launcher started, by pid: SIGTERM (the learner saves and says
    bye, the actors leave), then SIGKILL after a grace that each further signal shortens."""
    running = {name: p for name, p in procs.items() if p.poll() is None}
    if not running:
        return
    if stop.requested:
        print(
            f"\n{stop.name}: stopping processes (the learner saves first; up to {_EXIT_GRACE_S:.0f} s); "
            "signal again to stop faster, a third time to kill them",
            flush=True,
        )
    for proc in running.values():
        # SIGTERM, not SIGINT: a child started in the background by a shell ignores SIGINT.
        proc.send_signal(signal.SIGTERM)
    wait_or_kill(running, Grace(stop, _EXIT_GRACE_S, _say), _say)


def _say(text: str) -> None:
    print(text, flush=True)
