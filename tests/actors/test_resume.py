"""Partial rollout resumption in the torch engine: new weights arrive mid-sequence.

Every run below drives the same five requests through a real tiny Hugging Face model and,
after ``INTERRUPT_AFTER`` steps, copies perturbed weights into ``engine.parameters()`` in
place and calls ``set_version(1)``, exactly what the actor does after a weight broadcast.
The references are independent forward passes of fresh models:

* tokens sampled before the update: the uninterrupted run with the old weights, bit for bit;
* ``resume_kv=recompute``: one full forward of prompt + response under the new weights;
* ``resume_kv=keep``: the old weights' cache of prompt + the pre-update prefix, continued by
  the new weights (the cache the engine really has).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from actors.sampling import sample_keys, sampling_logprobs, uniforms
from actors.torch_engine import Request, Sample, TorchEngine, cache_keyword

SEED = 3
INTERRUPT_AFTER = 4  # engine steps with the old weights
MAX_NEW_TOKENS = 12
# max_num_seqs 6 with n=2: r0..r2 start at step 1; r0 stops at 3 tokens (step 2), so r3 is
# admitted at step 3 and is mid-sequence at the update; r4 waits and starts on new weights.
REQUESTS = [
    Request(0, [50, 46, 51], 2, seq=10, max_new_tokens=3),
    Request(1, [40, 41, 42, 43, 44], 2, seq=11),
    Request(2, [60, 61], 2, seq=12),
    Request(3, [52, 53, 54, 55, 56, 57], 2, seq=13),
    Request(4, [45, 47, 49, 58], 2, seq=14),
]
# Tokens each request's samples drew with the old weights, by hand from the schedule above:
# a request admitted at step s holds INTERRUPT_AFTER - s + 2 tokens after step INTERRUPT_AFTER
# (its prefill samples one, each decode step one more).
OLD_TOKENS = {0: 3, 1: 5, 2: 5, 3: 3, 4: 0}

Key = tuple[int, int]


def _engine(path: Path, resume_kv: str = "keep") -> TorchEngine:
    return TorchEngine(
        str(path),
        device="cpu",
        dtype=torch.float32,
        max_num_seqs=6,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        stop_token_ids=[1],
        pad_token_id=0,
        seed=SEED,
        resume_kv=resume_kv,
    )


def _new_weights(path: Path) -> dict[str, torch.Tensor]:
    """The old weights plus seeded noise big enough to move every next-token distribution."""
    model = AutoModelForCausalLM.from_pretrained(path)
    gen = torch.Generator().manual_seed(1)
    return {
        name: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()
    }


def _run(engine: TorchEngine, requests: list[Request], new_weights: dict[str, torch.Tensor] | None) -> Any:
    for r in requests:
        engine.add(r)
    done: dict[Key, Sample] = {}
    steps = 0
    while engine.has_work():
        if steps == INTERRUPT_AFTER and new_weights is not None:
            with torch.no_grad():  # what weight_sync.broadcast.receive does
                for name, p in engine.parameters().items():
                    p.copy_(new_weights[name])
            engine.set_version(1)
        for s in engine.step():
            done[(s.request_id, s.index)] = s
        steps += 1
    return done


def _model(path: Path, weights: dict[str, torch.Tensor] | None = None) -> Any:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if weights is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
    return model


def _token_logprobs(logits: torch.Tensor, tokens: list[int]) -> np.ndarray:
    """logits [T, V] predicting ``tokens`` [T] -> their logprobs [T]."""
    lp = sampling_logprobs(logits, temperature=1.0, top_p=1.0)
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0].numpy()


@torch.no_grad()
def _full_forward(model: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), V] that predict each response token from prompt + prefix."""
    logits = model(torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1 : -1]


@torch.no_grad()
def _old_cache_forward(old: Any, new: Any, prompt: list[int], tokens: list[int], k: int) -> torch.Tensor:
    """Logits [len(tokens) - k, V] for tokens k.. when the old weights wrote the cache of
    prompt + tokens[:k-1] and the new ones process everything from tokens[k-1] on."""
    cache = DynamicCache(config=old.config)
    keyword = cache_keyword(old)  # past_key_values before transformers renamed it to cache
    old(torch.tensor([prompt + tokens[: k - 1]]), **{keyword: cache}, use_cache=True)
    start = len(prompt) + k - 1
    positions = torch.arange(start, len(prompt) + len(tokens) - 1)[None]
    return new(
        torch.tensor([tokens[k - 1 : -1]]), position_ids=positions, **{keyword: cache}, use_cache=True
    ).logits[0]


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path) -> dict[str, Any]:
    new_weights = _new_weights(tiny_model_dir)
    keep_engine = _engine(tiny_model_dir, "keep")
    recompute_engine = _engine(tiny_model_dir, "recompute")
    out = {
        "old": _run(_engine(tiny_model_dir), REQUESTS, None),
        "keep": _run(keep_engine, REQUESTS, new_weights),
        "recompute": _run(recompute_engine, REQUESTS, new_weights),
        "keep_recomputed": keep_engine.recomputed_tokens,
        "recompute_recomputed": recompute_engine.recomputed_tokens,
        "old_model": _model(tiny_model_dir),
        "new_model": _model(tiny_model_dir, new_weights),
    }
    return out


def _old_count(s: Sample) -> int:
    return min(OLD_TOKENS[s.request_id], len(s.token_ids))


@pytest.mark.parametrize("mode", ["keep", "recompute"])
def test_versions_and_pre_update_logprobs_survive_the_interruption(runs: dict[str, Any], mode: str) -> None:
    done, old = runs[mode], runs["old"]
    assert sorted(done) == [(r.request_id, k) for r in REQUESTS for k in range(r.n)]  # nothing lost
    for key, s in done.items():
        k = _old_count(s)
        assert s.versions == [0] * k + [1] * (len(s.token_ids) - k), key
        # Sampled before the update: the very numbers the old weights' run recorded.
        assert s.token_ids[:k] == old[key].token_ids[:k], key
        assert s.logprobs[:k] == old[key].logprobs[:k], key  # bit for bit
        expected = 3 if s.request_id == 0 else MAX_NEW_TOKENS
        assert s.finish_reason == ("stop" if s.token_ids[-1] == 1 else "length")
        assert len(s.token_ids) == expected or s.token_ids[-1] == 1
    # The in-flight rows really were interrupted (no EOS before the update with this seed).
    assert all(_old_count(s) == OLD_TOKENS[s.request_id] for s in done.values())
    # And the update changed what they sampled afterwards.
    assert any(done[key].token_ids != old[key].token_ids for key in done if key[0] in (1, 2, 3))


def test_recompute_continues_from_a_cache_written_by_the_new_weights(runs: dict[str, Any]) -> None:
    old_model, new_model = runs["old_model"], runs["new_model"]
    prompts = {r.request_id: r.prompt_ids for r in REQUESTS}
    for key, s in runs["recompute"].items():
        k, prompt = _old_count(s), prompts[key[0]]
        if k == len(s.token_ids):
            continue
        ref = _token_logprobs(_full_forward(new_model, prompt, s.token_ids)[k:], s.token_ids[k:])
        np.testing.assert_allclose(s.logprobs[k:], ref, atol=1e-5, err_msg=str(key))
        if k:
            # Not what the old cache would give: the first new token tells them apart.
            stale = _token_logprobs(
                _old_cache_forward(old_model, new_model, prompt, s.token_ids, k), s.token_ids[k:]
            )
            assert abs(s.logprobs[k] - stale[0]) > 1e-3, key


def test_keep_continues_on_the_old_cache(runs: dict[str, Any]) -> None:
    old_model, new_model = runs["old_model"], runs["new_model"]
    prompts = {r.request_id: r.prompt_ids for r in REQUESTS}
    for key, s in runs["keep"].items():
        k, prompt = _old_count(s), prompts[key[0]]
        if k == len(s.token_ids):
            continue
        if k == 0:  # admitted after the update: a plain new-weights sequence
            logits = _full_forward(new_model, prompt, s.token_ids)
        else:
            logits = _old_cache_forward(old_model, new_model, prompt, s.token_ids, k)
        np.testing.assert_allclose(s.logprobs[k:], _token_logprobs(logits, s.token_ids[k:]), atol=1e-5)


def test_recompute_and_keep_differ_after_the_update_and_only_there(runs: dict[str, Any]) -> None:
    keep, recompute = runs["keep"], runs["recompute"]
    for key, s in recompute.items():
        k = _old_count(s)
        assert s.logprobs[:k] == keep[key].logprobs[:k]
        if 0 < k < len(s.token_ids):
            # Same key and step, so the same uniform; the distributions differ.
            assert abs(s.logprobs[k] - keep[key].logprobs[k]) > 1e-3, key
        if k == 0:  # started after the update: both modes are the same computation
            assert s.token_ids == keep[key].token_ids
            np.testing.assert_allclose(s.logprobs, keep[key].logprobs, atol=1e-6)


def test_recompute_prefills_exactly_the_in_flight_prefixes(runs: dict[str, Any]) -> None:
    # In flight at the update: r1, r2 (5 tokens), r3 (3 tokens), 2 samples each; the cache
    # holds prompt + all tokens but the last: 2*(5+4) + 2*(2+4) + 2*(6+2) = 46.
    assert runs["recompute_recomputed"] == 46
    assert runs["keep_recomputed"] == 0


def test_post_update_tokens_are_the_counter_based_draws(runs: dict[str, Any]) -> None:
    """By hand: token t of sample (seq, i) is the inverse-CDF pick of uniform(seed, seq, i, t)
    under the reference distribution, whatever happened to the batch or the weights."""
    new_model = runs["new_model"]
    by_id = {r.request_id: r for r in REQUESTS}
    for (rid, index), s in runs["recompute"].items():
        k, request = _old_count(s), by_id[rid]
        if k == len(s.token_ids):
            continue
        probs = sampling_logprobs(_full_forward(new_model, request.prompt_ids, s.token_ids)[k:], 1.0, 1.0)
        cdf = probs.double().exp().cumsum(-1)
        key = sample_keys(SEED, np.array([request.seq]), np.array([index]))
        steps = np.arange(k, len(s.token_ids))
        u = uniforms(np.repeat(key, len(steps)), steps)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0]
        assert picks.tolist() == s.token_ids[k:], (rid, index)


def test_recompute_does_not_depend_on_the_batch(tiny_model_dir: Path, runs: dict[str, Any]) -> None:
    alone = _run(_engine(tiny_model_dir, "recompute"), [REQUESTS[2]], _new_weights(tiny_model_dir))
    for index in range(2):
        assert alone[(2, index)].token_ids == runs["recompute"][(2, index)].token_ids
        np.testing.assert_allclose(
            alone[(2, index)].logprobs, runs["recompute"][(2, index)].logprobs, atol=1e-5
        )


def test_set_version_without_a_change_keeps_the_cache(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, "recompute")
    engine.set_version(0)  # nothing in flight: nothing to rebuild
    engine.add(Request(0, [50, 46], 2, seq=0))
    engine.step()
    engine.set_version(0)  # same version: the weights did not change
    engine.step()
    assert engine.recomputed_tokens == 0
    engine.set_version(1)
    engine.set_version(2)  # two updates between steps: one rebuild
    engine.step()
    # Two rows, prompt 2 + 3 tokens, of which the last is the decode input: 2 * 4.
    assert engine.recomputed_tokens == 8


def test_unknown_resume_kv_names_the_field(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"rollout\.resume_kv='drop'"):
        _engine(tiny_model_dir, "drop")
