"""Checkpoints on disk: the newest ``trainer.keep_checkpoints`` are kept, and ``latest`` names a
complete checkpoint whatever point a save is cut short at (``learners/checkpoint.py``)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from async_rl.text import load_tokenizer
from learners.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learners.restart import checkpoint_to_resume


@pytest.fixture(scope="module")
def parts(tiny_model_dir: Path) -> dict[str, Any]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).loss.backward()
    optimizer.step()  # some optimizer state to save
    return {"model": model, "tokenizer": load_tokenizer(str(tiny_model_dir)), "optimizer": optimizer}


def _save(run_dir: Path, parts: dict[str, Any], version: int, keep: int = 0, **state: Any) -> Path:
    return save_checkpoint(run_dir, **parts, state={"version": version, **state}, keep=keep)


def _on_disk(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_the_newest_keep_checkpoints_are_kept(tmp_path: Path, parts: dict[str, Any]) -> None:
    for version in range(5):
        _save(tmp_path, parts, version, keep=2)
    assert _on_disk(tmp_path) == ["latest", "step_3", "step_4"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_4"
    # keep=1: only the one latest names.
    _save(tmp_path, parts, 5, keep=1)
    assert _on_disk(tmp_path) == ["latest", "step_5"]
    # keep=0: nothing is deleted.
    for version in (6, 7, 8):
        _save(tmp_path / "all", parts, version)
    assert _on_disk(tmp_path / "all") == ["latest", "step_6", "step_7", "step_8"]


def test_a_resumed_run_prunes_the_history_it_left_and_never_what_latest_names(
    tmp_path: Path, parts: dict[str, Any]
) -> None:
    for version in range(1, 7):
        _save(tmp_path, parts, version)
    # Resumed from step_3 (say): its next save is step_4, and step_5, step_6 belong to a history
    # the run no longer has. What interrupted saves left behind goes too.
    (tmp_path / "checkpoints" / ".tmp_step_9").mkdir()
    _save(tmp_path, parts, 4, keep=2, incarnation=1)
    assert _on_disk(tmp_path) == ["latest", "step_3", "step_4"]
    assert json.loads((tmp_path / "checkpoints" / "step_4" / "state.json").read_text())["incarnation"] == 1
    # A re-save of the version latest names (the final save after a periodic one) keeps it.
    _save(tmp_path, parts, 4, keep=1, incarnation=2)
    assert _on_disk(tmp_path) == ["latest", "step_4"]
    assert json.loads((tmp_path / "checkpoints" / "step_4" / "state.json").read_text())["incarnation"] == 2


class _Killed(BaseException):
    """The save stops here, as if the process had been killed: nothing after it runs."""


def _kill_after(monkeypatch: pytest.MonkeyPatch, ops: int) -> None:
    """Let ``ops`` file-system renames and deletions happen, then stop the process at the next."""
    done = [0]

    def counted(real: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kwargs: Any) -> Any:
            if done[0] == ops:
                raise _Killed
            done[0] += 1
            return real(*args, **kwargs)

        return op

    for module, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, counted(getattr(module, name)))


def test_latest_names_a_complete_checkpoint_wherever_a_save_is_cut_short(
    tmp_path: Path, parts: dict[str, Any], tiny_model_dir: Path
) -> None:
    base = tmp_path / "base"
    _save(base, parts, 1)
    _save(base, parts, 2, incarnation=0)
    complete = {"config.json", "model.safetensors", "optimizer.pt", "state.json", "tokenizer.json"}
    fresh: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    seen = set()
    for ops in range(100):
        run = tmp_path / f"cut-{ops}"
        shutil.copytree(base, run)
        # Saving v3 (a new version), and saving v2 again (what latest names), cut after `ops` steps.
        for version in (3, 2):
            finished = True
            with pytest.MonkeyPatch.context() as mp:
                _kill_after(mp, ops)
                try:
                    _save(run, parts, version, keep=2, incarnation=1)
                except _Killed:
                    finished = False
            path = checkpoint_to_resume(run)
            assert complete <= {p.name for p in path.iterdir()}, (ops, version, sorted(path.iterdir()))
            state, _ = load_checkpoint(
                path, model=fresh, optimizer=fresh_optimizer, device=torch.device("cpu")
            )
            assert state["version"] in (2, 3), (ops, version)
            seen.add(state["version"])
            if finished:
                assert path == run / "checkpoints" / f"step_{version}"
                assert state == {"version": version, "incarnation": 1}
        if finished:
            break
    else:
        pytest.fail("the save never finished")
    assert ops >= 5 and seen == {2, 3}


def test_a_marker_cut_short_by_an_older_version_falls_back_to_the_highest_checkpoint(
    tmp_path: Path, parts: dict[str, Any]
) -> None:
    _save(tmp_path, parts, 1)
    _save(tmp_path, parts, 2)
    # An older version wrote `latest` in place: killed mid-write, it is left empty.
    (tmp_path / "checkpoints" / "latest").write_text("")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_2"
    (tmp_path / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_2"
    assert latest_checkpoint(tmp_path / "nothing-here") is None
