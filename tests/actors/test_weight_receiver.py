"""actors.weight_receiver.WeightReceiver against a real learner half (``form`` + ``broadcast.send``
in another process, gloo on loopback): each staged version reaches the engine's parameters at the
swap and not before, by reference (``rebind``) or by copy.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from typing import Any

import pytest
import torch

from actors.weight_receiver import WeightReceiver
from async_rl.schema import JoinGroup, WeightHeader
from weight_sync import broadcast
from weight_sync.group import form, host_store

_VERSIONS = 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Tied weights, as in the tiny model: the embedding and the head share one Parameter.
    model = torch.nn.Sequential(
        torch.nn.Embedding(11, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 11, bias=False)
    )
    model[2].weight = model[0].weight
    return model


def _weights(version: int) -> dict[str, torch.Tensor]:
    return {
        n: torch.full_like(p, float(version) + i / 10) for i, (n, p) in enumerate(_model().named_parameters())
    }


def _learner(port: int, headers: Any) -> None:
    store = host_store("127.0.0.1", port, 30)
    group, missing = form(store, epoch=0, world_size=2, backend="gloo", timeout_s=30)
    assert group is not None, missing
    model = _model()
    broadcast.flatten_parameters_(model)
    params = dict(model.named_parameters())
    for version in range(1, _VERSIONS + 1):
        with torch.no_grad():
            for name, value in _weights(version).items():
                params[name].copy_(value)
        header = broadcast.plan(params, version=version, epoch=0, bucket_mb=1)
        headers.put(header)
        broadcast.send(group, params, header, torch.device("cpu"))
    time.sleep(1.0)  # the store lives until the receiver has left the group


def _next_ready(receiver: WeightReceiver, timeout_s: float = 30) -> WeightHeader:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (ready := receiver.poll()) is not None:
            return ready[0]
        time.sleep(0.01)
    raise TimeoutError("no staged version")


@pytest.mark.parametrize("rebind", [True, False])
def test_each_version_reaches_the_engine_at_the_swap(rebind: bool) -> None:
    ctx = mp.get_context("spawn")
    headers = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    learner = ctx.Process(target=_learner, args=(port, headers))
    learner.start()
    model = _model()
    params = dict(model.named_parameters())
    parameter_ids = [id(p) for p in model.parameters()]
    initial = {n: p.detach().clone() for n, p in params.items()}
    receiver = WeightReceiver(params, device="cpu", timeout_s=30, rebind=rebind)
    try:
        assert all(torch.equal(params[n], initial[n]) for n in params)  # rebinding kept the values
        receiver.submit(JoinGroup(0, 1, 2, "127.0.0.1", port, "gloo"))
        storages = []
        for version in range(1, _VERSIONS + 1):
            receiver.submit(headers.get(timeout=30))
            assert _next_ready(receiver).version == version
            before = initial if version == 1 else _weights(version - 1)
            assert all(torch.equal(params[n], before[n]) for n in params)  # staged, not swapped in
            receiver.swap()
            assert all(torch.equal(params[n], _weights(version)[n]) for n in params)
            assert torch.equal(model[2].weight, model[0].weight)  # still tied
            storages.append(params["0.weight"].untyped_storage().data_ptr())
        assert [id(p) for p in model.parameters()] == parameter_ids  # the optimizer-visible objects
        tokens = torch.tensor([[1, 2]])
        hidden = model[1](model[0](tokens))
        assert torch.equal(model(tokens), hidden @ _weights(_VERSIONS)["0.weight"].T)  # forward sees them
        if rebind:  # two flat buffers, exchanged at every swap
            assert storages[0] == storages[2] != storages[1]
        else:  # copied into the same tensors
            assert storages[0] == storages[1] == storages[2]
    finally:
        assert receiver.close(timeout_s=10)
        learner.join(timeout=30)
        if learner.is_alive():
            learner.kill()
            learner.join(timeout=10)
    assert learner.exitcode == 0
