"""Checkpoints: the model in Hugging Face format, plus optimizer and coordinator state.

``checkpoints/step_<N>/`` holds ``config.json``, ``model.safetensors``, the tokenizer,
``optimizer.pt`` (a local file this learner wrote, read back with ``weights_only=True``;
nothing from the network is ever unpickled), ``state.json`` (version, coordinator state) and ``estimator.safetensors`` (the
advantage estimator's history, for the stateful estimators).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


def save_checkpoint(
    run_dir: Path,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    state: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``checkpoints/step_<version>``; each entry of ``tensors`` (e.g. the advantage
    estimator's state) goes to ``<name>.safetensors`` beside the model. ``optimizer`` may be
    given as its state dict (the FSDP learner's, gathered to rank 0)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{state['version']}"
    tmp = root / f".tmp_step_{state['version']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    optimizer_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    torch.save(optimizer_state, tmp / "optimizer.pt")
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


def load_checkpoint(
    path: Path, *, model: Any, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Load ``path`` (a ``step_<N>`` directory) into ``model`` and ``optimizer``. Returns the
    ``state.json`` contents and the extra tensor files (``<name>.safetensors``) by name."""
    path = Path(path)
    weights = _model_weights(path, device)
    current = model.state_dict()
    unexpected = sorted(set(weights) - set(current))
    # save_pretrained leaves out tied weights (lm_head = embeddings): they come with their twin.
    loaded_ptrs = {current[k].data_ptr() for k in weights if k in current}
    missing = sorted(k for k in set(current) - set(weights) if current[k].data_ptr() not in loaded_ptrs)
    if unexpected or missing:
        raise ValueError(
            f"{path}: the checkpoint does not fit this model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); resume with the model.path the run was started with"
        )
    model.load_state_dict(weights, strict=False)
    # weights_only: the optimizer state is tensors and numbers, so no pickled code can run.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    state = json.loads((path / "state.json").read_text())
    tensors = {
        f.stem: load_file(f) for f in sorted(path.glob("*.safetensors")) if not f.stem.startswith("model")
    }
    logger.info("checkpoint loaded: %s (v%d)", path, state["version"])
    return state, tensors


def _model_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The model's tensors: one ``model.safetensors``, or the shards its index names."""
    index = path / "model.safetensors.index.json"
    if not (path / "model.safetensors").exists() and index.exists():
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            weights |= load_file(path / shard, device=str(device))
        return weights
    return load_file(path / "model.safetensors", device=str(device))
