"""The single-process reference loop: synchronous DAPO with no processes, sockets or groups.

It runs what ``mode=sync`` runs, in one process and in the simplest order: draw prompts,
generate with the torch engine, score, filter, train one step, copy the weights into the
engine, repeat. It exists to check the real system: with the same config and seed,
``async-rl train mode=sync`` (a learner and an actor process talking over ZeroMQ and gloo)
must end with the same weights as this loop, to 1e-6 (tests/e2e).

The waves match what the coordinator grants an actor in sync mode: the actor asks for
``max_num_seqs // G`` prompts when its engine is empty, and admission control caps the
grant at the groups still missing from this step's batch (filtered groups do not count).

The roles are imported inside ``run_reference`` only (the core imports them lazily).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from async_rl.config import Config, default_threads
from async_rl.data import PromptSource, build_datasets
from async_rl.schema import Lease, TrajectoryGroup
from async_rl.text import load_tokenizer, render_prompt, stop_token_ids

logger = logging.getLogger(__name__)


def run_reference(cfg: Config, model_path: str | Path) -> Any:
    """Train ``cfg.trainer.max_steps`` synchronous steps; return the trained model."""
    from transformers import AutoModelForCausalLM

    from actors.actor import score_group
    from actors.torch_engine import Request, Sample, TorchEngine
    from learners.advantages import estimator_from_config
    from learners.trainer import MASTER_DTYPE, StepParams, make_batch, train_step
    from learners.warmstart import warm_start_from_config

    if cfg.rollout.engine.value != "torch":
        raise ValueError("the reference loop runs the torch engine only (rollout.engine=torch)")
    if cfg.env.kind != "math":
        raise ValueError(
            f"the reference loop runs single-turn episodes only (env.kind=math, not {cfg.env.kind})"
        )
    # The processes of `async-rl train` with one actor each get this many threads.
    torch.set_num_threads(cfg.trainer.num_threads or default_threads(2))
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    tokenizer = load_tokenizer(str(model_path))
    stop_ids = frozenset(stop_token_ids(str(model_path), tokenizer))
    dtype = getattr(torch, cfg.model.dtype)  # the engine's; the learner keeps float32 masters
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=MASTER_DTYPE).eval()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay
    )
    train_prompts, _ = build_datasets(cfg.data, seed=cfg.seed)
    tr, ro = cfg.trainer, cfg.rollout
    if tr.warmup_sft_steps:
        warm_start_from_config(model, tokenizer, train_prompts, cfg, sorted(stop_ids))
    engine = TorchEngine(
        str(model_path),
        device="cpu",
        dtype=dtype,
        max_num_seqs=ro.max_num_seqs,
        max_new_tokens=ro.max_new_tokens,
        temperature=ro.temperature,
        top_p=ro.top_p,
        stop_token_ids=sorted(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
        seed=cfg.seed,
    )
    _copy_weights(model, engine, version=0)
    source = PromptSource(train_prompts, seed=cfg.seed)
    params = StepParams.from_config(cfg)
    estimator = estimator_from_config(cfg, tokenizer)
    filters = cfg.algorithm.dynamic_sampling and estimator.filters_zero_variance
    g = ro.group_size
    for version in range(tr.max_steps):
        accepted: list[tuple[int, TrajectoryGroup]] = []
        while len(accepted) < tr.batch_groups:
            wave = source.take(min(ro.max_num_seqs // g, tr.batch_groups - len(accepted)))
            leases = {seq: Lease(seq, p.prompt_id, seq, p.question, p.answer) for seq, p in wave}
            prompt_ids = {seq: render_prompt(tokenizer, p.question, cfg.data.template) for seq, p in wave}
            samples: dict[int, list[Sample]] = {seq: [] for seq in leases}
            for seq in leases:
                engine.add(Request(seq, prompt_ids[seq], g, seq))
            while engine.has_work():
                for sample in engine.step():
                    samples[sample.request_id].append(sample)
            for seq, lease in leases.items():
                group = score_group(tokenizer, lease, prompt_ids[seq], samples[seq], "reference", stop_ids)
                rewards = [r.reward for r in group.responses]
                if not filters or max(rewards) > min(rewards):
                    accepted.append((seq, group))
        accepted.sort(key=lambda item: item[0])
        batch = make_batch([group for _, group in accepted], pad_id=tokenizer.pad_token_id, device=device)
        train_step(model, optimizer, batch, params, version=version, estimator=estimator)
        logger.info("reference step %d: reward %.3f", version + 1, float(batch.rewards.mean()))
        _copy_weights(model, engine, version=version + 1)
    return model


def _copy_weights(model: Any, engine: Any, *, version: int) -> None:
    """What a weight broadcast does to the engine, without the group."""
    with torch.no_grad():
        targets = engine.parameters()
        for name, tensor in model.named_parameters():
            targets[name].copy_(tensor)
    engine.set_version(version)
