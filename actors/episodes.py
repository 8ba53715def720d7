"""The episodes of one lease: G responses, each a sequence of policy turns and observations.

``first_request()`` asks the engine for the G first turns (one request, one shared prefill).
``collect(sample)`` ends a turn of one episode (``async_rl.env.EpisodeRun``: cut, environment,
observation) and returns the request for its next turn: prompt + the episode so far,
prefilled anew, with the rest of the token budget, on the episode's own random stream
(sample index k, step = tokens so far). Turns of different episodes interleave in the engine
like any requests, and a weight update inside a turn is handled by the engine as for a
single-turn response. ``group()`` builds the wire group once every episode is over.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actors.torch_engine import Request, Sample
from async_rl.env import Environment, EpisodeRun
from async_rl.schema import Lease, Response, TrajectoryGroup


class LeaseEpisodes:
    def __init__(
        self,
        lease: Lease,
        prompt_ids: list[int],
        *,
        env: Environment,
        tokenizer: Any,
        stop_ids: frozenset[int],
        group_size: int,
        max_new_tokens: int,
    ) -> None:
        self.lease = lease
        self.prompt_ids = prompt_ids
        self.env = env
        self.runs = [
            EpisodeRun(
                env,
                lease.question,
                lease.answer,
                tokenizer=tokenizer,
                stop_ids=stop_ids,
                max_new_tokens=max_new_tokens,
            )
            for _ in range(group_size)
        ]

    @property
    def done(self) -> bool:
        return all(run.over for run in self.runs)

    def first_request(self) -> Request:
        return Request(
            self.lease.lease_id,
            self.prompt_ids,
            len(self.runs),
            self.lease.seq,
            stop_strings=self.env.stop_strings,
        )

    def collect(self, sample: Sample) -> Request | None:
        """End one turn of episode ``sample.index``; the next turn's request, if any."""
        run = self.runs[sample.index]
        if not run.end_turn(sample.token_ids, sample.logprobs, sample.versions, sample.finish_reason):
            return None
        return Request(
            self.lease.lease_id,
            self.prompt_ids + run.token_ids,
            1,
            self.lease.seq,
            max_new_tokens=run.budget_left,
            stop_strings=self.env.stop_strings,
            index=sample.index,
            step=len(run.token_ids),
        )

    def group(self, actor_id: str) -> TrajectoryGroup:
        responses = []
        for run in self.runs:
            assert run.reward is not None
            responses.append(
                Response(
                    token_ids=np.asarray(run.token_ids, dtype=np.int32),
                    logprobs=np.asarray(run.logprobs, dtype=np.float32),
                    versions=np.asarray(run.versions, dtype=np.int32),
                    reward=run.reward,
                    finish_reason=run.finish,
                    sampled=np.asarray(run.sampled, dtype=bool),
                    turns=run.turns,
                    tool_calls=run.state.tool_calls,
                    tool_errors=run.state.tool_errors,
                )
            )
        return TrajectoryGroup(
            lease_id=self.lease.lease_id,
            prompt_id=self.lease.prompt_id,
            actor_id=actor_id,
            prompt_token_ids=np.asarray(self.prompt_ids, dtype=np.int32),
            responses=responses,
        )
