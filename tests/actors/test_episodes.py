"""Multi-turn episodes in the torch engine: stop strings, the random stream across turns, and
a weight update inside the second turn, checked by value against teacher forcing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.episodes import LeaseEpisodes
from actors.sampling import sampling_logprobs
from actors.torch_engine import Request, Sample, TorchEngine
from async_rl.config import EnvConfig
from async_rl.env import Done, Environment, Episode, Observe, Turn, register
from async_rl.schema import NOT_SAMPLED, Lease


def _marks(ids: list[int]) -> str:
    """A stand-in detokenizer: token t is "s" when t % 3 == 0, else "."; so the stop string "s"
    ends a turn at the first such token, which the random model samples a third of the time."""
    return "".join("s" if t % 3 == 0 else "." for t in ids)


class _MarksTokenizer:
    eos_token_id = 1

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return _marks([t for t in ids if not (skip_special_tokens and t == 1)])

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [4] * len(text)}  # token 4 reads "."


@register("test-two-turns")
class _TwoTurns(Environment):
    """Answers every first turn with "ok" (2 tokens); the second turn ends the episode."""

    stop_strings = ("s",)

    def start(self, question: str, answer: str) -> Episode:
        return _TwoTurnEpisode()


class _TwoTurnEpisode(Episode):
    def step(self, turn: Turn) -> Observe | Done:
        return Done(1.0) if turn.last else Observe("ok")


def _engine(path: Path, resume_kv: str = "keep") -> TorchEngine:
    return TorchEngine(
        str(path),
        device="cpu",
        dtype=torch.float32,
        max_num_seqs=8,
        max_new_tokens=12,
        temperature=1.0,
        top_p=1.0,
        stop_token_ids=[1],
        pad_token_id=0,
        seed=3,
        resume_kv=resume_kv,
        decode=_marks,
    )


def _run(engine: TorchEngine, requests: list[Request]) -> dict[int, Sample]:
    for r in requests:
        engine.add(r)
    done: dict[int, Sample] = {}
    while engine.has_work():
        for s in engine.step():
            done[s.index] = s
    return done


def test_a_stop_string_ends_the_turn_at_its_first_occurrence(tiny_model_dir: Path) -> None:
    prompt = [5, 6, 7]
    free = _run(_engine(tiny_model_dir), [Request(0, prompt, 6, seq=11)])
    stopped = _run(_engine(tiny_model_dir), [Request(0, prompt, 6, seq=11, stop_strings=("s",))])
    hits = 0
    for k, s in stopped.items():
        first = next((i for i, t in enumerate(free[k].token_ids) if t % 3 == 0), None)
        if first is None:
            assert s.token_ids == free[k].token_ids and s.finish_reason == free[k].finish_reason
        else:
            hits += 1
            assert s.token_ids == free[k].token_ids[: first + 1] and s.finish_reason == "stop_string"
    assert hits >= 3  # most of the 6 samples meet a multiple of 3 within 12 tokens


def test_a_later_turn_continues_the_episodes_random_stream(tiny_model_dir: Path) -> None:
    prompt = [5, 6, 7]
    whole = _run(_engine(tiny_model_dir), [Request(0, prompt, 3, seq=11)])
    k = max(whole, key=lambda i: len(whole[i].token_ids))
    tokens = whole[k].token_ids
    assert len(tokens) > 5
    # Turn 2 of episode k: its context prefilled anew, the stream (seq 11, sample k) from step 4.
    rest = _run(
        _engine(tiny_model_dir),
        [Request(1, prompt + tokens[:4], 1, seq=11, max_new_tokens=12 - 4, index=k, step=4)],
    )
    assert list(rest) == [k]
    assert rest[k].token_ids == tokens[4:]
    np.testing.assert_allclose(rest[k].logprobs, whole[k].logprobs[4:], atol=1e-4)


def _teacher_logprobs(model: torch.nn.Module, ids: list[int], start: int) -> np.ndarray:
    """log pi(ids[j] | ids[:j]) for j >= start, at temperature 1."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    lp = sampling_logprobs(logits[start - 1 : len(ids) - 1], 1.0, 1.0)
    return lp.gather(-1, torch.tensor(ids[start:]).unsqueeze(-1)).squeeze(-1).numpy()


@pytest.mark.parametrize("resume_kv", ["recompute", "keep"])
def test_two_turn_episodes_with_a_weight_update_inside_the_second_turn(
    tiny_model_dir: Path, resume_kv: str
) -> None:
    engine = _engine(tiny_model_dir, resume_kv=resume_kv)
    old = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    prompt = [5, 6, 7]
    lease = Lease(lease_id=9, prompt_id=0, seq=11, question="q", answer="a")
    episodes = LeaseEpisodes(
        lease,
        prompt,
        env=_TwoTurns(EnvConfig(kind="test-two-turns", max_turns=2)),
        tokenizer=_MarksTokenizer(),
        stop_ids=frozenset({1}),
        group_size=4,
        max_new_tokens=12,
    )
    engine.add(episodes.first_request())
    updated = False
    while engine.has_work():
        for sample in engine.step():
            follow = episodes.collect(sample)
            if follow is not None:
                engine.add(follow)
        second_turn_running = any(row.sample.token_ids and row.step > 0 for row in engine._rows)
        if second_turn_running and not updated:
            # New weights arrive while second turns are in flight.
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in engine.parameters().values():
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
            engine.set_version(1)
            updated = True
    assert updated and episodes.done
    new = engine.model
    group = episodes.group("a0")
    spans_update = 0
    for r in group.responses:
        assert r.turns == 2 and r.reward == 1.0
        sampled = r.sampled_mask
        turn1 = int(np.argmin(sampled))  # the observation starts where sampling stops
        assert sampled.tolist() == [True] * turn1 + [False, False] + [True] * (r.length - turn1 - 2)
        assert r.token_ids[turn1 : turn1 + 2].tolist() == [4, 4]  # "ok"
        assert r.versions[~sampled].tolist() == [NOT_SAMPLED] * 2 and r.logprobs[~sampled].tolist() == [0, 0]
        assert (r.versions[:turn1] == 0).all()  # turn 1 ended before the update
        second = r.versions[turn1 + 2 :]
        assert (np.diff(second) >= 0).all() and set(second.tolist()) <= {0, 1}
        spans_update += int(0 in second and 1 in second)
        # Every sampled token's logprob is the sampling policy's own, given the whole context:
        # version 0 under the old weights, version 1 under the new (recompute: the context was
        # prefilled again by the new weights before they sampled). With keep, tokens sampled
        # after the update inside a turn read a cache the old weights wrote: only version 0
        # and turns prefilled after the update match a fresh forward pass.
        ids = prompt + r.token_ids.tolist()
        checks = ((old, 0), (new, 1)) if resume_kv == "recompute" else ((old, 0),)
        for model, version in checks:
            positions = np.flatnonzero(sampled & (r.versions == version))
            if len(positions):
                teacher = _teacher_logprobs(model, ids, len(prompt))[positions]
                np.testing.assert_allclose(r.logprobs[positions], teacher, atol=1e-4)
    assert spans_update >= 1  # at least one second turn has tokens of both versions
