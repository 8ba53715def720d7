"""Supervised warm start: a few cross-entropy steps on reference responses before RL.

The embedded tiny model starts from random weights; RL needs a policy that already
answers in the task's format some of the time, as a pretrained model would.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from async_rl.config import Template
from async_rl.data import Prompt, sft_text
from async_rl.text import render_prompt

logger = logging.getLogger(__name__)


def warm_start(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    template: Template,
    seed: int,
) -> float:
    """Run ``steps`` AdamW steps of next-token loss on the response tokens. Returns the last loss."""
    device = next(model.parameters()).device
    rng = random.Random(f"warm-start/{seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        chunk = [prompts[rng.randrange(len(prompts))] for _ in range(batch_size)]
        rows = []
        for p in chunk:
            prompt_ids = render_prompt(tokenizer, p.question, template)
            target = tokenizer(sft_text(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt_ids, target))
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (a, b) in enumerate(rows):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            labels[i, len(a) : len(a) + len(b)] = torch.tensor(b)
            mask[i, : len(a) + len(b)] = 1
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        if step % 50 == 0 or step == steps - 1:
            logger.info("warm start %d/%d: loss %.3f", step + 1, steps, loss_value)
    model.eval()
    return loss_value
