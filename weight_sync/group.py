"""Forming the weight-sync process group for processes started independently.

The learner hosts a ``TCPStore`` (the rendezvous store) and is rank 0 of every group.
Each group has an ``epoch``; its keys live under the prefix ``epoch<N>/`` so a re-formed
group never reads a stale key. Every call has a deadline (``timeout_s``).

Formation is two-phase, so that one missing member can never hang the others inside
``init_process_group`` (which cannot be interrupted):

1. every actor told to join (``JoinGroup``) sets ``join/<epoch>/ready/<rank>`` and waits
   for ``join/<epoch>/go``;
2. the learner (``form``) waits until every rank is ready or the deadline passes. If all
   are ready it sets ``go`` and everybody initialises the group; otherwise it sets
   ``abort``, names the missing ranks, and the caller evicts them and tries a new epoch.
   Actors that see ``abort`` give up this epoch at once (``join`` raises ``GroupAborted``).
"""

from __future__ import annotations

import logging
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def host_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """The learner's rendezvous store, listening on ``host`` only (port 0 = a free port).

    ``TCPStore`` given a port listens on every interface of the node, so the socket is bound
    here, to ``host``, and handed over (``master_listen_fd``); the store owns it from then on.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            store = dist.TCPStore(
                host,
                sock.getsockname()[1],
                is_master=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=timeout_s),
                use_libuv=True,
                master_listen_fd=sock.fileno(),
            )
        except BaseException:
            sock.close()
            raise
        sock.detach()
        return store
    except (RuntimeError, OSError) as err:
        raise OSError(
            f"cannot host the rendezvous store on {host}:{port} ({err}); set transport.host or "
            "transport.store_port"
        ) from None


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), use_libuv=True)


class SyncGroup:
    """One epoch of the weight-sync group: rank 0 is the learner.

    The group is a process-group object of its own, not this process's default group, so a
    learner whose default group is its FSDP world (learners/fsdp.py) can also hold this one,
    and a new epoch never tears down anything else. Collectives go through ``broadcast`` and
    their handles through ``wait``, which enforces ``timeout_s`` on both backends.

    NCCL needs the deadline kept here: its ``work.wait()`` only orders CUDA streams, and on a
    timeout torch's watchdog tears the whole process down (``TORCH_NCCL_ASYNC_ERROR_HANDLING``
    defaults to 3), so the learner could never evict the dead actor. ``wait`` polls the work
    and, past the deadline, aborts the communicator and raises, as gloo does by itself. The
    communicator's own timeout is set to twice ``timeout_s`` so the poll always fires first.
    (Read from torch's source; not yet run on a GPU.)
    """

    def __init__(
        self, store: dist.Store, *, epoch: int, rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout_s = timeout_s
        prefixed = dist.PrefixStore(f"epoch{epoch}/", store)
        timeout = timedelta(seconds=timeout_s)
        self._pg: Any
        if backend == "nccl":
            nccl = getattr(dist, "ProcessGroupNCCL", None)
            if nccl is None:
                raise RuntimeError("weight_sync.backend=nccl, but this torch build has no NCCL; use gloo")
            options = nccl.Options()
            options._timeout = 2 * timeout  # ``wait`` gives up first, at timeout_s
            self._pg = nccl(prefixed, rank, world_size, options)
        elif backend == "gloo":
            self._pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        else:
            raise ValueError(f"weight-sync backend {backend!r}: expected 'gloo' or 'nccl'")
        logger.info("weight-sync group epoch %d formed: rank %d of %d (%s)", epoch, rank, world_size, backend)

    def broadcast(self, tensor: torch.Tensor, *, async_op: bool = False) -> Any:
        """Broadcast ``tensor`` from rank 0, in place. With ``async_op`` returns the work
        handle, to pass to ``wait``; otherwise waits for it."""
        if self._pg is None:
            raise RuntimeError(f"weight-sync group epoch {self.epoch} is closed")
        options = dist.BroadcastOptions()
        options.rootRank = 0
        work = self._pg.broadcast([tensor], options)
        if async_op:
            return work
        self.wait(work)
        return None

    def wait(self, work: Any) -> None:
        """Block until ``work`` is done. Raises ``RuntimeError`` on a lost peer or after
        ``timeout_s`` (the group is then closed: a new epoch must be formed)."""
        if self.backend != "nccl":
            work.wait()  # gloo raises by itself after the group's timeout
            return
        deadline = time.monotonic() + self.timeout_s
        while not work.is_completed():
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(
                    f"weight-sync epoch {self.epoch}: a broadcast did not finish within "
                    f"weight_sync.timeout_s={self.timeout_s:.0f} s"
                )
            time.sleep(_NCCL_POLL_S)
        work.wait()  # done; raises if it failed

    def barrier(self) -> None:
        """Every rank arrives (used by benchmarks to start transfers together)."""
        self._pg.barrier(dist.BarrierOptions()).wait()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor``, in rank order (benchmarks collect their reports with it)."""
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._pg.allgather([out], [tensor]).wait()
        return out

    def close(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None and self.backend == "nccl":
            abort = getattr(pg, "abort", None) or pg._abort
            abort()  # frees the communicator now; a broken peer cannot block it


class GroupAborted(RuntimeError):
    """The learner gave up forming this epoch (a member did not show up in time)."""


_POLL_S = 0.02
# How often ``SyncGroup.wait`` looks at an NCCL work: far below a bucket's transfer time.
_NCCL_POLL_S = 0.0005


def _key(epoch: int, what: str) -> str:
    return f"join/{epoch}/{what}"


def form(
    store: dist.Store, *, epoch: int, world_size: int, backend: str, timeout_s: float, stop: Any = None
) -> tuple[SyncGroup | None, list[int]]:
    """Learner side: wait for ranks ``1..world_size-1`` to be ready, then form the group.

    Returns ``(group, [])``, or ``(None, missing_ranks)`` after setting ``abort`` when some
    rank was not ready within ``timeout_s`` (or ``stop`` -- a ``threading.Event`` -- was set).
    """
    deadline = time.monotonic() + timeout_s
    waiting = set(range(1, world_size))
    while waiting and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        waiting = {r for r in waiting if not store.check([_key(epoch, f"ready/{r}")])}
        if waiting:
            time.sleep(_POLL_S)
    if waiting:
        store.set(_key(epoch, "go"), "abort")
        return None, sorted(waiting)
    store.set(_key(epoch, "go"), "go")
    return SyncGroup(
        store, epoch=epoch, rank=0, world_size=world_size, backend=backend, timeout_s=timeout_s
    ), []


def join(
    store: dist.Store, *, epoch: int, rank: int, world_size: int, backend: str, timeout_s: float
) -> SyncGroup:
    """Actor side of ``form``: announce readiness, wait for the learner's decision, join."""
    store.set(_key(epoch, f"ready/{rank}"), "1")
    deadline = time.monotonic() + timeout_s
    while not store.check([_key(epoch, "go")]):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"weight-sync epoch {epoch}: no decision from the learner within {timeout_s:.0f} s"
            )
        time.sleep(_POLL_S)
    if store.get(_key(epoch, "go")) != b"go":
        raise GroupAborted(f"weight-sync epoch {epoch} was abandoned by the learner")
    return SyncGroup(
        store, epoch=epoch, rank=rank, world_size=world_size, backend=backend, timeout_s=timeout_s
    )
