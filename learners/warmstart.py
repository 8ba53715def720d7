"""Supervised warm start: cross-entropy steps on reference responses before RL.

The embedded tiny model starts from random weights; RL needs a policy that already
answers in the task's format and is right some of the time, as a pretrained model would.
The warm start runs until a greedy accuracy target is reached on a slice of the training
prompts (never on the held-out split, whose accuracy RL is measured by), or until its
step budget is spent.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from async_rl.config import Config, EnvConfig, Template
from async_rl.data import Prompt
from async_rl.env import Environment, MathEnv, make_env
from async_rl.text import render_prompt
from learners.evaluate import greedy_accuracy
from learners.trainer import micro_batches, pack_rows, token_logprobs

logger = logging.getLogger(__name__)

# Training prompts the stopping check evaluates on, and how often.
_CHECK_PROMPTS = 200
_CHECK_EVERY = 100
_GRAD_CLIP = 1.0


@dataclass
class WarmStartResult:
    steps: int
    loss: float
    accuracy: float | None  # greedy accuracy on the check prompts at the end (None: never checked)


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
    stop_ids: Sequence[int],
    target_accuracy: float = 0.0,
    max_new_tokens: int = 8,
    micro_batch_tokens: int = 4096,
    env: Environment | None = None,
) -> WarmStartResult:
    """Up to ``steps`` AdamW steps of next-token loss on the policy's tokens of ``env``'s
    demonstrations (default ``math``: the reference response), the token mean over each batch
    of ``batch_size`` rows, accumulated over micro-batches of at most ``micro_batch_tokens``
    padded tokens. Observation tokens are context, not targets.

    With ``target_accuracy`` > 0, every 100 steps the greedy accuracy on the first 200 of
    ``prompts`` is measured, and the warm start stops once it reaches the target.
    """
    device = next(model.parameters()).device
    rng = random.Random(f"warm-start/{seed}")
    env = env or MathEnv(EnvConfig())
    rows = demonstration_rows(tokenizer, prompts, env, template=template, seed=seed)
    check = prompts[:_CHECK_PROMPTS]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss_value, accuracy = float("nan"), None
    step = 0
    while step < steps:
        chosen = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        batch = pack_rows([(p, r) for p, r, _ in chosen], pad_id=tokenizer.pad_token_id, device=device)
        for i, (_, _, loss_mask) in enumerate(chosen):  # observation tokens are context only
            batch.mask[i, : len(loss_mask)] = torch.tensor(loss_mask, device=device)
        tokens = int(batch.mask.sum())
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in micro_batches(batch, slice(0, batch_size), micro_batch_tokens):
            logprobs = token_logprobs(model, batch, micro, 1.0)
            loss = -logprobs.sum() / tokens  # this micro-batch's share of the batch's token mean
            loss.backward()
            loss_sum += float(loss.detach())
        # Without clipping, a late loss spike can undo the warm start (seen at lr 3e-3).
        torch.nn.utils.clip_grad_norm_(model.parameters(), _GRAD_CLIP)
        optimizer.step()
        loss_value = loss_sum
        step += 1
        if target_accuracy > 0 and (step % _CHECK_EVERY == 0 or step == steps):
            accuracy = greedy_accuracy(
                model,
                tokenizer,
                check,
                template=template,
                max_new_tokens=max_new_tokens,
                stop_ids=stop_ids,
                max_batch_tokens=micro_batch_tokens,
                env=env,
            )
            model.train()
            logger.info(
                "warm start %d/%d: loss %.3f, train accuracy %.3f (target %.2f)",
                step,
                steps,
                loss_value,
                accuracy,
                target_accuracy,
            )
            if accuracy >= target_accuracy:
                break
        elif step % _CHECK_EVERY == 0:
            logger.info("warm start %d/%d: loss %.3f", step, steps, loss_value)
    model.eval()
    return WarmStartResult(step, loss_value, accuracy)


def demonstration_rows(
    tokenizer: Any, prompts: list[Prompt], env: Environment, *, template: Template, seed: int
) -> list[tuple[list[int], list[int], list[bool]]]:
    """One demonstration per prompt as (prompt ids, response ids, loss mask): the policy's
    turns (+ EOS where the turn ends on it) are targets, observations are not. Observations
    are cut to ``env.max_observation_tokens`` as the actor cuts them."""
    rng = random.Random(f"warm-start-demos/{seed}")
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    rows = []
    for p in prompts:
        ids: list[int] = []
        mask: list[bool] = []
        for turn in env.demonstration(p.question, p.answer, rng):
            policy = encode(turn.text) + ([tokenizer.eos_token_id] if turn.eos else [])
            observed = encode(turn.observation)[: env.cfg.max_observation_tokens] if turn.observation else []
            ids += policy + observed
            mask += [True] * len(policy) + [False] * len(observed)
        rows.append((render_prompt(tokenizer, p.question, template), ids, mask))
    return rows


def warm_start_from_config(
    model: Any, tokenizer: Any, prompts: list[Prompt], cfg: Config, stop_ids: Sequence[int]
) -> WarmStartResult:
    """``warm_start`` with the ``trainer.warmup_sft_*`` settings of ``cfg``."""
    tr = cfg.trainer
    result = warm_start(
        model,
        tokenizer,
        prompts,
        steps=tr.warmup_sft_steps,
        batch_size=tr.warmup_sft_batch,
        lr=tr.warmup_sft_lr,
        template=cfg.data.template,
        seed=cfg.seed,
        stop_ids=stop_ids,
        target_accuracy=tr.warmup_sft_target,
        max_new_tokens=cfg.rollout.max_new_tokens,
        micro_batch_tokens=tr.micro_batch_tokens,
        env=make_env(cfg.env),
    )
    if tr.warmup_sft_target > 0 and (result.accuracy or 0.0) < tr.warmup_sft_target:
        logger.warning(
            "warm start spent trainer.warmup_sft_steps=%d without reaching trainer.warmup_sft_target=%.2f "
            "(train accuracy %.3f); RL starts from a weaker policy. Raise warmup_sft_steps to go on.",
            tr.warmup_sft_steps,
            tr.warmup_sft_target,
            result.accuracy or 0.0,
        )
    return result
