"""Which GPU each process of ``async-rl train`` runs on.

The learner's ranks take the first GPUs, as they always have: rank ``r`` on ``cuda:r``
(``learners/fsdp.py``), or the one GPU ``trainer.device=cuda:N`` names. Each actor then gets
a GPU of its own among the rest, as its ``device=cuda:K`` option; an actor with in-process
SGLang takes ``rollout.sglang_tp_size`` consecutive GPUs, the first of them its own (SGLang's
``base_gpu_id``). Indices count the GPUs this process sees (``CUDA_VISIBLE_DEVICES``), which
the children inherit.

NCCL refuses a communicator with two ranks on one GPU ("Duplicate GPU detected"), so with the
NCCL weight sync every GPU serves one process, and a layout that needs more GPUs than are
visible is a ``ValueError`` naming the keys to change, raised before any process starts. With
gloo, actors may share GPUs (round robin over those the learner leaves free, or over all of
them when it leaves none). Everything here is pure: the launcher passes the visible GPU count.
"""

from __future__ import annotations

from dataclasses import dataclass

from async_rl.config import Config, EngineKind, SyncBackend


@dataclass(frozen=True)
class DeviceLayout:
    # GPU of each learner rank (rank r on learner_gpus[r]); empty when the learner is on CPU.
    learner_gpus: tuple[int, ...]
    # The device= option of each actor: "cpu" or "cuda:K".
    actor_devices: tuple[str, ...]


def plan_devices(
    *,
    visible_gpus: int,
    learner_device: str,
    learner_ranks: int,
    num_actors: int,
    sync_backend: SyncBackend,
    gpus_per_actor: int = 1,
    nccl_relay: bool = False,
) -> DeviceLayout:
    """The layout of one learner with ``learner_ranks`` ranks (``trainer.num_devices``) on
    ``learner_device`` (``trainer.device``) and ``num_actors`` actors, each taking
    ``gpus_per_actor`` GPUs, on a machine with ``visible_gpus`` GPUs. ``nccl_relay``: the actors
    forward weights to an in-process SGLang over NCCL. Raises ``ValueError`` for a layout that
    cannot run."""
    on_cuda = learner_device.startswith("cuda") or (learner_device == "auto" and visible_gpus > 0)
    if not on_cuda:
        return DeviceLayout((), ("cpu",) * num_actors)  # actors follow the learner onto the CPU
    if visible_gpus == 0:
        raise ValueError(
            f"trainer.device={learner_device} but no GPU is visible (CUDA_VISIBLE_DEVICES): "
            "use trainer.device=cpu"
        )
    learner_gpus = _learner_gpus(visible_gpus, learner_device, learner_ranks)
    if nccl_relay:
        # sglang_engine.py puts SGLang's first TP rank on the actor's own GPU (base_gpu_id),
        # and the actor is rank 0 of the relay group on that GPU too.
        raise ValueError(
            "rollout.engine=sglang (in-process) with an NCCL relay puts the actor's relay rank and "
            "SGLang's first rank on one GPU, which NCCL refuses: set rollout.sglang_relay_backend=gloo"
        )
    free = [g for g in range(visible_gpus) if g not in learner_gpus]
    blocks = _blocks(free, gpus_per_actor)
    nccl = sync_backend is not SyncBackend.GLOO  # auto is NCCL with the learner on CUDA
    if nccl and len(blocks) < num_actors:
        each = (
            f"{gpus_per_actor} consecutive GPUs (rollout.sglang_tp_size)" if gpus_per_actor > 1 else "a GPU"
        )
        fixes = [f"lower rollout.num_actors to {len(blocks)}"] if blocks else []
        fixes += ["lower trainer.num_devices"] if learner_ranks > 1 else []
        fixes += ["make more GPUs visible (CUDA_VISIBLE_DEVICES)"]
        fixes += ["set weight_sync.backend=gloo to let actors share GPUs"]
        raise ValueError(
            f"the NCCL weight sync needs a GPU per process and {visible_gpus} are visible: the learner "
            f"takes {_names(learner_gpus)} (trainer.device={learner_device}, trainer.num_devices="
            f"{learner_ranks}), which leaves {each} of its own for {len(blocks)} of the "
            f"rollout.num_actors={num_actors} actors; {', '.join(fixes[:-1])} or {fixes[-1]}"
        )
    if not blocks:  # gloo, and the learner leaves no GPU free: share them all
        blocks = _blocks(list(range(visible_gpus)), gpus_per_actor) or [0]
    return DeviceLayout(learner_gpus, tuple(f"cuda:{blocks[i % len(blocks)]}" for i in range(num_actors)))


def plan_from_config(cfg: Config, visible_gpus: int) -> DeviceLayout:
    """``plan_devices`` for the processes ``async-rl train`` starts from ``cfg``."""
    rollout = cfg.rollout
    in_process_sglang = rollout.engine is EngineKind.SGLANG and not rollout.sglang_url
    return plan_devices(
        visible_gpus=visible_gpus,
        learner_device=cfg.trainer.device,
        learner_ranks=cfg.trainer.num_devices,
        num_actors=rollout.num_actors,
        sync_backend=cfg.weight_sync.backend,
        gpus_per_actor=rollout.sglang_tp_size if in_process_sglang else 1,
        # An empty relay backend means NCCL on CUDA (actors/sglang_engine.py).
        nccl_relay=in_process_sglang and rollout.sglang_relay_backend in ("", "nccl"),
    )


def _learner_gpus(visible_gpus: int, learner_device: str, ranks: int) -> tuple[int, ...]:
    if learner_device.startswith("cuda:"):  # one rank (config validation), on the GPU named
        index = int(learner_device.removeprefix("cuda:"))
        if index >= visible_gpus:
            raise ValueError(
                f"trainer.device={learner_device} but {visible_gpus} GPUs are visible (cuda:0.."
                f"cuda:{visible_gpus - 1}): choose one of them"
            )
        return (index,)
    if ranks > visible_gpus:
        raise ValueError(
            f"trainer.num_devices={ranks} needs {ranks} GPUs (rank r on cuda:r) but {visible_gpus} are "
            "visible: lower trainer.num_devices, or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
        )
    return tuple(range(ranks))


def _blocks(free: list[int], size: int) -> list[int]:
    """First GPUs of disjoint runs of ``size`` consecutive GPUs in ``free``, lowest first."""
    starts, run = [], 0
    for i, gpu in enumerate(free):
        run = run + 1 if i and free[i - 1] == gpu - 1 else 1
        if run == size:
            starts.append(gpu - size + 1)
            run = 0
    return starts


def _names(gpus: tuple[int, ...]) -> str:
    return ", ".join(f"cuda:{g}" for g in gpus)
