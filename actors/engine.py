"""The engine factory: one explicit choice of inference engine per actor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from async_rl.config import Config, EngineKind


def make_engine(
    cfg: Config,
    model_path: str,
    *,
    device: str,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    decode: Callable[[list[int]], str] | None = None,
) -> Any:
    """The engine ``rollout.engine`` names. ``decode`` (token ids -> text) lets the torch engine
    end a turn at an environment's stop strings; SGLang runs without a tokenizer, so its turns
    run on to EOS or the budget and the actor cuts them at the first stop string."""
    rollout = cfg.rollout
    match rollout.engine:
        case EngineKind.TORCH:
            from actors.torch_engine import TorchEngine

            return TorchEngine(
                model_path,
                device=device,
                dtype=getattr(torch, cfg.model.dtype),
                max_num_seqs=rollout.max_num_seqs,
                max_new_tokens=rollout.max_new_tokens,
                temperature=rollout.temperature,
                top_p=rollout.top_p,
                stop_token_ids=stop_token_ids,
                pad_token_id=pad_token_id,
                seed=cfg.seed,
                resume_kv=rollout.resume_kv.value,
                decode=decode,
            )
        case EngineKind.SGLANG:
            from actors.sglang_engine import make_sglang_engine  # imports SGLang only if it launches one

            return make_sglang_engine(cfg, model_path, device=device, stop_token_ids=stop_token_ids)
