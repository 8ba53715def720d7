"""Data-parallel learner step over ``W`` processes with FSDP2 (``fully_shard``).

Used by the learner when ``trainer.num_devices`` = ``W`` > 1. Layout: the ``W`` learner ranks
form each process's *default* process group (NCCL on GPU, gloo on CPU); rank 0 is the learner
process that owns the sockets, the coordinator and the weight-sync group (a process group object
of its own, ``weight_sync.group.SyncGroup``), ranks 1.. only train. Rank 0 starts ranks 1.. as
``python -m learners.fsdp`` processes (``ShardedTrainer``) and tells them what to do next through
its rendezvous store (``worker_main``): both halves of that protocol are in this file.

Start-up. The ranks load the model and say ``ready`` while rank 0 warm-starts, which can take
hours. Only then does rank 0 send the first command, ``shard``, and form the default group; the
ranks wait for it as they wait for any command, for as long as rank 0 lives. They must not join
the group before: a gloo rank whose rendezvous begins ``trainer.device_timeout_s`` before rank 0
joins times out, and rank 0 then fails to connect to it. Per step:

1. ``broadcast_groups``: rank 0 sends the step's ``TrajectoryGroup``s to every rank, encoded by
   ``async_rl.schema`` (checked on decode, never pickled). Every rank builds the same full
   ``Batch`` with ``trainer.make_batch``.
2. ``sharded_train_step``: the math of ``trainer.train_step`` with the rows split by groups.
3. At a weight sync, an evaluation or a checkpoint: ``gather_into``, every rank takes part in
   the all-gather and rank 0 copies the full weights into its *mirror*, an unsharded copy of the
   model. The weight broadcast to the actors goes out from the mirror on rank 0, as in the
   one-process learner (same header, same flat buckets), so the actors and the weight-sync
   protocol do not know the learner is sharded. Evaluation (``model.generate``) and
   ``save_pretrained`` also run on the mirror, on rank 0 alone: a sharded forward pass would
   need every rank in lockstep through a data-dependent number of decode steps. The price is
   one full copy of the weights (no gradients, no optimizer state) on rank 0's device.

Why the result equals one process. ``policy_loss`` is a token mean: with ``N`` response tokens
in a mini-batch and ``n_r`` of them on rank ``r``, the one-process gradient is
``(1/N) sum_t grad loss_t``. Rank ``r``'s local loss is ``(1/n_r) sum_{t in r} loss_t`` and FSDP
averages gradients over the ``W`` ranks, so each rank scales its loss by ``W * n_r / N``:
``(1/W) sum_r (W n_r / N)(1/n_r) sum_{t in r} grad loss_t = (1/N) sum_t grad loss_t``. Without the
scale, a rank with few tokens would weigh as much as one with many. Advantages are computed on
the full batch on every rank (batch-wise estimators such as ``batch`` and ``basis`` need every
reward, and stateful estimators then keep the same history everywhere). Metrics are token-weighted
across ranks, so every rank returns what ``train_step`` returns on the whole batch.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from async_rl.config import Config, default_threads, from_dict, to_dict
from async_rl.logs import setup_logging
from async_rl.schema import SchemaError, TrajectoryGroup, decode, encode
from learners.advantages import AdvantageEstimator
from learners.trainer import (
    MASTER_DTYPE,
    Accumulated,
    Batch,
    StepParams,
    accumulate_gradients,
    advantages_for,
    autocast,
    make_batch,
    micro_batches,
    step_metrics,
    token_logprobs,
)

logger = logging.getLogger(__name__)


def shard_model(model: torch.nn.Module, *, device_type: str, reshard_after_forward: bool = True) -> Any:
    """Shard ``model`` over the default process group with ``fully_shard``, in place.

    Each transformer block (the classes in the Hugging Face model's ``_no_split_modules``) is its
    own FSDP unit, so one block's full weights are gathered at a time; the root unit holds the
    rest (embeddings, final norm, a tied LM head). Parameter names do not change, so the weight
    header the actors check stays the one-process header. Build the optimizer after this call:
    it must see the sharded parameters.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # The root unit keeps its weights gathered after forward: the learner applies the LM head
    # to the final hidden states itself, after the model's forward (learners/logprobs.py).
    return fully_shard(model, mesh=mesh, reshard_after_forward=False)


def split_groups(n_groups: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` group ranges, one per rank, sizes differing by at most one."""
    bounds = [n_groups * r // world_size for r in range(world_size + 1)]
    return list(itertools.pairwise(bounds))


def _mini_batches(n_groups: int, mini_batches: int) -> list[tuple[int, int]]:
    """Group ranges of the mini-batches, exactly as ``train_step`` splits the batch."""
    bounds = np.linspace(0, n_groups, mini_batches + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]


def sharded_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    p: StepParams,
    *,
    version: int,
    estimator: AdvantageEstimator,
) -> dict[str, float]:
    """``train_step`` on an FSDP-sharded ``model``: every rank passes the same full ``batch``
    and trains on its share of the groups of each mini-batch. Returns the metrics of the whole
    batch, the same on every rank. Each mini-batch needs at least one group per rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shaped, adv = advantages_for(model, batch, p, estimator)
    g = batch.group_size
    spans = _mini_batches(batch.input_ids.shape[0] // g, p.mini_batches)
    if min(hi - lo for lo, hi in spans) < world:
        raise ValueError(
            f"a mini-batch of {min(hi - lo for lo, hi in spans)} groups cannot give each of "
            f"trainer.num_devices={world} ranks a group; raise trainer.batch_groups or lower "
            "trainer.mini_batches"
        )
    # Rank r's rows in each mini-batch: a contiguous run of whole groups.
    local = []
    for lo, hi in spans:
        first, last = split_groups(hi - lo, world)[rank]
        local.append(slice((lo + first) * g, (lo + last) * g))
    micro = [micro_batches(batch, rows, p.micro_batch_tokens) for rows in local]
    # Every forward and backward is a collective over the ranks: ranks with fewer micro-batches
    # than another run zero-weight passes to match it.
    padding = [_max_over_ranks(len(parts), batch.mask.device) - len(parts) for parts in micro]
    proximal = None
    if p.mini_batches > 1:
        # The proximal policy is the weights before the first optimizer step of this batch.
        proximal = torch.zeros(batch.mask.shape, dtype=torch.float32, device=batch.mask.device)
        with torch.no_grad(), autocast(p.autocast_dtype, batch.input_ids.device):
            for parts, extra in zip(micro, padding):
                for rows in parts:
                    proximal[rows] = token_logprobs(model, batch, rows, p.temperature)
                for _ in range(extra):
                    token_logprobs(model, batch, parts[0][:1], p.temperature)
    model.train()
    sums: dict[str, float] = {}
    kl = torch.zeros(2, dtype=torch.float64, device=batch.mask.device)  # [sum, tokens], global
    for (lo, hi), parts, extra in zip(spans, micro, padding):
        step_tokens = int(batch.mask[lo * g : hi * g].sum())
        optimizer.zero_grad(set_to_none=True)
        # The token-mean scale of the module doc: FSDP's average over ranks then gives the
        # one-process gradient of this mini-batch.
        acc = accumulate_gradients(
            model, batch, parts, adv, proximal, p, version, step_tokens, scale=world, padding=extra
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip or float("inf"))
        optimizer.step()
        metrics = _token_weighted(acc, step_tokens, kl)
        metrics["grad_norm"] = _to_float(grad_norm)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value / p.mini_batches
    model.eval()
    return step_metrics(sums, shaped, adv, batch, estimator, float(kl[0]), int(kl[1]))


def _max_over_ranks(value: int, device: torch.device) -> int:
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total)


def _token_weighted(acc: Accumulated, step_tokens: int, kl: torch.Tensor) -> dict[str, float]:
    """Token means over the whole mini-batch from each rank's token sums (one all-reduce), and
    the mismatch-KL sum and count added into ``kl``."""
    keys = sorted(acc.token_sums)  # the same order on every rank
    values = [acc.token_sums[k] for k in keys] + [acc.kl_sum, acc.kl_tokens]
    total = torch.tensor(values, dtype=torch.float64, device=kl.device)
    dist.all_reduce(total)
    kl += total[-2:]
    return {k: float(v) / max(step_tokens, 1) for k, v in zip(keys, total[:-2].tolist())}


def _to_float(value: torch.Tensor) -> float:
    from torch.distributed.tensor import DTensor

    return float(value.full_tensor() if isinstance(value, DTensor) else value)


def full_parameters(model: torch.nn.Module, *, to_cpu: bool = False) -> dict[str, torch.Tensor]:
    """The full weights, in ``named_parameters`` order, on rank 0 (other ranks get ``{}``).

    A collective: every rank must call it, in the same order as the others. One parameter is
    gathered at a time, but rank 0 keeps them all, so it holds one full copy of the model
    (on its device, or in host memory with ``to_cpu``) until the broadcast is done.
    """
    from torch.distributed.tensor import DTensor

    keep = dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            if keep:
                out[name] = full.cpu() if to_cpu else full
    return out


def broadcast_groups(
    groups: list[TrajectoryGroup] | None, *, device: torch.device, src: int = 0
) -> list[TrajectoryGroup]:
    """Rank ``src``'s ``groups`` on every rank. Each group travels as its ``schema.encode`` bytes
    and is checked by ``schema.decode`` on arrival: nothing is pickled. Three broadcasts: the
    count, the byte length of each group, the bytes. ``device``: cuda for NCCL, cpu for gloo."""
    sending = dist.get_rank() == src
    if sending:
        assert groups is not None, "the source rank must pass its groups"
        frames = [encode(group) for group in groups]
        count = torch.tensor([len(frames)], dtype=torch.int64, device=device)
    else:
        count = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(count, src=src)
    if sending:
        lengths = torch.tensor([len(f) for f in frames], dtype=torch.int64, device=device)
    else:
        lengths = torch.zeros(int(count), dtype=torch.int64, device=device)
    dist.broadcast(lengths, src=src)
    if sending:
        payload = torch.from_numpy(np.frombuffer(b"".join(frames), dtype=np.uint8).copy()).to(device)
    else:
        payload = torch.empty(int(lengths.sum()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src)
    if sending:
        assert groups is not None
        return groups
    data = payload.cpu().numpy().tobytes()
    offsets = [0, *itertools.accumulate(lengths.tolist())]
    out = []
    for lo, hi in itertools.pairwise(offsets):
        msg = decode(data[lo:hi])
        if not isinstance(msg, TrajectoryGroup):
            raise SchemaError(f"broadcast_groups: expected a trajectory group, got {type(msg).__name__}")
        out.append(msg)
    return out


# ------------------------------------------------------------- rank 0 and the ranks it starts

# How often a rank waiting for the next command (or rank 0 waiting for ranks to start) looks
# again: a store lookup on loopback, negligible next to a training step.
_POLL_S = 0.05
# After "stop", how long rank 0 waits for its ranks to exit before it terminates them.
_EXIT_WAIT_S = 10.0
# The learner's rendezvous store is shared with the weight-sync group: FSDP keys live apart.
_PREFIX = "fsdp/"


class ShardedTrainer:
    """Rank 0's side: the sharded model and optimizer, and the rank processes it started.

    The constructor starts ranks ``1..num_devices-1`` as ``python -m learners.fsdp`` processes,
    which load the model while rank 0 goes on (with its warm start, say). ``shard`` then waits
    for them, forms the default process group on the learner's own store, and shards a copy of
    ``mirror`` (rank 0's full model): every rank starts from rank 0's weights at that moment.
    Each call sends one command to the ranks (``cmd/<n>`` in the store: ``shard`` first, then
    ``step <version>``, ``gather``, ``optimizer``, ``stop``) and runs that command's collectives,
    which every rank (``worker_main``) runs in the same order.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        model_path: str,
        store: dist.TCPStore,
        store_host: str,
        run_dir: Path,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.world_size = cfg.trainer.num_devices
        self.device = _rank_device(device.type, 0)
        self.timeout_s = cfg.trainer.device_timeout_s
        self.model: Any = None  # set by shard()
        self.optimizer: Any = None
        self._store = dist.PrefixStore(_PREFIX, store)
        self._sent = 0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._mirror_version = -1  # the version of the weights the mirror holds
        self._store.set("config", json.dumps(to_dict(cfg)))
        self._store.set("model_path", model_path)
        try:
            for rank in range(1, self.world_size):
                args = [f"--rank={rank}", f"--world-size={self.world_size}", f"--timeout-s={self.timeout_s}"]
                args += [f"--store={store_host}:{store.port}", f"--run-dir={run_dir}"]
                # Output is inherited: the ranks' log lines go where the learner's go.
                self._procs.append(subprocess.Popen([sys.executable, "-m", "learners.fsdp", *args]))
        except BaseException:
            self.close()  # the ranks started so far
            raise

    def shard(self, mirror: torch.nn.Module, version: int) -> None:
        """Form the group (deadline: trainer.device_timeout_s) and shard ``mirror``'s weights,
        which are those of policy ``version``, over every rank."""
        self._wait_ready()
        # The ranks join the group only on this command (see the module doc): however long the
        # warm start before this call took, every rank's rendezvous starts now, with rank 0's.
        with self._command("shard"):
            _init_world(self._store, 0, self.world_size, self.device, self.timeout_s)
            self.model, self.optimizer = _prepare(copy.deepcopy(mirror), self.cfg, self.device)
        self._mirror_version = version
        logger.info("FSDP learner: %d ranks on %s", self.world_size, dist.get_backend())

    def train_step(
        self,
        groups: list[TrajectoryGroup],
        batch: Batch,
        p: StepParams,
        *,
        version: int,
        estimator: AdvantageEstimator,
    ) -> dict[str, float]:
        """``train_step`` of ``batch`` (made from ``groups``) over every rank; returns its metrics."""
        with self._command(f"step {version}"):
            broadcast_groups(groups, device=self.device)
            return sharded_train_step(
                self.model, self.optimizer, batch, p, version=version, estimator=estimator
            )

    def gather_into(self, mirror: torch.nn.Module, version: int) -> None:
        """Copy the full weights into ``mirror``, unless it already holds ``version``."""
        if version != self._mirror_version:
            with self._command("gather"):
                _gather_into(self.model, mirror)
            self._mirror_version = version

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The full optimizer state, in the format of the one-process learner's
        ``optimizer.state_dict()`` (parameters by index), so checkpoints do not depend on
        ``num_devices``."""
        with self._command("optimizer"):
            return _full_optimizer_state(self.model, self.optimizer)

    def close(self) -> None:
        """Tell the ranks to stop, terminate any that has not exited in time, leave the group."""
        procs, self._procs = self._procs, []
        if any(proc.poll() is None for proc in procs):
            try:
                self._store.set(f"cmd/{self._sent}", "stop")
            except (RuntimeError, OSError) as err:  # the store is gone: they exit on their own
                logger.warning("could not tell the learner ranks to stop: %s", err)
        deadline = time.monotonic() + _EXIT_WAIT_S
        for rank, proc in enumerate(procs, start=1):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("learner rank %d (pid %d) did not exit; terminating it", rank, proc.pid)
                proc.terminate()
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5.0)
        if dist.is_initialized():
            dist.destroy_process_group()

    def _check_ranks(self) -> None:
        for rank, proc in enumerate(self._procs, start=1):
            if (code := proc.poll()) is not None:
                raise RuntimeError(
                    f"learner rank {rank} (pid {proc.pid}) exited with code {code}; see its "
                    f"log, learner-rank{rank}.log in the run directory"
                )

    @contextlib.contextmanager
    def _command(self, what: str) -> Iterator[None]:
        """Send command ``what`` to the ranks; the body runs its collectives. If one fails
        because a rank died, the error names the rank."""
        self._check_ranks()
        self._store.set(f"cmd/{self._sent}", what)
        self._sent += 1
        try:
            yield
        except RuntimeError as err:
            deadline = time.monotonic() + 1.0  # a peer that closed the connection is exiting
            for proc in self._procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._check_ranks()
            raise RuntimeError(f"learner ranks: {what!r} failed: {err}") from err

    def _wait_ready(self) -> None:
        """Until every rank has loaded the model (deadline: trainer.device_timeout_s)."""
        deadline = time.monotonic() + self.timeout_s
        waiting = set(range(1, self.world_size))
        while waiting:
            self._check_ranks()
            waiting = {r for r in waiting if not self._store.check([f"ready/{r}"])}
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(
                    f"learner ranks {sorted(waiting)} did not start within trainer.device_timeout_s="
                    f"{self.timeout_s:.0f} s"
                )
            time.sleep(_POLL_S if waiting else 0.0)


def worker_main(argv: list[str] | None = None) -> int:
    """Ranks 1..: ``python -m learners.fsdp --rank=R ...``, started by ``ShardedTrainer``. Loads
    the model, waits for ``shard`` and joins the group, then runs rank 0's commands until
    ``stop``. Exits when rank 0 goes away (its store stops answering, or this process's parent
    changes)."""
    import argparse

    from transformers import AutoModelForCausalLM

    from async_rl.text import load_tokenizer
    from learners.advantages import estimator_from_config
    from weight_sync.group import connect_store

    parser = argparse.ArgumentParser(prog="python -m learners.fsdp", description=worker_main.__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True, help="HOST:PORT of the learner's rendezvous store")
    parser.add_argument("--timeout-s", type=float, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: rank 0 handles it (finishes the step
    # and saves, which needs this rank) and then says stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    host, port = args.store.rsplit(":", 1)
    store = dist.PrefixStore(_PREFIX, connect_store(host, int(port), args.timeout_s))
    cfg = from_dict(json.loads(store.get("config")))
    setup_logging(cfg.log_level, args.run_dir / f"learner-rank{args.rank}.log")
    model_path = store.get("model_path").decode()
    device = _rank_device(_pick_device_type(cfg.trainer.device), args.rank)
    tr = cfg.trainer
    torch.set_num_threads(tr.num_threads or default_threads(tr.num_devices + cfg.rollout.num_actors))
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(model_path)
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=MASTER_DTYPE)
    estimator = estimator_from_config(cfg, tokenizer)
    params = StepParams.from_config(cfg)
    store.set(f"ready/{args.rank}", "1")
    # Rank 0 may warm-start for longer than the group's timeout: join only when it says so.
    match command := _next_command(store, 0, parent):
        case "shard":
            pass
        case "stop":  # rank 0 closed before sharding (its warm start failed, say)
            logger.info("learner rank %d: stopping before the group formed", args.rank)
            return 0
        case _:
            raise RuntimeError(f"learner rank {args.rank}: expected 'shard' first, got {command!r}")
    _init_world(store, args.rank, args.world_size, device, args.timeout_s)
    logger.info("learner rank %d of %d up on %s (pid %d)", args.rank, args.world_size, device, os.getpid())
    try:
        model, optimizer = _prepare(model.to(device).eval(), cfg, device)
        for n in itertools.count(1):
            command = _next_command(store, n, parent)
            match command.split():
                case ["step", version]:
                    groups = broadcast_groups(None, device=device)
                    batch = make_batch(groups, pad_id=tokenizer.pad_token_id, device=device)
                    sharded_train_step(
                        model, optimizer, batch, params, version=int(version), estimator=estimator
                    )
                case ["gather"]:
                    _gather_into(model, None)
                case ["optimizer"]:
                    _full_optimizer_state(model, optimizer)
                case ["stop"]:
                    logger.info("learner rank %d: stopping", args.rank)
                    return 0
                case _:
                    raise RuntimeError(f"learner rank {args.rank}: unknown command {command!r}")
    finally:
        dist.destroy_process_group()
    return 0


def _next_command(store: dist.Store, n: int, parent: int) -> str:
    """Command ``n`` from rank 0. Waits as long as rank 0 lives: between steps the learner may
    legitimately wait for actors, evaluate or save for a long time, with deadlines of its own."""
    key = f"cmd/{n}"
    while True:
        try:
            if store.check([key]):
                return store.get(key).decode()
        except RuntimeError as err:  # torch.distributed's network errors: rank 0 hosts the store
            raise RuntimeError(f"the learner process (rank 0) is gone: its store says {err}") from None
        if os.getppid() != parent:
            raise RuntimeError("the learner process (rank 0) is gone")
        time.sleep(_POLL_S)


def _pick_device_type(device: str) -> str:
    """``trainer.device`` (auto, cpu or cuda with num_devices > 1) as a device type."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _rank_device(device_type: str, rank: int) -> torch.device:
    """Rank ``r`` trains on ``cuda:r`` (CUDA_VISIBLE_DEVICES chooses which GPUs), or the CPU."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def _init_world(
    store: dist.Store, rank: int, world_size: int, device: torch.device, timeout_s: float
) -> None:
    """Join the learner ranks' default process group: NCCL on CUDA, gloo on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=dist.PrefixStore("world/", store),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def _prepare(model: torch.nn.Module, cfg: Config, device: torch.device) -> tuple[Any, torch.optim.Optimizer]:
    """Every rank: take rank 0's weights, shard, and build the optimizer over the shards."""
    with torch.no_grad():
        for param in model.parameters():  # tied weights are one parameter: sent once
            dist.broadcast(param.data, src=0)
    sharded = shard_model(model, device_type=device.type)
    optimizer = torch.optim.AdamW(
        sharded.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay
    )
    return sharded, optimizer


def _gather_into(model: torch.nn.Module, mirror: torch.nn.Module | None) -> None:
    """Every rank: all-gather each parameter in turn; rank 0 (``mirror`` given) copies it into
    ``mirror``'s parameter of the same name. One full parameter at a time besides the mirror."""
    from torch.distributed.tensor import DTensor

    into = dict(mirror.named_parameters()) if mirror is not None else {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            if mirror is not None:
                into[name].copy_(full)


def _full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank: the optimizer state gathered to rank 0 (in host memory), re-keyed from
    parameter names to ``named_parameters`` indices as ``Optimizer.state_dict`` keys them.
    Other ranks get ``{}``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full: Any = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return {}
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return {
        "state": {index[name]: value for name, value in full["state"].items()},
        "param_groups": [g | {"params": [index[name] for name in g["params"]]} for g in full["param_groups"]],
    }


if __name__ == "__main__":
    # Run the module proper (learners.fsdp, not this __main__ copy), so log lines carry its name.
    from learners.fsdp import worker_main as _main

    raise SystemExit(_main())
