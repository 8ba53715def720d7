"""Checkpoints: the model in Hugging Face format, plus optimizer and coordinator state.

``checkpoints/step_<N>/`` holds ``config.json``, ``model.safetensors``, the tokenizer,
``optimizer.pt`` (a local file this learner wrote, read back with ``weights_only=True``;
nothing from the network is ever unpickled), ``state.json`` (version, coordinator state) and ``estimator.safetensors`` (the
advantage estimator's history, for the stateful estimators). ``checkpoints/latest`` names the
one to resume from.

A save survives being killed at any point: it writes ``.tmp_step_<N>``, flushes it to disk,
renames it to ``step_<N>`` and only then points ``latest`` at it, by renaming a new marker
over the old one. A save of a version that already has a checkpoint (the final save after a
periodic one, or after a resume) first renames the old one to ``.old_step_<N>``, which
``latest_checkpoint`` renames back if the save was cut short. So ``latest`` always names a
complete checkpoint. Then all but the newest ``keep`` checkpoints are deleted (0 = keep all).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

_STEP = re.compile(r"step_(\d+)")
_MARKER = "latest"


def save_checkpoint(
    run_dir: Path,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    state: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    keep: int = 0,
) -> Path:
    """Write ``checkpoints/step_<version>`` and make it ``latest``; each entry of ``tensors``
    (e.g. the advantage estimator's state) goes to ``<name>.safetensors`` beside the model.
    ``optimizer`` may be given as its state dict (the FSDP learner's, gathered to rank 0).
    Then keep the newest ``keep`` checkpoints, this one included (0 = keep all)."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{state['version']}"
    final, tmp, old = root / name, root / f".tmp_{name}", root / f".old_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    optimizer_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for key, named in (tensors or {}).items():
        if named:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in named.items()}, tmp / f"{key}.safetensors"
            )
    # On disk before the rename: after a power cut the name must not point at unwritten data.
    _fsync_tree(tmp)
    if final.exists():  # never delete what latest may name before its successor is in place
        shutil.rmtree(old, ignore_errors=True)
        final.replace(old)
    tmp.replace(final)  # a crash mid-save never leaves a half checkpoint under the final name
    _fsync(root)
    _write_marker(root, name)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint saved: %s", final)
    prune_checkpoints(root, keep, current=name)
    return final


def _write_marker(root: Path, name: str) -> None:
    """Point ``latest`` at ``name`` atomically: write a new marker, then rename it over."""
    tmp = root / f".{_MARKER}.tmp"
    with tmp.open("w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(root / _MARKER)
    _fsync(root)


def prune_checkpoints(root: Path, keep: int, *, current: str) -> list[Path]:
    """Delete all checkpoints but ``current`` (the one ``latest`` names) and the ``keep - 1``
    newest before it (0 = keep all), and what interrupted saves left behind. A checkpoint of
    a version above ``current`` is from a run resumed from an earlier checkpoint, whose
    history it is no longer part of: it goes first. Returns what was deleted."""
    if not root.is_dir():
        return []
    deleted = [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp_step_", ".old_step_"))]
    if keep > 0:
        version = _version(current)
        assert version is not None, current
        steps = sorted((v, p) for p in root.iterdir() if (v := _version(p.name)) is not None and p.is_dir())
        earlier = [p for v, p in steps if v < version]
        kept = {current, *(p.name for p in earlier[max(0, len(earlier) - (keep - 1)) :])}
        deleted += [p for _, p in steps if p.name not in kept]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    if keep > 0 and deleted:
        logger.info("checkpoints pruned (trainer.keep_checkpoints=%d): %s", keep, [p.name for p in deleted])
    return deleted


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names; if a re-save of it was cut short, the one it replaced
    (renamed back). Without a usable marker (one written by an older version, cut short), the
    checkpoint of the highest version: every ``step_<N>`` is complete."""
    root = Path(run_dir) / "checkpoints"
    try:
        name = (root / _MARKER).read_text().strip()
    except FileNotFoundError:
        name = ""
    if _version(name) is not None:
        path, old = root / name, root / f".old_{name}"
        if not path.is_dir() and old.is_dir():
            old.replace(path)
            logger.warning("the save of %s was cut short: restored the checkpoint it was replacing", path)
        if path.is_dir():
            return path
    steps = sorted((v, p) for p in root.glob("step_*") if (v := _version(p.name)) is not None and p.is_dir())
    if not steps:
        return None
    logger.warning(
        "%s names no checkpoint (%r): taking the highest version, %s", root / _MARKER, name, steps[-1][1]
    )
    return steps[-1][1]


def _version(name: str) -> int | None:
    match = _STEP.fullmatch(name)
    return int(match.group(1)) if match else None


def _fsync_tree(path: Path) -> None:
    for sub in sorted(path.rglob("*")):
        if sub.is_file():
            _fsync(sub)
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
