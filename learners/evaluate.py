"""Held-out accuracy: greedy decoding on the eval prompts, scored by ``math_reward``."""

from __future__ import annotations

from typing import Any

import torch

from async_rl.config import Template
from async_rl.data import Prompt
from async_rl.rewards import math_reward
from async_rl.text import render_prompt, response_text


@torch.no_grad()
def greedy_accuracy(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    template: Template,
    max_new_tokens: int,
    batch_size: int = 256,
) -> float:
    """Fraction of ``prompts`` whose greedy response scores 1.0."""
    if not prompts:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [render_prompt(tokenizer, p.question, template) for p in chunk]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for prompt, row in zip(chunk, out[:, width:].tolist()):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            correct += math_reward(response_text(tokenizer, row), prompt.answer)
    model.train(was_training)
    return correct / len(prompts)
