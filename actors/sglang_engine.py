"""SGLang behind the engine interface of ``actors.torch_engine`` (``rollout.engine=sglang``).

Read against SGLang 0.5.23: ``srt/entrypoints/{engine,http_server}.py``, ``srt/managers/
{io_struct,tokenizer_manager,tokenizer_control_mixin}.py``, both ``weight_updater.py`` and the
HTTP contract ``api/v1/api_types.py``. SGLang is imported only to launch an in-process engine.

* ``rollout.sglang_url`` empty: an in-process ``sglang.Engine``; generate calls are tasks on
  its event loop, which ``step()`` drives; pause/continue go to ``engine.tokenizer_manager``.
  Otherwise a server at that URL (``/generate``, ``/pause_generation``, ``/continue_generation``,
  ``/abort_request``, ``/server_info``, weight endpoints), serving this actor alone: a weight
  update aborts every request on it.
* A request's first call is one ``/generate`` with ``n = G`` (one shared prefill),
  ``return_logprob`` (``meta_info.output_token_logprobs``: ``[logprob, token_id, text]`` per
  output token) and ``stop_token_ids = [eos]``.
* ``set_version`` pauses with ``mode="abort"``: each request returns what it has so far. Those
  tokens were sampled by the old weights and keep their logprobs and version. After the update
  each unfinished sample is resubmitted alone as prompt + its tokens with the remaining
  ``max_new_tokens``; the new tokens carry the new version.

Weights. The actor process stays rank ``r`` of the learner's group and receives the buckets
into ``parameters()``: host staging laid out by ``weight_sync.broadcast.plan`` exactly as the
learner's (names, dtypes, shapes, ``weight_sync.bucket_mb``), so the learner does not change.
``set_version`` forwards each bucket byte for byte over a second group, this actor as rank 0:
``init_weights_update_group(master_address, master_port, rank_offset=1, world_size=1 + tp_size,
group_name)`` makes SGLang's TP ranks join a store hosted here (SGLang's side is
``init_custom_process_group``: ``PrefixStore(group_name)`` over the ``tcp://`` store, then
torch's ``_new_process_group_helper``; ``_relay_group`` builds rank 0 the same way so the keys
match). Then ``begin_weight_update``, one ``update_weights_from_distributed(names, dtypes,
shapes, load_format="flattened_bucket")`` per bucket beside rank 0's broadcast of its bytes, and
``end_weight_update``. SGLang cannot join the learner's group itself: the actor already holds
rank ``r`` there (``Actor._join``), that group's store keys (``epoch<N>/``) are not the
helper's (``<name><name>/``), and a TP engine needs ``tp_size`` ranks.

Differences from the torch engine: sampling is SGLang's (no counter-based keys, so sync mode is
not bitwise reproducible); the logprob is ``log_softmax(logits / T)`` of the sampled token,
not renormalised over the top-p nucleus (off by ``log(nucleus mass)`` when ``top_p < 1``); a
resumed prefix is recomputed under the new weights (the update flushes the cache) where the
torch engine keeps its old keys and values; SGLang also stops on the model's own EOS ids; the
weights take an extra hop and the staging holds one copy of the model in the learner's dtype.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from actors.sglang_backends import (
    HttpBackend,
    InProcessBackend,
    SGLangBackend,
    SGLangError,
    check_success,
    generate_payload,
    parse_output,
)
from actors.torch_engine import Request, Sample
from weight_sync import broadcast

logger = logging.getLogger(__name__)

T = TypeVar("T")

# step() waits this long for a finished request: the actor services its control channel
# between steps, so this bounds that latency without spinning a core.
_POLL_S = 0.02
# A sample aborted this many times in a row without a new token, outside our own pauses, means
# something else keeps aborting requests on the server: stop instead of looping.
_MAX_EMPTY_ABORTS = 8
_relay_names = itertools.count()


# ---------------------------------------------------------------------- weights


def parameter_layout(model_path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The learner's ``named_parameters()`` as meta tensors (names, shapes, dtypes; no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return dict(model.named_parameters())


def _relay_group(store: dist.Store, name: str, world_size: int, backend: str, timeout_s: float) -> Any:
    """Rank 0 of the relay group, built the way SGLang builds ranks 1.. (see the module doc).

    torch's public ``new_group`` would need a default group that every rank belongs to, so this
    uses the private helper SGLang itself uses.
    """
    from torch.distributed import distributed_c10d as c10d

    pg, _ = c10d._new_process_group_helper(
        world_size,
        0,
        [],
        c10d.Backend(backend),
        dist.PrefixStore(name, store),
        group_name=name,  # type: ignore[arg-type]  # GroupName is a NewType of str in torch 2.13
        timeout=timedelta(seconds=timeout_s),
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _beside(work: Callable[[], T], call: Callable[[], Any], timeout_s: float) -> T:
    """Run ``work`` on a helper thread while ``call`` runs here: the two halves of a collective."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=target, name="sglang-weight-relay", daemon=True)
    thread.start()
    try:
        call()
    finally:
        thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"weight relay to SGLang did not finish within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


class WeightRelay:
    """Host staging laid out like the learner's buckets, and rank 0 of a group with SGLang."""

    def __init__(
        self,
        layout: Mapping[str, torch.Tensor],
        *,
        bucket_mb: int,
        backend: str,
        host: str,
        device: str,
        timeout_s: float,
    ) -> None:
        self.header = broadcast.plan(layout, version=0, epoch=0, bucket_mb=bucket_mb)
        self.backend = backend
        self.host = host
        self.timeout_s = timeout_s
        self.device = torch.device(device) if backend == "nccl" else torch.device("cpu")
        pin = backend == "nccl" and torch.cuda.is_available()
        self.buckets: list[torch.Tensor] = []
        self.params: dict[str, torch.Tensor] = {}
        for dtype, numel, first, last in self.header.buckets:
            flat = torch.empty(numel, dtype=getattr(torch, dtype), pin_memory=pin)
            offset = 0
            for i in range(first, last):
                size = layout[self.header.names[i]].numel()
                self.params[self.header.names[i]] = flat[offset : offset + size].view(
                    torch.Size(self.header.shapes[i])
                )
                offset += size
            self.buckets.append(flat)
        self._store: Any = None
        self._group: Any = None
        self._name = ""

    def _alive(self) -> bool:
        from torch.distributed import distributed_c10d as c10d

        # A relay group destroyed behind our back (destroy_process_group) is rebuilt.
        return self._group is not None and self._group in c10d._world.pg_map

    def connect(self, sglang: SGLangBackend) -> None:
        if self._alive():
            return
        self.disconnect(sglang)
        world_size = 1 + sglang.tp_size()
        self._store = dist.TCPStore(
            self.host,
            0,
            world_size,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=self.timeout_s),
            use_libuv=True,
        )
        self._name = f"async_rl_relay_{os.getpid()}_{next(_relay_names)}"
        body = {
            "master_address": self.host,
            "master_port": int(self._store.port),
            "rank_offset": 1,
            "world_size": world_size,
            "group_name": self._name,
            "backend": self.backend,
        }
        self._group = _beside(
            lambda: _relay_group(self._store, self._name, world_size, self.backend, self.timeout_s),
            lambda: check_success(
                "init_weights_update_group", sglang.call("init_weights_update_group", body)
            ),
            self.timeout_s,
        )
        logger.info("SGLang joined weight relay group %s (world size %d)", self._name, world_size)

    def push(self, sglang: SGLangBackend) -> None:
        """Send every bucket to SGLang. Call while SGLang is paused."""
        self.connect(sglang)
        check_success("begin_weight_update", sglang.call("begin_weight_update", {}))
        try:
            h = self.header
            for i, (flat, (_, _, first, last)) in enumerate(zip(self.buckets, h.buckets)):
                body = {
                    "names": h.names[first:last],
                    "dtypes": h.dtypes[first:last],
                    "shapes": h.shapes[first:last],
                    "group_name": self._name,
                    "flush_cache": i == len(self.buckets) - 1,  # once, after the last bucket
                    "load_format": "flattened_bucket",
                }
                self._push_bucket(sglang, flat, body)
        finally:
            check_success("end_weight_update", sglang.call("end_weight_update", {}))

    def _push_bucket(self, sglang: SGLangBackend, flat: torch.Tensor, body: dict[str, Any]) -> None:
        def receive() -> None:
            op = "update_weights_from_distributed"
            check_success(op, sglang.call(op, body))

        _beside(lambda: self._send(flat), receive, self.timeout_s)

    def _send(self, flat: torch.Tensor) -> None:
        # SGLang receives a flattened bucket as uint8 (FlattenedTensorBucket.empty): send bytes.
        data = flat.to(self.device, non_blocking=True).view(torch.uint8)
        dist.broadcast(data, src=0, group=self._group)
        if data.is_cuda:
            torch.cuda.synchronize(data.device)

    def disconnect(self, sglang: SGLangBackend | None) -> None:
        if self._alive():
            dist.destroy_process_group(self._group)
        if self._name and sglang is not None:
            try:
                sglang.call("destroy_weights_update_group", {"group_name": self._name})
            except Exception as err:  # SGLang may be gone, or its half of the group already
                logger.debug("destroy_weights_update_group %s: %s", self._name, err)
        self._group, self._store, self._name = None, None, ""


# ---------------------------------------------------------------------- engine


@dataclass
class _Job:
    """One of a request's n samples, across its attempts."""

    sample: Sample
    prompt_ids: list[int]
    budget: int | None = None  # Request.max_new_tokens (None: the engine's)
    empty_aborts: int = 0


@dataclass
class _Call:
    """One generate call in flight: a request's n samples, or one resumed sample."""

    jobs: list[_Job]
    version: int  # the policy version SGLang serves for the whole call


class SGLangEngine:
    """The engine interface of ``TorchEngine`` over SGLang (see the module docstring)."""

    def __init__(
        self,
        sglang: SGLangBackend,
        relay: WeightRelay,
        *,
        max_num_seqs: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_token_ids: Sequence[int],
        drain_timeout_s: float,
    ) -> None:
        self.sglang = sglang
        self.relay = relay
        self.max_num_seqs = max_num_seqs
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.drain_timeout_s = drain_timeout_s
        self.version = 0
        self.generated_tokens = 0
        self._calls: dict[int, _Call] = {}  # by backend key
        self._interrupted: list[_Job] = []  # aborted, to be resubmitted
        self._done: list[Sample] = []  # finished, returned by the next step()
        self._keys = itertools.count()
        self._updating = False

    def _budget(self, job: _Job) -> int:
        return min(job.budget or self.max_new_tokens, self.max_new_tokens)

    # ------------------------------------------------------------------ requests

    def add(self, request: Request) -> None:
        if request.n > self.max_num_seqs:
            raise ValueError(
                f"a request of {request.n} samples exceeds rollout.max_num_seqs={self.max_num_seqs}"
            )
        # request.stop_strings are not sent: SGLang runs without a tokenizer here, so a turn runs
        # on to EOS or its budget and the actor cuts it at the first stop string.
        first = request.index
        jobs = [
            _Job(Sample(request.request_id, k), list(request.prompt_ids), request.max_new_tokens)
            for k in range(first, first + request.n)
        ]
        self._submit(jobs)

    @property
    def num_running(self) -> int:
        return sum(len(c.jobs) for c in self._calls.values()) + len(self._interrupted)

    def has_work(self) -> bool:
        return bool(self._calls or self._interrupted or self._done)

    def free_slots(self) -> int:
        return self.max_num_seqs - self.num_running

    def _submit(self, jobs: list[_Job]) -> None:
        """One call for ``jobs``, which share their whole context (a fresh group, or one sample)."""
        first = jobs[0]
        key = next(self._keys)
        payload = generate_payload(
            first.prompt_ids + first.sample.token_ids,
            n=len(jobs),
            max_new_tokens=self._budget(first) - len(first.sample.token_ids),
            temperature=self.temperature,
            top_p=self.top_p,
            stop_token_ids=self.stop_token_ids,
        )
        self._calls[key] = _Call(jobs, self.version)
        self.sglang.submit(key, payload)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[Sample]:
        """Collect what SGLang finished (waiting up to ``_POLL_S``); returns finished samples."""
        for key, result in self.sglang.poll(_POLL_S):
            self._absorb(key, result)
        self._resubmit()
        done, self._done = self._done, []
        return done

    def _absorb(self, key: int, result: Any) -> None:
        call = self._calls.pop(key)
        if isinstance(result, BaseException):
            raise SGLangError(f"SGLang generate failed: {result}") from result
        outputs = result if isinstance(result, list) else [result]
        if len(outputs) != len(call.jobs):
            raise SGLangError(f"SGLang returned {len(outputs)} outputs for a call of {len(call.jobs)}")
        for job, out in zip(call.jobs, outputs):
            piece = parse_output(out)
            s = job.sample
            s.token_ids += piece.token_ids
            s.logprobs += piece.logprobs
            s.versions += [call.version] * len(piece.token_ids)
            self.generated_tokens += len(piece.token_ids)
            if len(s.token_ids) > self._budget(job):
                raise SGLangError(f"SGLang returned {len(s.token_ids)} tokens, over max_new_tokens")
            finish = self._finish_reason(job, piece.finish)
            if finish:
                s.finish_reason = finish
                self._done.append(s)
                continue
            job.empty_aborts = 0 if piece.token_ids or self._updating else job.empty_aborts + 1
            if job.empty_aborts > _MAX_EMPTY_ABORTS:
                raise SGLangError(
                    "SGLang keeps aborting requests that this actor did not pause; "
                    "give each actor its own server (rollout.sglang_url)"
                )
            self._interrupted.append(job)

    def _finish_reason(self, job: _Job, finish: str) -> str:
        """ "stop" | "length" | "" (interrupted: resume it)."""
        if finish != "abort":
            return finish
        # An abort can land just after the last token: classify by what was generated.
        s = job.sample
        if s.token_ids and s.token_ids[-1] in self.stop_token_ids:
            return "stop"
        if len(s.token_ids) >= self._budget(job):
            return "length"
        return ""

    def _resubmit(self) -> None:
        """Resume interrupted samples: alone with their own prefix, or, if still empty, as a group."""
        if self._updating or not self._interrupted:
            return
        empty: dict[int, list[_Job]] = {}
        for job in self._interrupted:
            if job.sample.token_ids:
                self._submit([job])
            else:
                empty.setdefault(job.sample.request_id, []).append(job)
        self._interrupted = []
        for jobs in empty.values():
            self._submit(jobs)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while self._calls:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"SGLang did not return {len(self._calls)} aborted requests within "
                    f"{self.drain_timeout_s:.0f} s (weight_sync.timeout_s)"
                )
            for key, result in self.sglang.poll(0.1):
                self._absorb(key, result)

    # ------------------------------------------------------------------ weights

    def parameters(self) -> dict[str, torch.Tensor]:
        """Staging tensors by name for ``weight_sync.broadcast.receive``; ``set_version`` forwards them."""
        return self.relay.params

    def set_version(self, version: int) -> None:
        """The staged weights are policy ``version``: interrupt, load them into SGLang, resume."""
        start = time.perf_counter()
        self._updating = True
        try:
            self.sglang.call("pause_generation", {"mode": "abort"})
            try:
                self._drain()  # partial outputs come back with the old version
                self.relay.push(self.sglang)
            finally:
                self.sglang.call("continue_generation", {})
            self.version = version
        finally:
            self._updating = False
        resumed = len(self._interrupted)
        self._resubmit()
        logger.debug(
            "SGLang at v%d in %.3f s; %d samples resumed", version, time.perf_counter() - start, resumed
        )

    def close(self) -> None:
        try:
            if self._calls:
                self.sglang.call("abort_request", {"rid": "", "abort_all": True})
            self.relay.disconnect(self.sglang)
        except Exception as err:  # closing must not hide the error that brought us here
            logger.warning("closing the SGLang engine: %s", err)
        finally:
            self._calls.clear()
            self._interrupted.clear()
            self.sglang.close()


# ---------------------------------------------------------------------- factory


def make_sglang_engine(
    cfg: Any, model_path: str, *, device: str, stop_token_ids: Sequence[int]
) -> SGLangEngine:
    """The engine for ``rollout.engine=sglang`` (knobs: ``rollout.sglang_*``)."""
    rollout = cfg.rollout
    url: str = rollout.sglang_url
    call_timeout_s = float(cfg.weight_sync.timeout_s)
    if rollout.top_p < 1.0:
        logger.warning(
            "rollout.top_p=%s with SGLang: its logprobs are not renormalised over the nucleus, so the "
            "behaviour logprobs are off by log(nucleus mass); prefer top_p=1",
            rollout.top_p,
        )
    sglang: SGLangBackend
    if url:
        sglang = HttpBackend(
            url,
            max_workers=rollout.max_num_seqs,
            generate_timeout_s=rollout.sglang_timeout_s,
            call_timeout_s=call_timeout_s,
        )
    else:
        sglang = InProcessBackend.launch(
            model_path,
            tp_size=rollout.sglang_tp_size,
            mem_fraction_static=rollout.sglang_mem_fraction,
            dtype=cfg.model.dtype,
            random_seed=cfg.seed,
            base_gpu_id=torch.device(device).index or 0,
            max_running_requests=rollout.max_num_seqs,
            skip_tokenizer_init=True,  # token ids in and out; stops come from stop_token_ids
        )
    backend = rollout.sglang_relay_backend or ("nccl" if torch.device(device).type == "cuda" else "gloo")
    try:
        relay = WeightRelay(
            parameter_layout(model_path, getattr(torch, cfg.model.dtype)),
            bucket_mb=cfg.weight_sync.bucket_mb,
            backend=backend,
            host=rollout.sglang_relay_host,
            device=device,
            timeout_s=call_timeout_s,
        )
    except BaseException:
        sglang.close()
        raise
    return SGLangEngine(
        sglang,
        relay,
        max_num_seqs=rollout.max_num_seqs,
        max_new_tokens=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        stop_token_ids=stop_token_ids,
        drain_timeout_s=call_timeout_s,
    )
