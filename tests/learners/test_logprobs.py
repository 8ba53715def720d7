"""The learner's logprob path and micro-batches (learners/logprobs.py, learners/trainer.py).

* logprobs from the final hidden states, head applied in chunks, equal ``log_softmax`` of the
  model's own logits, values and gradients, at a temperature, for right-padded rows;
* no tensor with a vocabulary-sized last dimension holds more than one chunk of tokens;
* a step cut into micro-batches gives the weights of the same step in one pass (1e-6);
* micro-batch packing by hand; an architecture whose logits the path would get wrong is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from async_rl.schema import FinishReason, Response, TrajectoryGroup
from learners import logprobs as lp
from learners.advantages import make_estimator
from learners.trainer import StepParams, make_batch, micro_batches, token_logprobs, train_step

VOCAB = 259


def _model(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _groups(seed: int, n_groups: int = 4, group_size: int = 4) -> list[TrajectoryGroup]:
    """Prompts of 3..9 tokens, responses of 1..12, rewards with signal in every group."""
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n_groups):
        responses = []
        for j in range(group_size):
            length = int(rng.integers(1, 13))
            responses.append(
                Response(
                    token_ids=rng.integers(3, VOCAB, length).astype(np.int32),
                    logprobs=rng.uniform(-6.0, -5.0, length).astype(np.float32),
                    versions=np.zeros(length, dtype=np.int32),
                    reward=float(j % 2),
                    finish_reason=FinishReason.STOP,
                )
            )
        prompt = rng.integers(3, VOCAB, int(rng.integers(3, 10))).astype(np.int32)
        groups.append(TrajectoryGroup(i, i, "test", prompt, responses))
    return groups


def _reference_logprobs(model: Any, batch: Any, temperature: float) -> torch.Tensor:
    """The plain way: full logits of the padded batch (with its attention mask), log-softmax."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    picked = logits.gather(1, batch.index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    out = torch.log_softmax(picked / temperature, dim=-1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(~batch.mask, 0.0)


def test_pack_micro_batches_by_hand() -> None:
    # Longest first: 8 alone (8 + 5 would be 2 x 8 = 16 > 10); 5 and 3 (2 x 5 = 10); 2 alone (3 x 5).
    assert lp.pack_micro_batches([5, 3, 8, 2], 10) == [[2], [0, 1], [3]]
    assert lp.pack_micro_batches([4, 4, 4], 100) == [[0, 1, 2]]
    assert lp.pack_micro_batches([30, 2], 10) == [[0], [1]]  # too long for the budget: alone


def test_chunked_logprobs_match_full_logits(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 5 * VOCAB)  # chunks of 5 tokens: many of them
    batch = make_batch(_groups(seed=1), pad_id=0, device=torch.device("cpu"))
    rows = slice(0, batch.input_ids.shape[0])
    ours_model, ref_model = _model(tiny_model_dir), _model(tiny_model_dir)
    ours = token_logprobs(ours_model, batch, rows, 0.7)
    reference = _reference_logprobs(ref_model, batch, 0.7)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert float(ours.detach()[batch.mask].abs().min()) > 0  # real values, not the padding zeros

    weights = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(0))
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    for (name, a), (_, b) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


class _VocabTensors(TorchDispatchMode):
    """Records the leading size (numel / vocab) of every new tensor an op makes whose last
    dimension is the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB):
                continue
            # A view of an input (the LM head's weight transposed, [D, vocab]) is no new memory.
            if t.untyped_storage().data_ptr() not in storages:
                self.rows.append(t.numel() // VOCAB)
        return out


def test_no_vocabulary_tensor_beyond_one_chunk(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A learner step (forward, backward, the proximal pass of two mini-batches) never makes a
    [rows, R, vocab] tensor: at most one chunk of tokens has logits at any time."""
    chunk = 4
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", chunk * VOCAB)
    model = _model(tiny_model_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = make_batch(_groups(seed=2), pad_id=0, device=torch.device("cpu"))
    tokens = int(batch.mask.sum())
    with _VocabTensors() as seen:
        train_step(model, optimizer, batch, _params(mini_batches=2), version=0, estimator=_group())
    assert seen.rows, "the step made no logits at all?"
    # The embedding matrix and its gradient are [vocab, D]: their last dimension is D, not vocab.
    assert max(seen.rows) <= chunk < tokens, (max(seen.rows), tokens)


def _params(*, mini_batches: int = 1, micro_batch_tokens: int = 4096, grad_clip: float = 1.0) -> StepParams:
    return StepParams(
        eps_low=0.2,
        eps_high=0.28,
        is_cap=2.0,
        temperature=1.0,
        grad_clip=grad_clip,
        mini_batches=mini_batches,
        max_new_tokens=12,
        overlong_buffer=0,
        overlong_penalty=1.0,
        micro_batch_tokens=micro_batch_tokens,
    )


def _group() -> Any:
    return make_estimator("group", group_size=4)


@pytest.mark.parametrize(("optimizer", "mini_batches"), [("adamw", 1), ("adamw", 2), ("sgd", 1), ("sgd", 2)])
def test_micro_batched_step_equals_one_pass(tiny_model_dir: Path, optimizer: str, mini_batches: int) -> None:
    """The same step with every mini-batch in one pass and cut into micro-batches of at most 24
    padded tokens (two or three rows): weights equal to 1e-6 after the optimizer step, and the
    step's metrics too. SGD at rate 1 (float32) moves each weight by its gradient, so any error
    of the gradient's scale shows. AdamW runs in float64: its first step is
    ``lr * g / (|g| + 1e-8)``, which turns float32 rounding of a gradient near 1e-9 (the two
    ways add the micro-batches in another order) into differences of 1e-5."""
    dtype = torch.float64 if optimizer == "adamw" else torch.float32
    batch = make_batch(_groups(seed=3), pad_id=0, device=torch.device("cpu"))
    budget = 24
    parts = micro_batches(batch, slice(0, batch.input_ids.shape[0]), budget)
    assert len(parts) >= 6, "the budget must really cut the batch"
    results = []
    for tokens in (100_000, budget):
        model = _model(tiny_model_dir, dtype)
        opt: torch.optim.Optimizer = (
            torch.optim.AdamW(model.parameters(), lr=1e-3)
            if optimizer == "adamw"
            else torch.optim.SGD(model.parameters(), lr=1.0)
        )
        metrics = train_step(
            model,
            opt,
            batch,
            _params(mini_batches=mini_batches, micro_batch_tokens=tokens, grad_clip=0.0),
            version=0,
            estimator=_group(),
        )
        results.append((metrics, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (whole_metrics, whole), (micro_metrics, micro) = results
    start = {n: p.detach() for n, p in _model(tiny_model_dir, dtype).named_parameters()}
    assert max(float((whole[n] - start[n]).abs().max()) for n in whole) > 1e-4, "the step did nothing"
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=0, atol=1e-6, msg=name)
    assert micro_metrics.keys() == whole_metrics.keys()
    for key, value in whole_metrics.items():
        assert micro_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_check_logprobs_accepts_a_plain_model_and_refuses_an_unknown_transform(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    assert lp.check_logprobs(model, VOCAB) < 1e-5
    # The path would soft-cap the logits; Qwen2's forward does not: the two now disagree.
    model.config.final_logit_softcapping = 0.5
    with pytest.raises(ValueError, match="_logit_transform"):
        lp.check_logprobs(model, VOCAB)


def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir: Path) -> None:
    """trainer.gradient_checkpointing recomputes activations in backward: same weights (SGD at
    rate 1, so the update is the gradient itself)."""
    batch = make_batch(_groups(seed=4), pad_id=0, device=torch.device("cpu"))
    weights = []
    for checkpointing in (False, True):
        model = _model(tiny_model_dir)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        train_step(model, optimizer, batch, _params(grad_clip=0.0), version=0, estimator=_group())
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_step_on_cuda_tracks_float32(tiny_model_dir: Path) -> None:
    """trainer.autocast_dtype=bfloat16 on CUDA: the step runs in bf16 compute with float32
    weights, and its loss is the float32 loss to bf16 precision."""
    batch = make_batch(_groups(seed=5), pad_id=0, device=torch.device("cuda"))
    losses = []
    for dtype in ("", "bfloat16"):
        model = _model(tiny_model_dir).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        params = StepParams(**{**_params().__dict__, "autocast_dtype": dtype})
        metrics = train_step(model, optimizer, batch, params, version=0, estimator=_group())
        assert next(model.parameters()).dtype == torch.float32
        losses.append(metrics["loss/loss"])
    assert losses[1] == pytest.approx(losses[0], abs=2e-2)


def test_the_clip_acts_from_the_second_mini_batch_on(tiny_model_dir: Path) -> None:
    """With one mini-batch the proximal policy is the current one: every ratio is exactly 1
    and the DAPO clip never acts. With two, the second trains after the first one's update,
    against the same proximal policy: ratios move and, at a large enough step, get clipped."""
    batch = make_batch(_groups(seed=6), pad_id=0, device=torch.device("cpu"))
    fractions = {}
    for mini_batches in (1, 2):
        model = _model(tiny_model_dir)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
        metrics = train_step(
            model, optimizer, batch, _params(mini_batches=mini_batches), version=0, estimator=_group()
        )
        fractions[mini_batches] = metrics["loss/clip_frac_low"] + metrics["loss/clip_frac_high"]
        if mini_batches == 1:
            assert metrics["loss/ratio_mean"] == 1.0
    assert fractions[1] == 0.0
    assert fractions[2] > 0.0, fractions
