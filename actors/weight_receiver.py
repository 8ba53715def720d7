"""The actor's side of weight sync: a thread that owns the group and stages new weights.

Generation never waits for the network. The receiver thread joins each weight-sync epoch
(``weight_sync.group.join``) and receives every broadcast into a staging copy of the
engine's parameters while the main thread keeps decoding. When a version is complete the
main thread swaps it in between two decode steps (``swap``), so the generation pause is at
most the cost of a copy, not of the broadcast. An engine whose parameters may be rebound
(``rebind``: the torch engine) pays not even that: its parameters and the staging are two flat
buffers (``broadcast.flat_like``), and a swap exchanges them by reference, so the pause does
not grow with the model. Otherwise (SGLang's relay staging) the swap copies, parameter by
parameter. Either way the staging is flat, so every bucket is received in place.

Every torch.distributed call of the actor happens on this thread, so the default process
group is never used from two threads. Every wait has a deadline: collectives carry the
group's timeout, and the staging slot is waited for in short polls that notice ``close``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import torch

from async_rl.schema import JoinGroup, WeightHeader
from weight_sync import broadcast
from weight_sync.group import GroupAborted, SyncGroup, connect_store, join

logger = logging.getLogger(__name__)

_POLL_S = 0.05


class WeightReceiver:
    def __init__(
        self, params: dict[str, torch.Tensor], *, device: str, timeout_s: float, rebind: bool = False
    ) -> None:
        self.params = params
        self.rebind = rebind
        if rebind:  # the engine's own weights become one flat buffer too: the swap's other half
            with torch.no_grad():
                for name, view in broadcast.flat_like(params).items():
                    view.copy_(params[name])
                    params[name].data = view
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.group: SyncGroup | None = None
        self._store: Any = None
        self._staging: dict[str, torch.Tensor] | None = None
        self._buffers = broadcast.Buffers()
        self._commands: queue.Queue[JoinGroup | WeightHeader] = queue.Queue()
        self._ready: queue.Queue[tuple[WeightHeader, float]] = queue.Queue()
        self._slot_free = threading.Event()
        self._slot_free.set()
        self._closed = threading.Event()
        self._outstanding = 0  # headers handed in and not yet swapped or dropped
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="weight-receiver", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ main thread

    def submit(self, msg: JoinGroup | WeightHeader) -> None:
        if isinstance(msg, WeightHeader):
            with self._lock:
                self._outstanding += 1
        self._commands.put(msg)

    @property
    def busy(self) -> bool:
        """A weight version was announced and is not in the engine yet."""
        with self._lock:
            return self._outstanding > 0

    def poll(self) -> tuple[WeightHeader, float] | None:
        """A fully received version waiting to be swapped in, with its receive seconds."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            return None

    def swap(self) -> float:
        """Put the staged weights into the engine's parameters: by reference with ``rebind``
        (the engine's old tensors become the next staging), else by copy. Returns the seconds."""
        assert self._staging is not None
        start = time.perf_counter()
        # On CUDA both threads enqueue on the device's default stream, so the receiver's last
        # copies into the staging are ordered before any kernel that reads it after the swap.
        with torch.no_grad():
            for name, target in self.params.items():
                staged = self._staging[name]
                if self.rebind:
                    self._staging[name] = target.data
                    target.data = staged
                else:
                    target.copy_(staged)
        self._done_with_one()
        self._slot_free.set()
        return time.perf_counter() - start

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop the thread (within ``timeout_s``, default the group timeout) and leave the
        group. Returns False if the thread is still inside a collective."""
        self._closed.set()
        self._thread.join(timeout=self.timeout_s + 5 if timeout_s is None else timeout_s)
        if self._thread.is_alive():
            return False
        if self.group is not None:
            self.group.close()
            self.group = None
        return True

    # ------------------------------------------------------------------ receiver thread

    def _done_with_one(self) -> None:
        with self._lock:
            self._outstanding = max(0, self._outstanding - 1)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                msg = self._commands.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(msg, JoinGroup):
                self._join(msg)
            else:
                self._receive(msg)

    def _join(self, msg: JoinGroup) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
        try:
            if self._store is None:
                self._store = connect_store(msg.store_host, msg.store_port, self.timeout_s)
            self.group = join(
                self._store,
                epoch=msg.epoch,
                rank=msg.rank,
                world_size=msg.world_size,
                backend=msg.backend,
                timeout_s=self.timeout_s,
            )
        except (GroupAborted, TimeoutError, RuntimeError, OSError) as err:
            logger.warning("could not join weight-sync epoch %d: %s", msg.epoch, err)

    def _receive(self, header: WeightHeader) -> None:
        if self.group is None or header.epoch != self.group.epoch:
            logger.warning(
                "weights v%d for epoch %d, but this actor is not in it; skipped", header.version, header.epoch
            )
            self._done_with_one()
            return
        # One staging slot: wait until the main thread swapped the previous version in.
        while not self._slot_free.wait(timeout=_POLL_S):
            if self._closed.is_set():
                return
        if self._staging is None:
            self._staging = broadcast.flat_like(self.params)
        try:
            broadcast.check_compatible(header, self._staging)
            self._slot_free.clear()
            seconds = broadcast.receive(self.group, header, self._staging, self.device, self._buffers)
        except (RuntimeError, ValueError) as err:
            # A timed-out or broken collective: this epoch is over. The learner re-forms the
            # group (or evicts this actor) and sends a new JoinGroup.
            logger.warning("weight receive v%d failed: %s", header.version, err)
            self._slot_free.set()
            self._done_with_one()
            if self.group is not None:
                self.group.close()
                self.group = None
            return
        self._ready.put((header, seconds))
