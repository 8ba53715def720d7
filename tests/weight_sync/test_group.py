"""weight_sync.group: the rendezvous store listens on the configured interface only, and a
weight-sync group never touches the process's default group (the FSDP learner's world)."""

from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from weight_sync.group import SyncGroup, connect_store, host_store


def _listening(port: int) -> list[str]:
    """Local IPv4 addresses (dotted) with a socket listening on ``port``, from /proc/net/tcp."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        addr_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.append(socket.inet_ntoa(bytes.fromhex(addr_hex)[::-1]))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_the_store_listens_on_the_configured_host_only() -> None:
    store = host_store("127.0.0.1", 0, 10)
    assert _listening(store.port) == ["127.0.0.1"]  # not 0.0.0.0, which torch's own bind gives
    client = connect_store("127.0.0.1", store.port, 10)
    client.set("k", "v")
    assert store.get("k") == b"v"


def test_a_taken_port_names_the_knobs() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(
            OSError, match=r"cannot host the rendezvous store on 127.0.0.1:\d+ .*transport.store_port"
        ):
            host_store("127.0.0.1", taken.getsockname()[1], 5)


def _rank1(port: int, out: Any) -> None:
    store = connect_store("127.0.0.1", port, 20)
    got = []
    for epoch in (0, 1):
        group = SyncGroup(store, epoch=epoch, rank=1, world_size=2, backend="gloo", timeout_s=20)
        t = torch.zeros(3)
        group.broadcast(t)
        got.append(t.tolist())
        group.close()
    out.put((got, dist.is_initialized()))


def test_groups_of_two_epochs_leave_the_default_group_alone() -> None:
    """Each epoch is its own group object: broadcasts work on it, closing it ends it, and no
    process ever gets a default process group from it."""
    store = host_store("127.0.0.1", 0, 20)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_rank1, args=(store.port, out))
    proc.start()
    try:
        for epoch in (0, 1):
            group = SyncGroup(store, epoch=epoch, rank=0, world_size=2, backend="gloo", timeout_s=20)
            group.broadcast(torch.full((3,), 10.0 * epoch + 1))
            group.close()
            with pytest.raises(RuntimeError, match="closed"):
                group.broadcast(torch.zeros(3))
        got, rank1_default = out.get(timeout=30)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
    assert got == [[1.0, 1.0, 1.0], [11.0, 11.0, 11.0]]
    assert not dist.is_initialized() and not rank1_default


class _FakeNcclWork:
    """Stands in for an NCCL work handle (no CUDA here): completes after ``done_after`` polls."""

    def __init__(self, done_after: int | None) -> None:
        self.polls, self.done_after, self.waited = 0, done_after, False

    def is_completed(self) -> bool:
        self.polls += 1
        return self.done_after is not None and self.polls > self.done_after

    def wait(self) -> bool:
        self.waited = True
        return True


class _FakeNcclGroup:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


def _fake_nccl_sync_group(timeout_s: float) -> tuple[SyncGroup, _FakeNcclGroup]:
    group = SyncGroup.__new__(SyncGroup)  # the NCCL constructor needs CUDA; the wait logic does not
    pg = _FakeNcclGroup()
    group.epoch, group.rank, group.world_size, group.backend, group.timeout_s = 3, 0, 2, "nccl", timeout_s
    group._pg = pg
    return group, pg


def test_nccl_wait_polls_until_the_work_completes() -> None:
    group, pg = _fake_nccl_sync_group(timeout_s=5.0)
    work = _FakeNcclWork(done_after=3)
    group.wait(work)
    assert work.polls == 4 and work.waited and not pg.aborted


def test_nccl_wait_aborts_the_communicator_and_raises_at_the_deadline() -> None:
    """A peer that never answers: without this the NCCL watchdog would kill the learner."""
    group, pg = _fake_nccl_sync_group(timeout_s=0.2)
    work = _FakeNcclWork(done_after=None)
    with pytest.raises(
        RuntimeError, match=r"epoch 3: a broadcast did not finish within weight_sync.timeout_s=0 s"
    ):
        group.wait(work)
    assert pg.aborted and not work.waited and work.polls > 10
    with pytest.raises(RuntimeError, match="closed"):
        group.broadcast(torch.zeros(1))
