"""Token logprobs of a causal LM without full-vocabulary logits, and token-budget micro-batches.

A learner step needs ``log pi(token)`` at the response positions only. Taking them from
``model(...).logits`` materialises ``[rows, length, vocab]`` logits (49k or 150k columns), then
float32 copies and a log-softmax of the same size: tens of GB for a real batch. Here:

1. the model runs as usual, but a pre-hook on its output embedding (the LM head) keeps the
   final hidden states and hands the head an empty slice, so no logits are computed inside;
2. the hidden states at the response positions are gathered: ``[T, D]`` for T response tokens;
3. the head is applied to chunks of at most ``_CHUNK_ELEMENTS / vocab`` tokens, each giving
   ``logsumexp`` and the target's logit in float32. With gradients on, each chunk is
   checkpointed, so backward recomputes its logits instead of keeping them: the peak is one
   chunk of logits, whatever the batch.

Rows are right-padded (prompt, response, padding). A causal LM never lets a position attend
to a later one, so the padding after a row cannot change its real positions, and the forward
pass needs no attention mask: the rows are cut to the longest one in the micro-batch.

Some architectures post-process logits in their forward (Gemma 2's soft-capping, Granite's
scaling, Cohere's logit scale): those are applied from the config. ``check_logprobs`` compares
this path with a plain forward pass on a few tokens, so an architecture with something else
fails with a clear error before training instead of training on wrong logprobs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Logit elements per chunk: 2**25 float32 = 128 MiB (682 tokens of a 49k vocabulary).
_CHUNK_ELEMENTS = 2**25
# check_logprobs: largest |difference| accepted between this path and a full forward pass.
_CHECK_TOLERANCE = 1e-3


@contextlib.contextmanager
def final_hidden(model: Any) -> Iterator[dict[str, torch.Tensor]]:
    """While active, a forward pass of ``model`` stores the LM head's input (the final hidden
    states, [B, L, D]) in the yielded dict under ``"hidden"`` and computes no logits."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head); it is not a causal LM")
    box: dict[str, torch.Tensor] = {}

    def keep_hidden(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        box["hidden"] = hidden
        return (hidden[..., :0, :], *args[1:])  # the head sees zero positions

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        yield box
    finally:
        handle.remove()


def _logit_transform(config: Any) -> tuple[float | None, float]:
    """(soft-cap, multiplier) the architecture applies to raw head outputs."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None):  # Cohere multiplies
        scale *= float(config.logit_scale)
    return (float(cap) if cap else None), scale


def _chunk_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cap: float | None,
    scale: float,
    temperature: float,
) -> torch.Tensor:
    """hidden [c, D], targets [c] -> log softmax(logits / temperature)[target], [c] float32."""
    logits = F.linear(hidden, weight, bias).float()
    if scale != 1.0:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def head_logprobs(
    model: Any, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Logprobs of ``targets`` [T] given final hidden states ``hidden`` [T, D], in chunks:
    [T] float32. Never holds more than one chunk of logits, forward or backward."""
    head = model.get_output_embeddings()
    cap, scale = _logit_transform(model.config)
    vocab = head.weight.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    pieces = []
    for start in range(0, hidden.shape[0], chunk):
        args = (hidden[start : start + chunk], targets[start : start + chunk], head.weight, head.bias)
        if torch.is_grad_enabled() and hidden.requires_grad:
            # Recompute this chunk's logits in backward rather than keeping them.
            piece = checkpoint(_chunk_logprobs, *args, cap, scale, temperature, use_reentrant=False)
        else:
            piece = _chunk_logprobs(*args, cap, scale, temperature)
        pieces.append(piece)
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def sequence_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    index: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Logprobs of the masked ``targets`` of right-padded rows.

    input_ids: [n, W] (prompt, response, padding). index, targets, mask: [n, R]: ``index[i, j]``
    is the position whose output predicts ``targets[i, j]``. Returns [n, R] float32, 0 where
    ``mask`` is false.
    """
    with final_hidden(model) as box:
        model(input_ids=input_ids, use_cache=False)
    hidden = box["hidden"]  # [n, W, D]
    rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1).expand_as(index)
    picked = hidden[rows[mask], index[mask]]  # [T, D]
    logprobs = head_logprobs(model, picked, targets[mask], temperature)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put((mask,), logprobs)


def pack_micro_batches(widths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``widths`` (tokens per row) packed into micro-batches of at most ``budget``
    padded tokens (rows x longest row). Rows are taken longest first, so rows of similar length
    share a micro-batch and little is padding. A row longer than the budget is alone."""
    order = sorted(range(len(widths)), key=lambda i: (-widths[i], i))
    packs: list[list[int]] = []
    for i in order:
        # Longest first: the first row of a pack sets its width.
        if packs and (len(packs[-1]) + 1) * widths[packs[-1][0]] <= budget:
            packs[-1].append(i)
        else:
            packs.append([i])
    return packs


def check_logprobs(model: Any, vocab_size: int) -> float:
    """Largest |difference| between ``sequence_logprobs`` and a plain forward pass on one short
    seeded sequence. Raises ValueError above 1e-3 (an architecture whose logits this module
    does not reproduce)."""
    generator = torch.Generator().manual_seed(0)
    length = 12
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab_size, (1, length), generator=generator).to(device)
    index = torch.arange(length - 1, device=device).unsqueeze(0)
    targets, mask = ids[:, 1:], torch.ones_like(index, dtype=torch.bool)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ours = sequence_logprobs(model, ids, index, targets, mask, 1.0)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        reference = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    model.train(was_training)
    error = float((ours - reference).abs().max())
    if not math.isfinite(error) or error > _CHECK_TOLERANCE:
        raise ValueError(
            f"{type(model).__name__}: logprobs from the final hidden states differ from the model's own "
            f"logits by {error:.2e} (> {_CHECK_TOLERANCE:g}); its forward post-processes logits in a way "
            "learners/logprobs.py does not know. Add it to _logit_transform."
        )
    return error
