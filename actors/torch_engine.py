"""The built-in inference engine: a Hugging Face causal LM with a KV cache, on any device.

* Up to ``max_num_seqs`` sequences are in flight in one left-padded batch.
* Continuous batching: when sequences finish, their rows leave the batch at once and
  waiting requests are prefilled and merged in at the next step.
* Group sharing: the G samples of one prompt share one prefill (the cache is repeated).
* Each token is sampled from ``actors.sampling`` and carries its logprob under the
  distribution sampled and the policy version that sampled it.
* Weights can be replaced between any two steps (partial rollout resumption). In-flight
  sequences then either continue on the cache the old weights wrote (``resume_kv=keep``)
  or have prompt + generated tokens prefilled again with the new weights before the next
  decode step (``resume_kv=recompute``), so that the continuation conditions on a cache
  written by the policy that samples it. Either way nothing is discarded: every token
  already sampled keeps its logprob and version, and only new tokens get the new version.
* A request may name ``stop_strings`` (an environment's turn ends): a row stops once the
  decoded tail of its tokens contains one (finish reason "stop_string"). A multi-turn episode
  sends each later turn as a request of its own (prompt + the episode so far, prefilled anew),
  with ``index`` and ``step`` keeping the episode on its own random stream.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from actors.sampling import sample, sample_keys
from async_rl.config import ResumeKV

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """``n`` samples of one prompt. ``seq`` (the lease's data-cursor position) keys the RNG."""

    request_id: int
    prompt_ids: list[int]
    n: int
    seq: int
    # Caps this request's responses below the engine's max_new_tokens (None: the engine's).
    max_new_tokens: int | None = None
    # A response also ends once its decoded text contains one of these (needs the engine's decode).
    stop_strings: tuple[str, ...] = ()
    # The sample index of the first of the n samples, and the random-stream step of each one's
    # first token: a later turn of episode k continues stream (seq, k) where the episode is.
    index: int = 0
    step: int = 0


@dataclass
class Sample:
    """One finished (or in-flight) response."""

    request_id: int
    index: int  # which of the request's n samples
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" | "length" | "stop_string" once finished


@dataclass
class _Row:
    sample: Sample
    key: np.uint64
    prompt_ids: list[int]  # the request's list, shared by its n rows (never mutated)
    max_new_tokens: int
    # Real tokens in this row's cache: prompt + all generated tokens but the last, which is
    # the next decode step's input.
    length: int
    step: int = 0  # random-stream step of the first token (Request.step)
    stop_strings: tuple[str, ...] = ()
    # Tokens decoded to look for a stop string: enough for the longest (a token is >= 1 character).
    stop_window: int = 0


class TorchEngine:
    def __init__(
        self,
        model_path: str,
        *,
        device: str,
        dtype: torch.dtype,
        max_num_seqs: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        seed: int,
        resume_kv: str = "keep",
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        try:
            self.resume_kv = ResumeKV(resume_kv)
        except ValueError:
            raise ValueError(f"rollout.resume_kv={resume_kv!r}: use keep or recompute") from None
        self.device = torch.device(device)
        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        # Chosen once: the keyword this transformers version's forward takes the KV cache by.
        self._cache_keyword = cache_keyword(self.model)
        self.max_num_seqs = max_num_seqs
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        # A response ends at the first of these (every EOS the model names; a list for many).
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.pad_token_id = pad_token_id
        self.decode = decode  # token ids -> text, for requests with stop_strings
        self.seed = seed
        self.version = 0
        self._waiting: list[Request] = []
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self._next_input = torch.zeros(0, dtype=torch.long, device=self.device)
        # Set when the weights changed under in-flight rows and resume_kv=recompute.
        self._stale_cache = False
        self.generated_tokens = 0
        self.recomputed_tokens = 0  # tokens prefilled again after a weight change

    # ------------------------------------------------------------------ requests

    def add(self, request: Request) -> None:
        if request.n > self.max_num_seqs:
            raise ValueError(
                f"a request of {request.n} samples exceeds rollout.max_num_seqs={self.max_num_seqs}"
            )
        if request.max_new_tokens is not None and request.max_new_tokens < 1:
            raise ValueError(f"request {request.request_id}: max_new_tokens={request.max_new_tokens} < 1")
        if request.stop_strings and self.decode is None:
            raise ValueError("a request with stop_strings needs an engine built with decode=")
        self._waiting.append(request)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        return sum(r.n for r in self._waiting)

    def has_work(self) -> bool:
        return bool(self._rows or self._waiting)

    def free_slots(self) -> int:
        return self.max_num_seqs - len(self._rows) - self.num_waiting

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self) -> list[Sample]:
        """Rebuild stale caches (resume_kv=recompute after a weight change), admit waiting
        requests into free rows (their prefill samples their first token), then one decode
        step for every row. Returns the samples that finished."""
        if self._stale_cache:
            self._recompute()
        finished: list[Sample] = []
        if self._admit():
            finished += self._retire()  # a first token may already be EOS
        if self._rows:
            self._decode()
            finished += self._retire()
        return finished

    def _admit(self) -> int:
        """Prefill waiting requests that fit; merge them at the end of the batch."""
        take: list[Request] = []
        free = self.max_num_seqs - len(self._rows)
        while self._waiting and self._waiting[0].n <= free:
            request = self._waiting.pop(0)
            take.append(request)
            free -= request.n
        if not take:
            return 0
        cache, mask, last_logits = self._prefill([r.prompt_ids for r in take])
        # One prefill per prompt, then repeat its cache row for each of the n samples.
        repeat = torch.tensor([r.n for r in take], device=self.device)
        index = torch.repeat_interleave(torch.arange(len(take), device=self.device), repeat)
        _select_rows(cache, index)
        logits = last_logits.index_select(0, index)
        new_rows = [
            _Row(
                Sample(r.request_id, k),
                key,
                r.prompt_ids,
                min(r.max_new_tokens or self.max_new_tokens, self.max_new_tokens),
                len(r.prompt_ids),
                r.step,
                r.stop_strings,
                max((len(x) for x in r.stop_strings), default=0) + 2,
            )
            for r in take
            for k, key in zip(
                range(r.index, r.index + r.n),
                sample_keys(self.seed, np.full(r.n, r.seq), np.arange(r.index, r.index + r.n)),
            )
        ]
        tokens = self._sample_into(new_rows, logits)
        self._merge(cache, mask.index_select(0, index), tokens, new_rows)
        return len(new_rows)

    def _prefill(self, seqs: list[list[int]]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One left-padded forward pass over ``seqs`` with the current weights.

        Returns (cache, attention mask [B, T], logits at the last position [B, V])."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            **{self._cache_keyword: cache},
            use_cache=True,
            logits_to_keep=1,  # [B, 1, V]: never materialise logits for every position
        )
        return cache, mask, out.logits[:, -1]

    def _recompute(self) -> None:
        """Replace the cache of every in-flight row by one the current weights wrote.

        The cache holds prompt + generated tokens but the last (the next decode input), so
        exactly that is prefilled again; the logits are not needed and nothing is sampled
        here. Samples keep their tokens, logprobs and versions, so the next decode step
        samples the same step index with the same key as it would have under keep."""
        self._stale_cache = False
        if not self._rows:
            return
        seqs = [row.prompt_ids + row.sample.token_ids[:-1] for row in self._rows]
        self._cache, self._mask, _ = self._prefill(seqs)
        for row, seq in zip(self._rows, seqs):
            row.length = len(seq)
        self.recomputed_tokens += sum(len(s) for s in seqs)

    def _decode(self) -> None:
        """Feed every row its last sampled token; sample the next one."""
        lengths = torch.tensor([r.length for r in self._rows], device=self.device)
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        out = self.model(
            input_ids=self._next_input.unsqueeze(-1),
            attention_mask=self._mask,
            position_ids=lengths.unsqueeze(-1),
            **{self._cache_keyword: self._cache},
            use_cache=True,
        )
        for row in self._rows:
            row.length += 1
        self._next_input = self._sample_into(self._rows, out.logits[:, -1])

    def _sample_into(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        if not rows:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        keys = np.array([r.key for r in rows], dtype=np.uint64)
        steps = np.array([r.step + len(r.sample.token_ids) for r in rows])
        tokens, logprobs = sample(logits, keys, steps, temperature=self.temperature, top_p=self.top_p)
        for row, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist()):
            row.sample.token_ids.append(token)
            row.sample.logprobs.append(logprob)
            row.sample.versions.append(self.version)
        self.generated_tokens += len(rows)
        return tokens

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor, rows: list[_Row]) -> None:
        if self._cache is None or not self._rows:
            self._cache, self._mask, self._next_input, self._rows = cache, mask, tokens, rows
            return
        width = max(self._mask.shape[1], mask.shape[1])
        old_layers: Any = self._cache.layers
        new_layers: Any = cache.layers
        for old, new in zip(old_layers, new_layers):
            old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)])
            old.values = torch.cat([_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)])
        self._mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)])
        self._next_input = torch.cat([self._next_input, tokens])
        self._rows += rows

    def _retire(self) -> list[Sample]:
        """Remove finished rows from the batch and trim all-padding cache columns."""
        done = []
        keep = []
        for i, row in enumerate(self._rows):
            s = row.sample
            if s.token_ids and s.token_ids[-1] in self.stop_token_ids:
                s.finish_reason = "stop"
            elif row.stop_strings and self._hit_stop_string(row):
                s.finish_reason = "stop_string"
            elif len(s.token_ids) >= row.max_new_tokens:
                s.finish_reason = "length"
            else:
                keep.append(i)
                continue
            done.append(s)
        if not done:
            return []
        if not keep:
            self._rows, self._cache = [], None
            self._mask = self._mask[:0, :0]
            self._next_input = self._next_input[:0]
            return done
        index = torch.tensor(keep, device=self.device)
        assert self._cache is not None
        _select_rows(self._cache, index)
        self._mask = self._mask.index_select(0, index)
        self._next_input = self._next_input.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]
        # Columns that are padding in every remaining row carry nothing: drop them.
        first = int((self._mask.sum(0) > 0).nonzero()[0])
        if first:
            self._mask = self._mask[:, first:]
            layers: Any = self._cache.layers
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        return done

    def _hit_stop_string(self, row: _Row) -> bool:
        assert self.decode is not None
        tail = self.decode(row.sample.token_ids[-row.stop_window :])
        return any(stop in tail for stop in row.stop_strings)

    # ------------------------------------------------------------------ weights

    # Every forward reads the modules' parameters afresh (no compiled graphs, no fused copies),
    # so the weight receiver may swap new weights in by rebinding ``.data``.
    weights_rebindable = True

    def parameters(self) -> dict[str, torch.Tensor]:
        """The engine's parameters by name, for the weight receiver to fill or rebind."""
        return dict(self.model.named_parameters())

    def set_version(self, version: int) -> None:
        """Tokens sampled from now on carry ``version``. Call after the new weights were
        copied into ``parameters()``. With resume_kv=recompute and rows in flight, their
        caches are rebuilt at the start of the next step (once, however many updates
        arrive before it)."""
        if version != self.version and self._rows and self.resume_kv is ResumeKV.RECOMPUTE:
            self._stale_cache = True
        self.version = version

    def close(self) -> None:
        self._rows, self._waiting, self._cache = [], [], None
        self._stale_cache = False


def cache_keyword(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache by. transformers 5.x renamed
    ``past_key_values`` to ``cache`` (the old name warns and is removed in 5.40); versions
    before the rename know only ``past_key_values``. The decorators on ``forward`` keep its
    signature (``functools.wraps``), so the parameter list names the one to use."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _select_rows(cache: DynamicCache, index: torch.Tensor) -> None:
    layers: Any = cache.layers
    for layer in layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
