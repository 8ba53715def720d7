"""``async-rl launch``: the learner and ``rollout.num_actors`` actors as Ray actors on a Ray cluster.

Ray does placement (per-role CPUs and GPUs) and lifecycle (start, restart, stop) only. Each Ray
actor runs the entry point the CLI runs, in its own worker process: the learner role runs
``launcher.learner`` (``async-rl learner``), an actor role runs ``actors.actor.run_actor``
(``async-rl actor``). They talk over the same ZeroMQ sockets and torch.distributed weight-sync
group as everywhere else; nothing of the data path goes through Ray.

Order: place the learner, start it, wait for ``endpoints.json`` in the run directory, then place
and start the actors with the learner's control endpoint. Progress comes from ``metrics.jsonl``
as with ``async-rl train``; so the run directory must be on a filesystem the launching machine
and the learner's node share (the same node, or a shared mount). At the end, or on SIGINT,
SIGTERM or SIGHUP, the learner gets SIGTERM (it checkpoints and says bye to the actors), the
roles get a grace period (a repeated signal shortens it, a third ends it), then every Ray
actor this launch created is killed; a Ray instance this launch started is shut down. A dead actor is restarted by Ray (``ray.max_restarts``) and registers again under its id,
which the learner treats as a new incarnation; the learner itself is not restarted (its
optimizer and coordinator state would be lost).

Ray is imported only inside this module's functions, so ``async-rl --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from async_rl.config import Config, RayConfig, compose, default_threads
from async_rl.launcher import curve_keys_for_actors, make_run_dir, print_tail, progress_line, write_config
from async_rl.supervise import Grace, ParentWatch, StopRequests

logger = logging.getLogger(__name__)

# How long roles get to exit on their own after the learner is done or Ctrl-C (as in `train`).
_EXIT_GRACE_S = 15.0
_POLL_S = 0.25


@dataclass
class _Roles:
    """The Ray actors this launch created, and their ``run`` calls."""

    handles: dict[str, Any] = field(default_factory=dict)
    placing: dict[str, Any] = field(default_factory=dict)  # `where` calls, queued before `run`
    runs: dict[str, Any] = field(default_factory=dict)
    where: dict[str, dict[str, Any]] = field(default_factory=dict)


def launch(overrides: list[str], config_name: str = "train") -> int:
    """``async-rl launch``: place and run the roles on Ray until the learner is done."""
    from async_rl.logs import setup_logging

    cfg = compose(config_name, overrides)
    setup_logging(cfg.log_level)
    ray_cfg = cfg.ray
    learner_device, actor_device = role_devices(cfg, ray_cfg)
    keys = curve_keys_for_actors(cfg)  # on a multi-node cluster: a path every node can read
    run_dir = make_run_dir(cfg)
    write_config(cfg, run_dir)
    # A stale endpoints.json from an earlier run in this directory would send actors astray.
    (run_dir / "endpoints.json").unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        # First: it takes a launcher's variable out of the environment that Ray's processes inherit.
        stack.enter_context(ParentWatch())
        started = _connect(ray_cfg, cfg.rollout.num_actors)
        # Ctrl-C, a batch scheduler's SIGTERM and a closed terminal's SIGHUP all stop the roles:
        # the first raises KeyboardInterrupt out of whatever Ray call is waiting, later ones
        # escalate. Installed after ray.init, whose own SIGTERM handler in the driver aborts.
        stop = stack.enter_context(StopRequests(interrupt=True))
        print(f"run directory: {run_dir}", flush=True)
        roles = _Roles()
        try:
            learner_opts = [*overrides, f"run_dir={run_dir}", f"trainer.device={learner_device}"]
            endpoint = _start_learner(roles, ray_cfg, config_name, learner_opts, cfg.transport.host, run_dir)
            threads = cfg.rollout.num_threads or default_threads(1 + cfg.rollout.num_actors)
            for i in range(cfg.rollout.num_actors):
                _start_actor(
                    roles, ray_cfg, i, run_dir, cfg.log_level, (endpoint, actor_device, threads, keys)
                )
            _wait_placed(roles, ray_cfg, [n for n in roles.handles if n != "learner"])
            (run_dir / "placement.json").write_text(json.dumps(roles.where, indent=2))
            code = _follow(run_dir, roles, cfg.trainer.max_steps)
        except KeyboardInterrupt:
            print(f"\n{stop.name or 'interrupted'}: stopping the roles", flush=True)
            code = stop.exit_code or 130
        except (TimeoutError, RuntimeError) as err:
            print(f"launch failed: {err}", flush=True)
            print_tail(run_dir / "learner.log")
            code = 1
        finally:
            with stop.polling():  # no signal cuts the stop short; each further one hurries it
                _stop(roles, stop)
                if started:
                    import ray

                    ray.shutdown()
    if code == 0:
        print(f"done. metrics: {run_dir / 'metrics.jsonl'}", flush=True)
    return code


def role_devices(cfg: Config, ray_cfg: RayConfig) -> tuple[str, str]:
    """The learner's and the actors' torch device. Ray leaves every GPU of a node visible to a
    role that reserved none, so the device follows the reservation, not what the node has.
    Actors follow the learner onto CUDA, so one broadcast backend (NCCL) serves all."""
    learner = cfg.trainer.device
    if learner == "auto":
        learner = "cuda" if ray_cfg.learner_num_gpus > 0 else "cpu"
    if learner.startswith("cuda") and ray_cfg.learner_num_gpus <= 0:
        raise ValueError(f"trainer.device={learner} needs ray.learner_num_gpus >= 1 (a GPU reserved by Ray)")
    actor = "cuda" if ray_cfg.actor_num_gpus > 0 else "cpu"
    if (actor == "cuda") != learner.startswith("cuda"):
        raise ValueError(
            f"the learner would run on {learner} and the actors on {actor}: the weight broadcast needs "
            "both on CUDA or both on CPU; set ray.learner_num_gpus and ray.actor_num_gpus both > 0 or both 0"
        )
    return learner, actor


def _connect(ray_cfg: RayConfig, num_actors: int) -> bool:
    """Join ``ray.address`` or start a local instance. True if this call connected (and so
    disconnects, or stops the instance, at the end); a driver already connected is reused."""
    import ray

    if ray.is_initialized():
        return False
    if ray_cfg.address:
        ray.init(address=ray_cfg.address, log_to_driver=False)
    else:
        need = ray_cfg.learner_num_cpus + num_actors * ray_cfg.actor_num_cpus
        ray.init(
            address="local",
            num_cpus=ray_cfg.num_cpus or max(1, math.ceil(need)),
            include_dashboard=False,
            log_to_driver=False,
        )
    return True


def _start_learner(
    roles: _Roles, ray_cfg: RayConfig, config_name: str, opts: list[str], host: str, run_dir: Path
) -> str:
    """Place and start the learner; its control endpoint once it has written endpoints.json."""
    import ray

    from async_rl.transport import Endpoints

    role = ray.remote(_LearnerRole).options(
        num_cpus=ray_cfg.learner_num_cpus, num_gpus=ray_cfg.learner_num_gpus, max_restarts=0
    )
    roles.handles["learner"] = role.remote()
    roles.placing["learner"] = roles.handles["learner"].where.remote()
    _wait_placed(roles, ray_cfg, ["learner"])
    remote = bool(ray_cfg.address) or len([n for n in ray.nodes() if n["Alive"]]) > 1
    if host in ("127.0.0.1", "localhost") and remote:
        # Actors may land on other nodes (now, or after a restart): bind, and advertise, an
        # address they can reach.
        opts = [*opts, f"transport.host={roles.where['learner']['ip']}"]
    roles.runs["learner"] = roles.handles["learner"].run.remote(config_name, opts)
    path = run_dir / "endpoints.json"
    deadline = time.monotonic() + ray_cfg.start_timeout_s
    while not path.exists():
        if ray.wait([roles.runs["learner"]], timeout=_POLL_S)[0]:
            raise RuntimeError(f"the learner stopped before it was up: {_outcome(roles.runs['learner'])}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the learner did not write {path} within ray.start_timeout_s={ray_cfg.start_timeout_s:.0f} s; "
                "with the learner on another node, run_dir must be on a filesystem both machines share"
            )
    return Endpoints.load(path).control


def _start_actor(
    roles: _Roles,
    ray_cfg: RayConfig,
    index: int,
    run_dir: Path,
    log_level: str,
    args: tuple[str, str, int, str],
) -> None:
    import ray

    role = ray.remote(_ActorRole).options(
        num_cpus=ray_cfg.actor_num_cpus,
        num_gpus=ray_cfg.actor_num_gpus,
        max_restarts=ray_cfg.max_restarts,
        max_task_retries=-1,  # a restarted actor runs `run` again: it registers anew
    )
    name = f"actor-{index}"
    roles.handles[name] = role.remote(index, str(run_dir), log_level)
    # Calls to one Ray actor run in order, one at a time: `where` must go before `run`.
    roles.placing[name] = roles.handles[name].where.remote()
    roles.runs[name] = roles.handles[name].run.remote(*args)


def _wait_placed(roles: _Roles, ray_cfg: RayConfig, names: list[str]) -> None:
    """Record where each role landed; an error naming the reservation if Ray cannot place it."""
    import ray

    for name in names:
        try:
            roles.where[name] = ray.get(roles.placing[name], timeout=ray_cfg.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            kind = "learner" if name == "learner" else "actor"
            raise TimeoutError(
                f"Ray could not place {name} within ray.start_timeout_s={ray_cfg.start_timeout_s:.0f} s: does "
                f"the cluster have ray.{kind}_num_cpus={getattr(ray_cfg, kind + '_num_cpus')} and "
                f"ray.{kind}_num_gpus={getattr(ray_cfg, kind + '_num_gpus')} free? (`ray status`)"
            ) from None
        logger.info("%s placed on %s (pid %d)", name, roles.where[name]["ip"], roles.where[name]["pid"])


def _follow(run_dir: Path, roles: _Roles, max_steps: int) -> int:
    """Print one progress line per learner step until the learner's ``run`` returns."""
    import ray

    from async_rl.metrics import read_metrics

    shown = 0
    actors = {name: ref for name, ref in roles.runs.items() if name != "learner"}
    while True:
        rows = read_metrics(run_dir / "metrics.jsonl")
        for row in rows[shown:]:
            print(progress_line(row, max_steps), flush=True)
        shown = len(rows)
        if ray.wait([roles.runs["learner"]], timeout=_POLL_S)[0]:
            break
        for name, ref in list(actors.items()):
            if ray.wait([ref], timeout=0)[0]:
                del actors[name]
                outcome = _outcome(ref)
                if outcome.startswith("failed"):
                    print(f"{name} {outcome}; see {run_dir / (name + '.log')}", flush=True)
                    return 1
    for row in read_metrics(run_dir / "metrics.jsonl")[shown:]:
        print(progress_line(row, max_steps), flush=True)
    outcome = _outcome(roles.runs["learner"])
    if outcome != "exit code 0":
        print(f"learner {outcome}; see {run_dir / 'learner.log'}", flush=True)
        print_tail(run_dir / "learner.log")
        return 1
    return 0


def _outcome(ref: Any) -> str:
    """What a finished ``run`` call came to, in words: "exit code N", "stopped: REASON" or
    "failed: ERROR" (an exception, or a process Ray could not restart)."""
    import ray

    try:
        result = ray.get(ref, timeout=0)
    except ray.exceptions.RayTaskError as err:
        return f"failed: {type(err.cause).__name__}: {err.cause}"
    except ray.exceptions.RayError as err:
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return f"exit code {result}" if isinstance(result, int) else f"stopped: {result}"


def _stop(roles: _Roles, stop: StopRequests) -> None:
    """SIGTERM to a learner still running (it checkpoints and says bye), a grace period for
    every role (each further signal shortens it), then kill each Ray actor this launch
    created, by handle."""
    import ray

    learner = roles.runs.get("learner")
    if learner is not None and not ray.wait([learner], timeout=0)[0] and "learner" in roles.where:
        _signal_learner(roles.where["learner"])
    pending = list(roles.runs.values())
    grace = Grace(stop, _EXIT_GRACE_S, lambda text: print(text, flush=True))
    while pending and (left_s := grace.left_s()) > 0:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(_POLL_S, left_s))
    for handle in roles.handles.values():
        ray.kill(handle, no_restart=True)


def _signal_learner(where: dict[str, Any]) -> None:
    """SIGTERM to the learner's process, by pid, from a task on the learner's own node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(_terminate).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(where["node_id"], soft=False)
    )
    try:
        ray.get(task.remote(where["pid"]), timeout=30)
    except ray.exceptions.RayError as err:
        logger.warning("could not signal the learner (pid %d): %s", where["pid"], err)


def _terminate(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)


def _where() -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


class _LearnerRole:
    """The learner as a Ray actor. ``run`` executes on the worker's main thread (a Ray actor
    with one concurrent call does), so ``launcher.learner`` can install its signal handlers."""

    def where(self) -> dict[str, Any]:
        return _where()

    def run(self, config_name: str, overrides: list[str]) -> int:
        from async_rl.launcher import learner

        return learner(overrides, config_name)


class _ActorRole:
    """One generator actor as a Ray actor; ``run`` is ``async-rl actor``."""

    def __init__(self, index: int, run_dir: str, log_level: str) -> None:
        self.index = index
        self.run_dir = Path(run_dir)
        self.log_level = log_level

    def where(self) -> dict[str, Any]:
        return _where()

    def run(self, learner: str, device: str, threads: int, keys_dir: str = "") -> str:
        import ray

        from async_rl.logs import setup_logging

        actor_id = f"actor-{self.index}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(self.log_level, self.run_dir / f"{actor_id}.log")
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Same id on purpose: the learner takes a second Register from an id as a new
            # incarnation, re-issues the dead one's leases and re-forms the weight-sync group.
            logger.warning("%s restarted by Ray (pid %d); registering again", actor_id, os.getpid())
        from actors.actor import run_actor

        return run_actor(learner, actor_id=actor_id, device=device, num_threads=threads, keys_dir=keys_dir)
