"""The torch engine against a teacher-forced forward pass of the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from actors.sampling import sample, sampling_logprobs
from actors.torch_engine import Request, Sample, TorchEngine


def _engine(path: Path, max_num_seqs: int = 12) -> TorchEngine:
    return TorchEngine(
        str(path),
        device="cpu",
        dtype=torch.float32,
        max_num_seqs=max_num_seqs,
        max_new_tokens=10,
        temperature=1.0,
        top_p=1.0,
        stop_token_ids=[1],
        pad_token_id=0,
        seed=3,
    )


def _run(engine: TorchEngine, requests: list[Request]) -> dict[tuple[int, int], Sample]:
    for r in requests:
        engine.add(r)
    done = {}
    while engine.has_work():
        for s in engine.step():
            done[(s.request_id, s.index)] = s
    return done


def test_logprobs_match_teacher_forcing_under_continuous_batching(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, max_num_seqs=8)  # fewer slots than samples: refills happen
    rng = np.random.default_rng(0)
    requests = [Request(i, [int(t) for t in rng.integers(40, 60, size=2 + i)], 4, i) for i in range(5)]
    done = _run(engine, requests)
    assert len(done) == 20
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for (rid, _), s in done.items():
        prompt = requests[rid].prompt_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + s.token_ids])).logits[0]
        ref = torch.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(
            -1, torch.tensor(s.token_ids)[:, None]
        )
        assert np.allclose(ref[:, 0].numpy(), s.logprobs, atol=1e-5)
        assert s.versions == [0] * len(s.token_ids)
        assert s.finish_reason == ("stop" if s.token_ids[-1] == 1 else "length")


def test_a_sample_does_not_depend_on_its_batch(tiny_model_dir: Path) -> None:
    requests = [Request(i, [50 + i, 46, 51], 3, 100 + i) for i in range(4)]
    together = _run(_engine(tiny_model_dir), requests)
    alone = _run(_engine(tiny_model_dir), [requests[2]])
    for k in range(3):
        assert together[(2, k)].token_ids == alone[(2, k)].token_ids


def test_sampling_by_hand() -> None:
    # Two tokens with p = 0.25 / 0.75: a uniform below 0.25 picks token 0.
    logits = torch.log(torch.tensor([[0.25, 0.75]]))
    lp = sampling_logprobs(logits, temperature=1.0, top_p=1.0)
    assert torch.allclose(lp.exp(), torch.tensor([[0.25, 0.75]]))
    # Top-p 0.5 keeps only the 0.75 token (mass before it is 0 < 0.5; before token 0 it is 0.75).
    kept = sampling_logprobs(logits, temperature=1.0, top_p=0.5)
    assert kept[0, 0] == float("-inf") and kept[0, 1] == 0.0
    tokens, chosen = sample(logits, np.array([1], dtype=np.uint64), np.array([0]), temperature=1.0, top_p=0.5)
    assert tokens.item() == 1 and chosen.item() == 0.0
    # Temperature 2 flattens: p ∝ sqrt(p) -> 0.5/(0.5+0.866) = 0.366.
    flat = sampling_logprobs(logits, temperature=2.0, top_p=1.0).exp()
    assert abs(flat[0, 0].item() - 0.5 / (0.5 + 0.75**0.5)) < 1e-6


def test_a_request_can_cap_its_own_length(tiny_model_dir: Path) -> None:
    engine = TorchEngine(
        str(tiny_model_dir),
        device="cpu",
        dtype=torch.float32,
        max_num_seqs=4,
        max_new_tokens=6,
        temperature=1.0,
        top_p=1.0,
        stop_token_ids=[],  # no token ends a response: lengths are exactly the caps
        pad_token_id=0,
        seed=3,
    )
    done = _run(
        engine, [Request(0, [50, 51], 2, 0, max_new_tokens=2), Request(1, [52], 2, 1, max_new_tokens=99)]
    )
    # The short request leaves after its 2 tokens; the other stops at the engine's cap of 6.
    assert {k: len(s.token_ids) for k, s in done.items()} == {(0, 0): 2, (0, 1): 2, (1, 0): 6, (1, 1): 6}
    assert all(s.finish_reason == "length" for s in done.values())
