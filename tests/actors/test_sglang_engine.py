"""The SGLang engine adapter against fakes of SGLang 0.5.23's HTTP and in-process APIs.

SGLang needs CUDA, so fakes stand in for it, and say so in their names:

* ``FakeSGLangServer``: a real HTTP server in a subprocess on 127.0.0.1 that accepts the
  payloads of SGLang's documented contract (``sglang/api/v1/api_types.py``: unknown sampling
  keys are rejected), answers in its ``GenerateResponse`` shape, pauses with ``mode="abort"``
  the way ``TokenizerManager.pause_generation`` does (partial outputs, finish reason
  ``abort``), and joins the weight relay like SGLang's scheduler: a ``tcp://`` store client,
  ``PrefixStore(group_name)``, torch's ``_new_process_group_helper``, and a uint8 receive per
  ``flattened_bucket``. Its "model" is a hash of the context; its logprob encodes the weight
  value it last received, so a token's logprob says which weights sampled it.
* ``FakeSGLangEngine`` / ``FakeTokenizerManager``: the in-process API of ``sglang.Engine`` in
  front of the same fake server, as the real engine is in front of its scheduler processes.

Tests with real SGLang carry ``gpu`` and skip without CUDA and SGLang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from actors.sglang_backends import HttpBackend, InProcessBackend, SGLangError, generate_payload, parse_output
from actors.sglang_engine import SGLangEngine, WeightRelay, parameter_layout
from actors.torch_engine import Request, Sample
from weight_sync import broadcast

EOS = 1
_HOLD_TIMEOUT_S = 30.0

# Field names of sglang.api.v1 GenerateRequest (unknown keys ignored there; we hold the adapter
# to the documented ones) and SamplingParams (unknown keys rejected), SGLang 0.5.23.
GENERATE_FIELDS = {
    "rid", "text", "input_ids", "stream", "sampling_params", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "token_ids_logprob", "return_hidden_states", "return_text_in_logprobs",
    "routed_dp_rank", "priority", "cache_salt", "lora_path", "session_params", "session_id",
    "custom_logit_processor", "return_prompt_token_ids", "return_sampling_mask",
}  # fmt: skip
SAMPLING_FIELDS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
}  # fmt: skip


def fake_token(context: list[int], salt: int) -> int:
    """The fake model: the next token is a hash of the context (salted by the sample index)."""
    h = zlib.crc32(struct.pack(f"<{len(context) + 1}i", salt, *context))
    return EOS if h % 9 == 0 else 2 + h % 40


def fake_logprob(token: int, weight: int) -> float:
    """Exact in binary floating point, and different for every weight value."""
    return -(token % 7 + 1) / 8 - weight / 64


# ---------------------------------------------------------------------- the fake server


class FakeSGLangServer:
    """State of the fake; one instance per subprocess. See the module docstring."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.paused = False
        self.hold_after: int | None = None
        self.inflight: dict[str, dict[str, Any]] = {}  # request rid -> {"abort", "holding", "hold"}
        self.requests: list[dict[str, Any]] = []
        self.calls: list[list[Any]] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.served = 0
        self.groups: dict[str, Any] = {}
        self.session = False

    # ------------------------------------------------------------------ generation

    def generate(self, body: dict[str, Any]) -> tuple[int, Any]:
        if not set(body) <= GENERATE_FIELDS:
            return 400, {"error": f"unknown fields {sorted(set(body) - GENERATE_FIELDS)}"}
        params = body.get("sampling_params") or {}
        if not set(params) <= SAMPLING_FIELDS:
            return 400, {"error": f"unknown sampling params {sorted(set(params) - SAMPLING_FIELDS)}"}
        n, rid, ids = int(params.get("n", 1)), body.get("rid") or uuid.uuid4().hex, list(body["input_ids"])
        with self.cond:
            self.requests.append(body)
            # Like TokenizerManager: a request that arrives while paused waits for continue.
            self.cond.wait_for(lambda: not self.paused, _HOLD_TIMEOUT_S)
            state = self.inflight[rid] = {"abort": False, "holding": False, "hold": self.hold_after}
        try:
            outs = self._run(ids, n, params, state)
        finally:
            with self.cond:
                del self.inflight[rid]
                self.cond.notify_all()
        for i, out in enumerate(outs):
            out["meta_info"]["id"] = f"{rid}_{i}" if n > 1 else rid
        return 200, outs if n > 1 else outs[0]

    def _run(self, ids: list[int], n: int, params: dict[str, Any], state: dict[str, Any]) -> list[Any]:
        """Round-robin decode of the n samples; each attempt may hold after ``hold`` tokens."""
        max_new, stops = int(params["max_new_tokens"]), set(params.get("stop_token_ids") or [])
        subs = [{"ids": [], "lps": [], "finish": None} for _ in range(n)]
        while any(s["finish"] is None for s in subs):
            with self.cond:
                live = [s for s in subs if s["finish"] is None]
                if state["hold"] is not None and all(len(s["ids"]) >= state["hold"] for s in live):
                    state["holding"] = True
                    self.cond.wait_for(lambda: state["abort"], _HOLD_TIMEOUT_S)
                    state["holding"] = False
                aborted, weight = state["abort"], self.served
            for i, s in enumerate(subs):
                if s["finish"] is not None:
                    continue
                if aborted:
                    s["finish"] = {
                        "type": "abort",
                        "message": "Aborted",
                        "status_code": None,
                        "err_type": None,
                    }
                    continue
                token = fake_token(ids + s["ids"], i if n > 1 else 0)
                s["ids"].append(token)
                s["lps"].append(fake_logprob(token, weight))
                if token in stops:
                    s["finish"] = {"type": "stop", "matched": token}
                elif len(s["ids"]) >= max_new:
                    s["finish"] = {"type": "length", "length": len(s["ids"])}
        return [
            {
                "text": "",
                "output_ids": s["ids"],
                "meta_info": {
                    "id": "",
                    "finish_reason": s["finish"],
                    "prompt_tokens": len(ids),
                    "completion_tokens": len(s["ids"]),
                    "cached_tokens": 0,
                    "output_token_logprobs": [[lp, t, None] for lp, t in zip(s["lps"], s["ids"])],
                    "weight_version": "default",
                },
            }
            for s in subs
        ]

    def pause(self, body: dict[str, Any]) -> tuple[int, Any]:
        self.calls.append(["pause_generation", body])
        if body != {"mode": "abort"}:
            return 400, {"error": f"the fake pauses only with mode=abort, not {body}"}
        with self.cond:
            self.paused = True
            for state in self.inflight.values():
                state["abort"] = True
            self.cond.notify_all()
            # Returns once no request is in flight, like the model_update_lock check.
            self.cond.wait_for(lambda: not self.inflight, _HOLD_TIMEOUT_S)
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def resume(self, body: dict[str, Any]) -> tuple[int, Any]:
        self.calls.append(["continue_generation", body])
        with self.cond:
            self.paused = False
            self.cond.notify_all()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def abort(self, body: dict[str, Any]) -> tuple[int, Any]:
        self.calls.append(["abort_request", body])
        with self.cond:
            for rid, state in self.inflight.items():
                if body.get("abort_all") or (body.get("rid") and rid.startswith(body["rid"])):
                    state["abort"] = True
            self.cond.notify_all()
        return 200, None

    # ------------------------------------------------------------------ weights

    def init_group(self, body: dict[str, Any]) -> tuple[int, Any]:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        self.calls.append(["init_weights_update_group", body])
        world, rank = body["world_size"], body["rank_offset"]  # tp_rank 0
        store = dist.TCPStore(
            body["master_address"], body["master_port"], world, is_master=False, timeout=timedelta(seconds=30)
        )
        pg, _ = c10d._new_process_group_helper(
            world,
            rank,
            [],
            c10d.Backend(body["backend"]),
            dist.PrefixStore(body["group_name"], store),
            group_name=body["group_name"],
            timeout=timedelta(seconds=30),
        )
        c10d._world.pg_group_ranks[pg] = {i: i for i in range(world)}
        self.groups[body["group_name"]] = pg
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_group(self, body: dict[str, Any]) -> tuple[int, Any]:
        import torch.distributed as dist

        self.calls.append(["destroy_weights_update_group", body])
        pg = self.groups.pop(body["group_name"], None)
        if pg is None:
            return 400, {"success": False, "message": "The group to be destroyed does not exist."}
        dist.destroy_process_group(pg)
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

    def session_op(self, op: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.calls.append([op, body])
        if self.session == (op == "begin_weight_update"):
            return 400, {"success": False, "message": f"{op}: session state is wrong"}
        self.session = op == "begin_weight_update"
        return 200, {"success": True, "message": "Success"}

    def update(self, body: dict[str, Any]) -> tuple[int, Any]:
        import torch.distributed as dist

        self.calls.append(["update_weights_from_distributed", body])
        if not self.session or body.get("load_format") != "flattened_bucket":
            return 400, {"success": False, "message": "needs a session and load_format=flattened_bucket"}
        dtypes = [getattr(torch, d) for d in body["dtypes"]]
        sizes = [torch.Size(s).numel() * d.itemsize for s, d in zip(body["shapes"], dtypes)]
        flat = torch.empty(sum(sizes), dtype=torch.uint8)
        dist.broadcast(flat, src=0, group=self.groups[body["group_name"]])
        offset = 0
        for name, dtype, shape, size in zip(body["names"], dtypes, body["shapes"], sizes):
            self.weights[name] = flat[offset : offset + size].view(dtype).reshape(shape).clone()
            offset += size
        with self.cond:
            if body.get("flush_cache") and self.inflight:
                return 400, {"success": False, "message": "cache not flushed: requests are running"}
            self.served = round(float(self.weights[body["names"][0]].flatten()[0]))
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    # ------------------------------------------------------------------ test controls

    def state(self) -> dict[str, Any]:
        with self.cond:
            holding = sum(s["holding"] for s in self.inflight.values())
            weights = {k: v.float().flatten().tolist() for k, v in self.weights.items()}
            return {
                "requests": self.requests,
                "calls": self.calls,
                "inflight": len(self.inflight),
                "holding": holding,
                "weights": weights,
            }

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        match method, path:
            case "POST", "/generate":
                return self.generate(body)
            case "POST", "/pause_generation":
                return self.pause(body)
            case "POST", "/continue_generation":
                return self.resume(body)
            case "POST", "/abort_request":
                return self.abort(body)
            case "GET", "/server_info":
                return 200, {"tp_size": 1, "dp_size": 1, "version": "0.5.23-fake"}
            case "POST", "/init_weights_update_group":
                return self.init_group(body)
            case "POST", "/destroy_weights_update_group":
                return self.destroy_group(body)
            case "POST", "/begin_weight_update" | "/end_weight_update":
                return self.session_op(path[1:], body)
            case "POST", "/update_weights_from_distributed":
                return self.update(body)
            case "POST", "/fake/config":
                self.hold_after = body["hold_after"]
                return 200, {}
            case "POST", "/fake/reset":
                with self.cond:
                    self.requests, self.calls, self.weights, self.hold_after = [], [], {}, None
                return 200, {}
            case "GET", "/fake/state":
                return 200, self.state()
        return 404, {"error": f"no route {method} {path}"}


def serve(port_file: str) -> None:
    fake = FakeSGLangServer()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            try:
                code, payload = fake.route(method, self.path, body)
            except Exception as err:  # answer, so that the test fails now and says why
                code, payload = 500, {"error": f"{type(err).__name__}: {err}"}
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


# ---------------------------------------------------------------------- fakes of the in-process API


def _http(url: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


@dataclass
class FakePauseGenerationReqInput:
    """Stands in for sglang.srt.managers.io_struct.PauseGenerationReqInput (0.5.23)."""

    mode: str = "abort"


@dataclass
class FakeContinueGenerationReqInput:
    """Stands in for sglang.srt.managers.io_struct.ContinueGenerationReqInput (0.5.23)."""

    torch_empty_cache: bool = True


class FakeTokenizerManager:
    """The pause/continue coroutines and abort_request of SGLang's TokenizerManager."""

    def __init__(self, engine: FakeSGLangEngine) -> None:
        self.engine = engine

    async def pause_generation(self, obj: FakePauseGenerationReqInput) -> None:
        assert isinstance(obj, FakePauseGenerationReqInput)
        await self.engine.forward("/pause_generation", {"mode": obj.mode})

    async def continue_generation(self, obj: FakeContinueGenerationReqInput) -> None:
        assert isinstance(obj, FakeContinueGenerationReqInput)
        await self.engine.forward("/continue_generation", {})

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        _http(self.engine.url, "/abort_request", {"rid": rid, "abort_all": abort_all})


class FakeSGLangEngine:
    """sglang.Engine's methods that the adapter uses, with their 0.5.23 signatures."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.pool = concurrent.futures.ThreadPoolExecutor(32)  # blocking HTTP, as many as calls in flight
        self.server_args = SimpleNamespace(tp_size=1)
        self.tokenizer_manager = FakeTokenizerManager(self)
        self.closed = False

    async def forward(self, path: str, body: Any) -> Any:
        return await self.loop.run_in_executor(self.pool, _http, self.url, path, body)

    async def async_generate(
        self,
        prompt: str | None = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        stream: bool = False,
        rid: str | None = None,
    ) -> Any:
        assert prompt is None and not stream
        body = {"input_ids": input_ids, "sampling_params": sampling_params}
        body |= {} if rid is None else {"rid": rid}
        out = await self.forward("/generate", body | {"return_logprob": return_logprob})
        for o in out if isinstance(out, list) else [out]:  # in process, entries are tuples
            meta = o["meta_info"]
            meta["output_token_logprobs"] = [tuple(e) for e in meta["output_token_logprobs"]]
        return out

    def _weights(self, path: str, body: dict[str, Any]) -> tuple[bool, str]:
        try:
            out = _http(self.url, path, body)
        except urllib.error.HTTPError as err:
            out = json.loads(err.read())
        return out["success"], out["message"]

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "nccl",
    ) -> tuple[bool, str]:
        body = {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset}
        body |= {"world_size": world_size, "group_name": group_name, "backend": backend}
        return self._weights("/init_weights_update_group", body)

    def destroy_weights_update_group(self, group_name: str) -> tuple[bool, str]:
        return self._weights("/destroy_weights_update_group", {"group_name": group_name})

    def begin_weight_update(self, selector: str = "all") -> tuple[bool, str]:
        return self._weights("/begin_weight_update", {"selector": selector})

    def end_weight_update(self) -> tuple[bool, str]:
        return self._weights("/end_weight_update", {})

    def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str = "weight_update_group",
        flush_cache: bool = True,
        load_format: str | None = None,
    ) -> tuple[bool, str]:
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name}
        body |= {"flush_cache": flush_cache, "load_format": load_format}
        return self._weights("/update_weights_from_distributed", body)

    def shutdown(self) -> None:
        self.closed = True
        self.pool.shutdown()
        self.loop.close()


# ---------------------------------------------------------------------- fixtures

# Three buckets: runs of equal dtype, as weight_sync.broadcast.plan cuts them.
LAYOUT = {
    "a.weight": torch.empty(4, 3, device="meta"),
    "b.weight": torch.empty(5, dtype=torch.bfloat16, device="meta"),
    "c.weight": torch.empty(2, 2, dtype=torch.bfloat16, device="meta"),
    "d.bias": torch.empty(3, device="meta"),
}
MAX_NEW = 8


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port_file = tmp_path_factory.mktemp("fake_sglang") / "port"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            assert proc.poll() is None, "FakeSGLangServer exited"
            assert time.monotonic() < deadline, "FakeSGLangServer did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def url(fake_server: str) -> str:
    _http(fake_server, "/fake/reset", {})
    return fake_server


def _engine(kind: str, url: str) -> SGLangEngine:
    sglang: Any
    if kind == "http":
        sglang = HttpBackend(url, max_workers=16, generate_timeout_s=60, call_timeout_s=60)
    else:
        sglang = InProcessBackend(
            FakeSGLangEngine(url),
            pause_request=FakePauseGenerationReqInput,
            continue_request=FakeContinueGenerationReqInput,
        )
    relay = WeightRelay(LAYOUT, bucket_mb=1, backend="gloo", host="127.0.0.1", device="cpu", timeout_s=60)
    return SGLangEngine(
        sglang,
        relay,
        max_num_seqs=16,
        max_new_tokens=MAX_NEW,
        temperature=1.0,
        top_p=1.0,
        stop_token_ids=[EOS],
        drain_timeout_s=60,
    )


def _load(engine: SGLangEngine, version: int) -> None:
    """What the actor does on a weight header: receive into parameters(), then set_version."""
    for t in engine.parameters().values():
        t.fill_(float(version))
    engine.set_version(version)


def _run(engine: SGLangEngine) -> dict[tuple[int, int], Sample]:
    done: dict[tuple[int, int], Sample] = {}
    deadline = time.monotonic() + 60
    while engine.has_work():
        assert time.monotonic() < deadline
        for s in engine.step():
            done[(s.request_id, s.index)] = s
    return done


def _assert_consistent(s: Sample, prompt: list[int]) -> None:
    """Every token's logprob is the one the fake gave under the weights of its version."""
    assert len(s.token_ids) == len(s.logprobs) == len(s.versions) >= 1
    assert s.logprobs == [fake_logprob(t, v) for t, v in zip(s.token_ids, s.versions)]
    assert s.finish_reason == ("stop" if s.token_ids[-1] == EOS else "length")
    assert s.finish_reason == "stop" or len(s.token_ids) == MAX_NEW
    for k in range(1, len(s.token_ids)):  # the fake's model continues its own context
        assert s.token_ids[k] in (
            fake_token(prompt + s.token_ids[:k], s.index),
            fake_token(prompt + s.token_ids[:k], 0),
        )


# ---------------------------------------------------------------------- translation


def test_generate_payload_follows_the_documented_contract() -> None:
    body = generate_payload(
        [5, 6, 7], n=4, max_new_tokens=9, temperature=0.7, top_p=0.9, stop_token_ids=[EOS]
    )
    assert set(body) <= GENERATE_FIELDS and set(body["sampling_params"]) <= SAMPLING_FIELDS
    assert body["input_ids"] == [5, 6, 7]
    assert body["return_logprob"] is True and body["stream"] is False
    assert body["sampling_params"] == {
        "n": 4,
        "max_new_tokens": 9,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop_token_ids": [EOS],
        "no_stop_trim": True,
    }
    json.dumps(body)  # the HTTP body as sent


def _out(ids: list[int], lps: list[Any], finish: Any) -> dict[str, Any]:
    return {"output_ids": ids, "meta_info": {"finish_reason": finish, "output_token_logprobs": lps}}


def test_parse_output_reads_tokens_logprobs_and_finish() -> None:
    stop = parse_output(_out([4, 1], [[-0.5, 4, None], [-0.25, 1, None]], {"type": "stop", "matched": 1}))
    assert (stop.token_ids, stop.logprobs, stop.finish) == ([4, 1], [-0.5, -0.25], "stop")
    length = parse_output(_out([3], [(-1.5, 3, None)], {"type": "length", "length": 1}))  # in-process tuples
    assert (length.token_ids, length.logprobs, length.finish) == ([3], [-1.5], "length")
    abort = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    assert parse_output(_out([7, 8], [[-1.0, 7, None], [-2.0, 8, None]], abort)).finish == "abort"
    # Aborted in SGLang's waiting queue: no tokens, and meta_info may lack the logprob list.
    empty = parse_output({"output_ids": [], "meta_info": {"finish_reason": {"type": "abort"}}})
    assert (empty.token_ids, empty.logprobs, empty.finish) == ([], [], "abort")


@pytest.mark.parametrize(
    "out",
    [
        _out([4, 5], [[-0.5, 4, None]], {"type": "stop"}),  # a logprob missing
        _out([4], [[-0.5, 9, None]], {"type": "stop"}),  # the entry is for another token
        _out([4], [[None, 4, None]], {"type": "length"}),  # no logprob
        _out([4], [[-0.5, 4, None]], None),  # not finished
    ],
)
def test_parse_output_rejects_inconsistent_responses(out: dict[str, Any]) -> None:
    with pytest.raises(SGLangError):
        parse_output(out)


def test_staging_has_the_learners_parameters_and_bucket_layout(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    learner = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    relay = WeightRelay(
        parameter_layout(str(tiny_model_dir), torch.float32),
        bucket_mb=1,
        backend="gloo",
        host="127.0.0.1",
        device="cpu",
        timeout_s=5,
    )
    header = broadcast.plan(learner, version=3, epoch=2, bucket_mb=1)
    broadcast.check_compatible(header, relay.params)
    assert relay.header.buckets == header.buckets
    assert [t.dtype for t in relay.params.values()] == [t.dtype for t in learner.values()]
    # The staging tensors are views into one flat buffer per bucket, in the learner's order.
    for flat, (_, numel, first, last) in zip(relay.buckets, header.buckets):
        assert flat.numel() == numel
        views = [relay.params[n] for n in header.names[first:last]]
        assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views)


# ---------------------------------------------------------------------- against the fake server


@pytest.mark.parametrize("kind", ["http", "inprocess"])
def test_groups_of_n_come_back_by_sample_index(url: str, kind: str) -> None:
    engine = _engine(kind, url)
    try:
        _load(engine, 0)
        prompts = {7: [20, 21, 22], 8: [30, 31]}
        engine.add(Request(7, prompts[7], 4, seq=0))
        engine.add(Request(8, prompts[8], 3, seq=1))
        assert engine.free_slots() == 16 - 7 and engine.num_running == 7
        done = _run(engine)
    finally:
        engine.close()
    assert sorted(done) == [(7, 0), (7, 1), (7, 2), (7, 3), (8, 0), (8, 1), (8, 2)]
    for (rid, k), s in done.items():
        assert s.request_id == rid and s.index == k and s.versions == [0] * len(s.token_ids)
        # Sample k is the k-th output of the call: its first token carries the fake's salt k.
        assert s.token_ids[0] == fake_token(prompts[rid], k)
        _assert_consistent(s, prompts[rid])
    requests = _http(url, "/fake/state")["requests"]
    assert sorted(r["sampling_params"]["n"] for r in requests) == [3, 4]  # one call per group
    assert engine.free_slots() == 16


def test_a_later_turn_keeps_its_sample_index_and_its_own_budget(url: str) -> None:
    """Turn 2 of episode 2 of lease 9: one sample, index 2, at most the 3 tokens of budget the
    episode has left. Stop strings are not sent (SGLang runs without a tokenizer here)."""
    engine = _engine("http", url)
    try:
        _load(engine, 0)
        context = [20, 21, 22, 5, 6]
        engine.add(
            Request(9, context, 1, seq=0, max_new_tokens=3, stop_strings=("</calc>",), index=2, step=2)
        )
        done = _run(engine)
    finally:
        engine.close()
    assert list(done) == [(9, 2)]
    s = done[(9, 2)]
    assert 1 <= len(s.token_ids) <= 3
    assert s.finish_reason == ("stop" if s.token_ids[-1] == EOS else "length")
    assert s.finish_reason == "stop" or len(s.token_ids) == 3
    last = _http(url, "/fake/state")["requests"][-1]
    assert last["input_ids"] == context and last["sampling_params"]["max_new_tokens"] == 3
    assert "stop" not in last["sampling_params"]


@pytest.mark.parametrize("kind", ["http", "inprocess"])
def test_resume_after_abort_keeps_logprobs_and_versions(url: str, kind: str) -> None:
    hold = 3
    prompts = {1: [40, 41, 42, 43], 2: [11, 12]}
    engine = _engine(kind, url)
    try:
        _load(engine, 0)
        _http(url, "/fake/config", {"hold_after": hold})  # the first attempts stop after 3 tokens
        for rid, prompt in prompts.items():
            engine.add(Request(rid, prompt, 4, seq=rid))
        deadline = time.monotonic() + 30
        done = {}
        while True:  # until every attempt still running sits at its hold
            for s in engine.step():
                done[(s.request_id, s.index)] = s
            st = _http(url, "/fake/state")
            if len(st["requests"]) == 2 and st["holding"] == st["inflight"]:
                break
            assert time.monotonic() < deadline
        _http(url, "/fake/config", {"hold_after": None})  # resumed attempts run to the end
        _load(engine, 1)  # pause(abort), weights v1, continue, resubmit
        done |= _run(engine)
    finally:
        engine.close()
    assert len(done) == 8
    st = _http(url, "/fake/state")
    resumed = st["requests"][2:]
    mixed = 0
    for (rid, _), s in done.items():
        _assert_consistent(s, prompts[rid])
        first = s.versions.count(0)
        assert s.versions == [0] * first + [1] * (len(s.versions) - first)
        if first < len(s.token_ids):  # interrupted: exactly `hold` tokens at v0, then resumed alone
            assert first == hold
            mixed += 1
            (call,) = [r for r in resumed if r["input_ids"] == prompts[rid] + s.token_ids[:hold]]
            assert call["sampling_params"]["n"] == 1
            assert call["sampling_params"]["max_new_tokens"] == MAX_NEW - hold
        else:
            assert first <= hold  # finished before the hold, all at v0
    assert mixed >= 3 and len(resumed) == mixed
    ops = [c[0] for c in st["calls"]]
    second = len(ops) - ops[::-1].index("pause_generation") - 1
    update = "update_weights_from_distributed"
    assert ops[second : second + 7] == [
        "pause_generation",
        "begin_weight_update",
        *[update] * 3,
        "end_weight_update",
        "continue_generation",
    ]


def test_weights_reach_sglang_bucket_by_bucket_and_survive_a_lost_group(url: str) -> None:
    engine = _engine("http", url)
    try:
        params = engine.parameters()
        for i, t in enumerate(params.values()):
            t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t) + 10 * i)
        engine.set_version(1)
        st = _http(url, "/fake/state")
        assert st["weights"] == {n: t.float().flatten().tolist() for n, t in params.items()}
        updates = [c[1] for c in st["calls"] if c[0] == "update_weights_from_distributed"]
        h = engine.relay.header
        assert [u["names"] for u in updates] == [h.names[first:last] for _, _, first, last in h.buckets]
        assert [u["dtypes"] for u in updates] == [["float32"], ["bfloat16", "bfloat16"], ["float32"]]
        assert [u["shapes"] for u in updates] == [[[4, 3]], [[5], [2, 2]], [[3]]]
        assert [u["flush_cache"] for u in updates] == [False, False, True]
        assert all(u["load_format"] == "flattened_bucket" for u in updates)
        (init,) = [c[1] for c in st["calls"] if c[0] == "init_weights_update_group"]
        assert init["rank_offset"] == 1 and init["world_size"] == 2 and init["backend"] == "gloo"
        # A relay group lost behind the relay's back (destroyed, here) is rebuilt at the next sync.
        torch.distributed.destroy_process_group(engine.relay._group)
        params["d.bias"].fill_(-1.0)
        engine.set_version(2)
        st = _http(url, "/fake/state")
    finally:
        engine.close()
    assert st["weights"]["d.bias"] == [-1.0, -1.0, -1.0]
    inits = [c[1]["group_name"] for c in st["calls"] if c[0] == "init_weights_update_group"]
    destroyed = [c[1]["group_name"] for c in st["calls"] if c[0] == "destroy_weights_update_group"]
    assert len(inits) == 2 and inits[0] != inits[1] and destroyed == [inits[0]]


def test_the_factory_builds_the_http_adapter_from_the_config(url: str, tiny_model_dir: Path) -> None:
    from actors.engine import make_engine
    from async_rl.config import Config, EngineKind

    cfg = Config()
    cfg.rollout.engine = EngineKind.SGLANG
    cfg.rollout.sglang_url = url  # type: ignore[attr-defined]  # read with getattr until it is a field
    cfg.rollout.max_new_tokens = MAX_NEW
    engine = make_engine(cfg, str(tiny_model_dir), device="cpu", stop_token_ids=[EOS], pad_token_id=0)
    assert isinstance(engine, SGLangEngine) and isinstance(engine.sglang, HttpBackend)
    try:
        _load(engine, 2)
        engine.add(Request(5, [60, 61], 2, seq=0))
        done = _run(engine)
    finally:
        engine.close()
    assert sorted(done) == [(5, 0), (5, 1)]
    for s in done.values():
        assert s.versions == [2] * len(s.token_ids)
        _assert_consistent(s, [60, 61])


def _learner_values(name: str, shape: torch.Size, epoch: int) -> torch.Tensor:
    return torch.arange(shape.numel(), dtype=torch.float32).view(shape) + 100 * epoch + len(name)


def learn(store_port: int) -> None:
    """The learner's half, unchanged: SyncGroup rank 0 and broadcast.send, for two group epochs."""
    from weight_sync.group import SyncGroup, connect_store

    store = connect_store("127.0.0.1", store_port, 60)
    for epoch in (1, 2):
        group = SyncGroup(store, epoch=epoch, rank=0, world_size=2, backend="gloo", timeout_s=60)
        params = {n: _learner_values(n, t.shape, epoch).to(t.dtype) for n, t in LAYOUT.items()}
        header = broadcast.plan(params, version=epoch, epoch=epoch, bucket_mb=1)
        broadcast.send(group, params, header, torch.device("cpu"))
        group.close()


@pytest.mark.slow
def test_learner_weights_reach_sglang_through_the_actor(url: str) -> None:
    """learner --(its gloo group, weight_sync.broadcast)--> actor staging --(relay)--> SGLang,
    for two epochs of the learner's group."""
    from weight_sync.group import SyncGroup, host_store

    store = host_store("127.0.0.1", 0, 60)
    learner = subprocess.Popen([sys.executable, __file__, "--learn", str(store.port)])
    engine = _engine("http", url)
    group = None
    try:
        for epoch in (1, 2):
            if group is not None:
                group.close()
            group = SyncGroup(store, epoch=epoch, rank=1, world_size=2, backend="gloo", timeout_s=60)
            header = broadcast.plan(engine.parameters(), version=epoch, epoch=epoch, bucket_mb=1)
            broadcast.check_compatible(header, engine.parameters())
            broadcast.receive(group, header, engine.parameters(), torch.device("cpu"))
            engine.set_version(epoch)
            weights = _http(url, "/fake/state")["weights"]
            for name, t in LAYOUT.items():
                want = _learner_values(name, t.shape, epoch).to(t.dtype).float().flatten().tolist()
                assert weights[name] == want
        assert learner.wait(timeout=60) == 0
    finally:
        engine.close()
        if group is not None:
            group.close()
        if learner.poll() is None:
            learner.kill()
            learner.wait()
    # The learner's group is an object of its own (weight_sync.group.SyncGroup): a new epoch of
    # it leaves the actor's relay group to SGLang standing, so SGLang joined the relay once.
    inits = [c for c in _http(url, "/fake/state")["calls"] if c[0] == "init_weights_update_group"]
    assert len(inits) == 1


def test_an_unreachable_server_is_named_in_the_error() -> None:
    backend = HttpBackend("http://127.0.0.1:9", max_workers=1, generate_timeout_s=5, call_timeout_s=5)
    with pytest.raises(SGLangError, match=r"cannot reach SGLang at http://127.0.0.1:9/server_info"):
        backend.tp_size()
    backend.close()


# ---------------------------------------------------------------------- real SGLang


@pytest.mark.gpu
def test_real_sglang_samples_and_takes_new_weights(tiny_model_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("sglang")
    from transformers import AutoModelForCausalLM

    from actors.sglang_engine import make_sglang_engine
    from async_rl.config import Config, EngineKind

    cfg = Config()
    cfg.rollout.engine = EngineKind.SGLANG
    cfg.rollout.max_new_tokens = 6
    cfg.rollout.max_num_seqs = 8
    engine = make_sglang_engine(cfg, str(tiny_model_dir), device="cuda:0", stop_token_ids=[EOS])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    try:
        with torch.no_grad():  # new weights: the learner's, scaled, through the staging buffers
            for t, p in zip(engine.parameters().values(), model.parameters()):
                p.mul_(1.1)
                t.copy_(p)
        engine.set_version(1)
        prompt = [51, 46, 52, 13]
        engine.add(Request(0, prompt, 4, seq=0))
        done = _run(engine)
    finally:
        engine.close()
    assert len(done) == 4
    for s in done.values():
        assert s.versions == [1] * len(s.token_ids)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + s.token_ids])).logits[0]
        ref = torch.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(
            -1, torch.tensor(s.token_ids)[:, None]
        )
        assert torch.allclose(ref[:, 0], torch.tensor(s.logprobs), atol=2e-2)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2])
if __name__ == "__main__" and sys.argv[1:2] == ["--learn"]:
    learn(int(sys.argv[2]))
