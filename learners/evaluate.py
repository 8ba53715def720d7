"""Held-out accuracy: greedy decoding on the eval prompts, scored by ``math_reward``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from async_rl.config import Template
from async_rl.data import Prompt
from async_rl.rewards import math_reward
from async_rl.text import render_prompt, response_text
from learners.logprobs import pack_micro_batches


@torch.no_grad()
def greedy_accuracy(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    template: Template,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    max_batch_tokens: int = 4096,
) -> float:
    """Fraction of ``prompts`` whose greedy response scores 1.0.

    A response ends at the first of ``stop_ids`` (every EOS of the model). Prompts are taken in
    batches of at most ``max_batch_tokens`` tokens (rows x (longest prompt + max_new_tokens)),
    the learner's micro-batch budget, so evaluation never needs more memory than training.
    """
    if not prompts:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = set(stop_ids)
    encoded = [render_prompt(tokenizer, p.question, template) for p in prompts]
    correct = 0.0
    # Longest first, similar lengths together (little padding); a prompt too long goes alone.
    for chunk in pack_micro_batches([len(e) + max_new_tokens for e in encoded], max_batch_tokens):
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stops),
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, row in zip(chunk, out[:, width:].tolist()):
            end = next((k for k, token in enumerate(row) if token in stops), len(row))
            correct += math_reward(response_text(tokenizer, row[:end]), prompts[i].answer)
    model.train(was_training)
    return correct / len(prompts)
