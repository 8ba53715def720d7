"""Held-out accuracy: greedy episodes on the eval prompts, scored by the environment.

With the default ``math`` environment an episode is one greedy response scored by
``math_reward``; a multi-turn environment answers each turn and the policy continues.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from async_rl.config import EnvConfig, Template
from async_rl.data import Prompt
from async_rl.env import Environment, EpisodeRun, MathEnv
from async_rl.text import render_prompt
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
    env: Environment | None = None,
) -> float:
    """Mean reward of one greedy episode per prompt in ``env`` (default ``math``: the
    fraction of ``prompts`` whose greedy response scores 1.0).

    A turn ends at the first of ``stop_ids`` (every EOS of the model) or at the environment's
    stop strings; ``max_new_tokens`` is the budget of a whole episode. The episodes still
    running take their next turn together, in batches of at most ``max_batch_tokens`` tokens
    (rows x (longest context + budget)), the learner's micro-batch budget, so evaluation never
    needs more memory than training.
    """
    if not prompts:
        return float("nan")
    env = env or MathEnv(EnvConfig())
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = frozenset(stop_ids)
    encoded = [render_prompt(tokenizer, p.question, template) for p in prompts]
    runs = [
        EpisodeRun(
            env, p.question, p.answer, tokenizer=tokenizer, stop_ids=stops, max_new_tokens=max_new_tokens
        )
        for p in prompts
    ]
    active = list(range(len(prompts)))
    while active:
        contexts = [encoded[i] + runs[i].token_ids for i in active]
        budgets = [runs[i].budget_left for i in active]
        # Longest first, similar lengths together (little padding); a context too long goes alone.
        for chunk in pack_micro_batches([len(c) + b for c, b in zip(contexts, budgets)], max_batch_tokens):
            width = max(len(contexts[j]) for j in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, j in enumerate(chunk):
                ids[row, width - len(contexts[j]) :] = torch.tensor(contexts[j])
                mask[row, width - len(contexts[j]) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max(budgets[j] for j in chunk),
                eos_token_id=sorted(stops),
                pad_token_id=tokenizer.pad_token_id,
            )
            for j, tokens in zip(chunk, out[:, width:].tolist()):
                tokens = tokens[: budgets[j]]
                end = next((k + 1 for k, token in enumerate(tokens) if token in stops), None)
                finish = "stop" if end is not None else "length"
                tokens = tokens[:end] if end is not None else tokens
                runs[active[j]].end_turn(tokens, [0.0] * len(tokens), [0] * len(tokens), finish)
        active = [i for i in active if not runs[i].over]
    model.train(was_training)
    return sum(run.reward or 0.0 for run in runs) / len(runs)
