"""Talking to SGLang: the request and response translation, and the two backends (HTTP to a
running server, or an in-process ``sglang.Engine``). No engine logic: ``actors/sglang_engine.py``
builds on these. Nothing here imports SGLang at module level.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class SGLangError(RuntimeError):
    """SGLang refused a request or could not be reached."""


# ---------------------------------------------------------------------- translation


def generate_payload(
    input_ids: list[int],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_token_ids: Collection[int],
) -> dict[str, Any]:
    """One ``/generate`` body (``GenerateReqInput``; ``sampling_params`` keys of ``SamplingParams``)."""
    # No rid: SGLang makes unique ones, also for the n expanded samples of one call.
    return {
        "input_ids": list(input_ids),
        "sampling_params": {
            "n": n,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop_token_ids": sorted(stop_token_ids),
            # The stop token is trained on: keep it in the text too (output_ids always keep it).
            "no_stop_trim": True,
        },
        "return_logprob": True,
        "stream": False,
    }


@dataclass
class Piece:
    """What one attempt of one sample produced."""

    token_ids: list[int]
    logprobs: list[float]
    finish: str  # "stop" | "length" | "abort"


def parse_output(out: Mapping[str, Any]) -> Piece:
    """One ``GenerateResponse``: ``output_ids`` and ``meta_info.output_token_logprobs``."""
    meta = out.get("meta_info") or {}
    reason = meta.get("finish_reason")
    finish = reason.get("type") if isinstance(reason, Mapping) else reason
    if finish not in ("stop", "length", "abort"):
        raise SGLangError(f"SGLang returned an unfinished or unknown finish_reason {reason!r}")
    token_ids = [int(t) for t in out.get("output_ids") or []]
    entries = meta.get("output_token_logprobs") or []
    if len(entries) != len(token_ids):
        raise SGLangError(
            f"SGLang returned {len(token_ids)} output_ids but {len(entries)} output_token_logprobs"
        )
    logprobs = []
    for entry, token in zip(entries, token_ids):
        logprob, entry_token = entry[0], int(entry[1])
        if entry_token != token or logprob is None:
            raise SGLangError(f"SGLang logprob entry {entry!r} does not match output token {token}")
        logprobs.append(float(logprob))
    return Piece(token_ids, logprobs, finish)


def check_success(op: str, result: Any) -> None:
    """Weight ops answer ``(success, message)`` in process and ``{"success", "message"}`` over HTTP."""
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        ok, message = result[0], result[1] if len(result) > 1 else ""
    elif isinstance(result, Mapping) and "success" in result:
        ok, message = bool(result["success"]), result.get("message", "")
    else:
        return
    if not ok:
        raise SGLangError(f"SGLang {op} failed: {message}")


# ---------------------------------------------------------------------- backends


class SGLangBackend(Protocol):
    """The two ways to reach SGLang. ``call`` takes an SGLang endpoint name and its body."""

    def submit(self, key: int, payload: dict[str, Any]) -> None: ...

    def poll(self, timeout_s: float) -> list[tuple[int, Any]]:
        """Finished generate calls as ``(key, response or exception)``."""
        ...

    def call(self, op: str, body: dict[str, Any]) -> Any: ...

    def tp_size(self) -> int: ...

    def close(self) -> None: ...


class HttpBackend:
    """A running SGLang server. Generate calls block worker threads; ``poll`` collects them."""

    def __init__(self, url: str, *, max_workers: int, generate_timeout_s: float, call_timeout_s: float):
        self.url = url.rstrip("/")
        self.generate_timeout_s = generate_timeout_s
        self.call_timeout_s = call_timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="sglang-http")
        self._futures: dict[concurrent.futures.Future[Any], int] = {}

    def _request(self, path: str, body: dict[str, Any] | None, timeout_s: float) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise SGLangError(f"SGLang at {self.url} answered {err.code} to {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise SGLangError(
                f"cannot reach SGLang at {self.url}{path} ({reason}); start it with "
                "`python -m sglang.launch_server --model-path ...` or fix rollout.sglang_url"
            ) from None
        return json.loads(raw) if raw.strip() else None

    def submit(self, key: int, payload: dict[str, Any]) -> None:
        future = self._pool.submit(self._request, "/generate", payload, self.generate_timeout_s)
        self._futures[future] = key

    def poll(self, timeout_s: float) -> list[tuple[int, Any]]:
        if not self._futures:
            return []
        done, _ = concurrent.futures.wait(
            self._futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return [(self._futures.pop(f), f.exception() or f.result()) for f in done]

    def call(self, op: str, body: dict[str, Any]) -> Any:
        return self._request(f"/{op}", body, self.call_timeout_s)

    def tp_size(self) -> int:
        info = self._request("/server_info", None, self.call_timeout_s) or {}
        if int(info.get("dp_size", 1)) != 1:  # SGLang's distributed weight update asserts it
            raise SGLangError(f"SGLang at {self.url} runs dp_size > 1; start it with --dp-size 1")
        return int(info.get("tp_size", 1))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._futures.clear()


class InProcessBackend:
    """An ``sglang.Engine`` in this process (its scheduler runs in SGLang's own subprocesses).

    ``pause_request`` / ``continue_request`` build SGLang's ``PauseGenerationReqInput`` /
    ``ContinueGenerationReqInput``; they are passed in so that this class never imports SGLang.
    """

    def __init__(
        self,
        engine: Any,
        *,
        pause_request: Callable[..., Any],
        continue_request: Callable[..., Any],
        owns_engine: bool = True,
    ) -> None:
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop = engine.loop
        self._pause_request = pause_request
        self._continue_request = continue_request
        self._owns_engine = owns_engine
        self._tasks: dict[asyncio.Task[Any], int] = {}

    @classmethod
    def launch(cls, model_path: str, **server_args: Any) -> InProcessBackend:
        try:
            import sglang
            from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput
        except ImportError as err:
            raise SGLangError(
                f"rollout.engine=sglang needs SGLang ({err}): install it on a CUDA machine with "
                "`pip install 'async-rl[sglang]'`, or set rollout.sglang_url=http://HOST:PORT"
            ) from None
        engine = sglang.Engine(model_path=model_path, **server_args)
        return cls(engine, pause_request=PauseGenerationReqInput, continue_request=ContinueGenerationReqInput)

    def submit(self, key: int, payload: dict[str, Any]) -> None:
        task = self.loop.create_task(self.engine.async_generate(**payload))
        self._tasks[task] = key

    def poll(self, timeout_s: float) -> list[tuple[int, Any]]:
        if not self._tasks:
            return []
        done, _ = self.loop.run_until_complete(
            asyncio.wait(list(self._tasks), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        )
        return [(self._tasks.pop(t), t.exception() or t.result()) for t in done]

    def call(self, op: str, body: dict[str, Any]) -> Any:
        manager = self.engine.tokenizer_manager
        match op:
            case "pause_generation":
                return self.loop.run_until_complete(manager.pause_generation(self._pause_request(**body)))
            case "continue_generation":
                return self.loop.run_until_complete(
                    manager.continue_generation(self._continue_request(**body))
                )
            case "abort_request":
                return manager.abort_request(**body)
            case _:  # the weight ops are methods of sglang.Engine with the HTTP body as arguments
                return getattr(self.engine, op)(**body)

    def tp_size(self) -> int:
        return int(getattr(getattr(self.engine, "server_args", None), "tp_size", 1))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            self.loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        self._tasks.clear()
        if self._owns_engine:
            self.engine.shutdown()
