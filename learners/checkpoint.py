"""Checkpoints: the model in Hugging Face format, plus optimizer and coordinator state.

``checkpoints/step_<N>/`` holds ``config.json``, ``model.safetensors``, the tokenizer,
``optimizer.pt`` (a local file this learner wrote; nothing from the network is ever
unpickled), ``state.json`` (version, coordinator state) and ``estimator.safetensors`` (the
advantage estimator's history, for the stateful estimators).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)


def save_checkpoint(
    run_dir: Path,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``checkpoints/step_<version>``; each entry of ``tensors`` (e.g. the advantage
    estimator's state) goes to ``<name>.safetensors`` beside the model."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{state['version']}"
    tmp = root / f".tmp_step_{state['version']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for name, named in (tensors or {}).items():
        if named:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in named.items()}, tmp / f"{name}.safetensors"
            )
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)  # a crash mid-save never leaves a half checkpoint under the final name
    (root / "latest").write_text(final.name)
    logger.info("checkpoint saved: %s", final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    marker = Path(run_dir) / "checkpoints" / "latest"
    if not marker.exists():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if path.is_dir() else None
