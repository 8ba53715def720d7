"""One learner step by hand (learners/trainer.py): loss, gradient, update and metrics.

The model is built for hand computation: a 3-token vocabulary, 2-d embeddings and an LM head,
nothing in between, so the logits at a position depend only on the token there:
``z(x) = W e_x``. With behaviour logprobs equal to the current ones (sync mode) every ratio and
importance weight is 1, and the DAPO loss is ``-(1/T) sum_t A_i``; its gradient is
``-(1/T) sum_t A_i * d log softmax(z)[y] / d theta``, with
``d log softmax(W e)[y] / dW = (onehot(y) - softmax(W e)) e^T`` and ``W^T (onehot(y) - softmax)``
for the embedding. Those are computed here with numpy, not autograd.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from async_rl.bench.capacity import bare_step
from async_rl.schema import FinishReason, Response, TrajectoryGroup
from learners.advantages import make_estimator
from learners.trainer import StepParams, StepTimer, make_batch, train_step

E = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # embedding of tokens 0, 1, 2
W = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # LM head: z(x) = W e_x


class _HandLM(torch.nn.Module):
    """Embedding then LM head, as a Hugging Face causal LM is called (forward(input_ids=...)
    returning .logits, get_output_embeddings(), .config)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(3, 2)
        self.lm_head = torch.nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor(E))
            self.lm_head.weight.copy_(torch.tensor(W))
        self.config = SimpleNamespace(vocab_size=3)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        return SimpleNamespace(logits=self.lm_head(self.embed(input_ids)))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - np.log(np.exp(z).sum())


# One prompt [0], two responses: [1] (reward 1) and [2, 0] (reward 0). Each target y is
# predicted at the position of the token before it, x.
_TOKENS = [(0, 1, 0), (0, 2, 1), (2, 0, 1)]  # (x, y, response index)


def _hand_batch() -> Any:
    logprob = {(x, y): _log_softmax(W @ E[x])[y] for x, y, _ in _TOKENS}
    responses = [
        Response(
            token_ids=np.array([1], dtype=np.int32),
            logprobs=np.array([logprob[(0, 1)]], dtype=np.float32),
            versions=np.zeros(1, dtype=np.int32),
            reward=1.0,
            finish_reason=FinishReason.STOP,
        ),
        Response(
            token_ids=np.array([2, 0], dtype=np.int32),
            logprobs=np.array([logprob[(0, 2)], logprob[(2, 0)]], dtype=np.float32),
            versions=np.zeros(2, dtype=np.int32),
            reward=0.0,
            finish_reason=FinishReason.STOP,
        ),
    ]
    group = TrajectoryGroup(0, 0, "test", np.array([0], dtype=np.int32), responses)
    return make_batch([group], pad_id=0, device=torch.device("cpu"))


_PARAMS = StepParams(
    eps_low=0.2,
    eps_high=0.28,
    is_cap=2.0,
    temperature=1.0,
    grad_clip=0.0,
    mini_batches=1,
    max_new_tokens=4,
    overlong_buffer=0,
    overlong_penalty=1.0,
)


def test_one_step_by_hand() -> None:
    logprob = {(x, y): _log_softmax(W @ E[x])[y] for x, y, _ in _TOKENS}
    # -log(e + 2) for token 1 or 2 after token 0; 1 - log(2e + 1) for token 0 after token 2.
    assert logprob[(0, 1)] == pytest.approx(-np.log(np.e + 2))
    assert logprob[(2, 0)] == pytest.approx(1 - np.log(2 * np.e + 1))
    batch = _hand_batch()

    # Group-normalised advantages: mean 0.5, sample std sqrt(0.5).
    advantage = np.array([0.5, -0.5]) / (np.sqrt(0.5) + 1e-6)
    tokens = 3
    loss = -(advantage[0] * 1 + advantage[1] * 2) / tokens  # every ratio and weight is 1
    grad_w, grad_e = np.zeros_like(W), np.zeros_like(E)
    for x, y, i in _TOKENS:
        p = np.exp(_log_softmax(W @ E[x]))
        residual = np.eye(3)[y] - p
        grad_w += -advantage[i] / tokens * np.outer(residual, E[x])
        grad_e[x] += -advantage[i] / tokens * (W.T @ residual)

    model = _HandLM().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient
    timer = StepTimer(torch.device("cpu"))
    metrics = train_step(
        model,
        optimizer,
        batch,
        _PARAMS,
        version=0,
        estimator=make_estimator("group", group_size=2),
        timer=timer,
    )
    np.testing.assert_allclose(model.lm_head.weight.detach().numpy(), W - grad_w, atol=1e-6)
    np.testing.assert_allclose(model.embed.weight.detach().numpy(), E - grad_e, atol=1e-6)
    assert metrics["loss/loss"] == pytest.approx(loss, abs=1e-6)
    assert loss == pytest.approx(0.2357, abs=1e-4)
    assert metrics["loss/ratio_mean"] == pytest.approx(1.0)
    assert metrics["loss/is_weight_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["loss/clip_frac_low"] == metrics["loss/clip_frac_high"] == 0.0
    assert metrics["reward/advantage_abs_mean"] == pytest.approx(np.abs(advantage).mean(), rel=1e-6)
    assert metrics["train/tokens"] == tokens
    assert metrics["rollout/mismatch_kl"] == pytest.approx(0.0, abs=1e-7)
    grad_norm = np.sqrt((grad_w**2).sum() + (grad_e**2).sum())
    assert metrics["loss/grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
    # The timer saw every phase of a one-mini-batch step, and timing changed nothing above.
    assert set(timer.seconds) == {
        "advantages",
        "proximal",
        "logprobs",
        "loss",
        "backward",
        "optimizer",
        "metrics",
    }
    assert all(t >= 0.0 for t in timer.seconds.values())
    assert set(timer.metrics()) == {f"time/step_{name}_s" for name in timer.seconds}


def test_a_two_turn_step_by_hand_trains_only_the_sampled_tokens() -> None:
    """Response 2 is a two-turn episode: it samples 2, the environment appends 1 (an
    observation: logprob 0, version -1, not sampled), then it samples 0 at version 1. Only the
    three sampled tokens enter the loss, the gradient, the importance weights and the mismatch
    metric; the observation is context (it is the position that predicts the last token)."""
    sampled_pairs = [(0, 1, 0), (0, 2, 1), (1, 0, 1)]  # (x, y, response): 0 now follows 1
    logprob = {(x, y): _log_softmax(W @ E[x])[y] for x, y, _ in sampled_pairs}
    responses = [
        Response(
            token_ids=np.array([1], dtype=np.int32),
            logprobs=np.array([logprob[(0, 1)]], dtype=np.float32),
            versions=np.ones(1, dtype=np.int32),
            reward=1.0,
            finish_reason=FinishReason.STOP,
        ),
        Response(
            token_ids=np.array([2, 1, 0], dtype=np.int32),
            logprobs=np.array([logprob[(0, 2)], 0.0, logprob[(1, 0)]], dtype=np.float32),
            versions=np.array([1, -1, 1], dtype=np.int32),
            reward=0.0,
            finish_reason=FinishReason.STOP,
            sampled=np.array([True, False, True]),
            turns=2,
        ),
    ]
    batch = make_batch(
        [TrajectoryGroup(0, 0, "test", np.array([0], dtype=np.int32), responses)],
        pad_id=0,
        device=torch.device("cpu"),
    )
    assert batch.mask.tolist() == [[True, False, False], [True, False, True]]
    assert batch.targets[1].tolist() == [2, 1, 0] and batch.index[1].tolist() == [0, 1, 2]

    advantage = np.array([0.5, -0.5]) / (np.sqrt(0.5) + 1e-6)
    tokens = 3
    loss = -(advantage[0] * 1 + advantage[1] * 2) / tokens
    grad_w, grad_e = np.zeros_like(W), np.zeros_like(E)
    for x, y, i in sampled_pairs:
        residual = np.eye(3)[y] - np.exp(_log_softmax(W @ E[x]))
        grad_w += -advantage[i] / tokens * np.outer(residual, E[x])
        grad_e[x] += -advantage[i] / tokens * (W.T @ residual)

    model = _HandLM().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = train_step(
        model, optimizer, batch, _PARAMS, version=1, estimator=make_estimator("group", group_size=2)
    )
    np.testing.assert_allclose(model.lm_head.weight.detach().numpy(), W - grad_w, atol=1e-6)
    np.testing.assert_allclose(model.embed.weight.detach().numpy(), E - grad_e, atol=1e-6)
    assert metrics["loss/loss"] == pytest.approx(loss, abs=1e-6)
    assert metrics["train/tokens"] == tokens
    # Unmasked, the observation's logprob 0 against the learner's 1 - log(2e + 1) = -0.86 would
    # make an importance weight of 0.42 there and a mismatch k3 of 0.28 nats.
    assert metrics["loss/is_weight_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["rollout/mismatch_kl"] == pytest.approx(0.0, abs=1e-7)


def test_bare_step_is_plain_ascent_on_the_mean_target_logprob() -> None:
    """The bench's reference step (``bare_step``): backward of the mean logprob of the
    targets, one optimizer step, nothing else; with SGD at lr 1 the update is minus the
    gradient ``(1/T) sum_t (onehot(y) - softmax(W e_x)) e_x^T``, computed by hand."""
    tokens = 3
    grad_w, grad_e = np.zeros_like(W), np.zeros_like(E)
    for x, y, _ in _TOKENS:
        residual = np.eye(3)[y] - np.exp(_log_softmax(W @ E[x]))
        grad_w += np.outer(residual, E[x]) / tokens
        grad_e[x] += W.T @ residual / tokens
    model = _HandLM().double()
    bare_step(model, _hand_batch(), _PARAMS, torch.optim.SGD(model.parameters(), lr=1.0))
    np.testing.assert_allclose(model.lm_head.weight.detach().numpy(), W - grad_w, atol=1e-6)
    np.testing.assert_allclose(model.embed.weight.detach().numpy(), E - grad_e, atol=1e-6)
