"""Forming the weight-sync process group for processes started independently.

The learner hosts a ``TCPStore`` (the rendezvous store) and is rank 0 of every group.
Each group has an ``epoch``; its keys live under the prefix ``epoch<N>/`` so a re-formed
group never reads a stale key. Every call has a deadline (``timeout_s``).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch.distributed as dist

logger = logging.getLogger(__name__)


def host_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """The learner's rendezvous store, bound to ``host`` (0 = a free port)."""
    try:
        return dist.TCPStore(
            host,
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s),
            use_libuv=True,
        )
    except (RuntimeError, OSError) as err:
        raise OSError(
            f"cannot host the rendezvous store on {host}:{port} ({err}); set transport.store_port"
        ) from None


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), use_libuv=True)


class SyncGroup:
    """One epoch of the weight-sync group: rank 0 is the learner."""

    def __init__(
        self, store: dist.Store, *, epoch: int, rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        prefixed = dist.PrefixStore(f"epoch{epoch}/", store)
        if dist.is_initialized():
            dist.destroy_process_group()
        # The default group of this process; a new epoch replaces it.
        dist.init_process_group(
            backend, store=prefixed, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        logger.info("weight-sync group epoch %d formed: rank %d of %d (%s)", epoch, rank, world_size, backend)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
