"""Prompt rendering and stop tokens (async_rl/text.py) with real tokenizers: one that puts a BOS
before every text (as Llama's does) and the embedded one, which adds nothing.

The rendered ids are checked where they are used: the prompt the torch engine prefills, the
prompt of the learner's greedy evaluation, and the rows of the supervised warm start. Each
records the ``input_ids`` that reach the model's forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.actor import score_group
from actors.torch_engine import Request, TorchEngine
from async_rl.config import Template
from async_rl.data import Prompt
from async_rl.schema import Lease
from async_rl.text import load_tokenizer, render_prompt, stop_token_ids
from async_rl.tiny_model import BYTE_OFFSET, build_tiny_model
from learners.evaluate import greedy_accuracy
from learners.warmstart import warm_start

BOS = 259  # build_tiny_model(add_bos=True)
QUESTION = "12+34="
QUESTION_IDS = [BYTE_OFFSET + ord(c) for c in QUESTION]


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("bos-model"), add_bos=True)


def _record_inputs(model: Any) -> list[torch.Tensor]:
    """The input_ids of every forward pass of ``model`` from now on."""
    seen: list[torch.Tensor] = []

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.detach().clone())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _strip_left(row: list[int], pad: int) -> list[int]:
    """A left-padded row without its padding."""
    first = next(i for i, t in enumerate(row) if t != pad)
    return row[first:]


def test_none_template_keeps_the_bos_the_tokenizer_adds(bos_model_dir: Path, tiny_model_dir: Path) -> None:
    with_bos = load_tokenizer(str(bos_model_dir))
    plain = load_tokenizer(str(tiny_model_dir))
    assert render_prompt(with_bos, QUESTION, Template.NONE) == [BOS, *QUESTION_IDS]
    assert render_prompt(plain, QUESTION, Template.NONE) == QUESTION_IDS
    # Without a chat template, auto falls back to the same rendering.
    assert render_prompt(with_bos, QUESTION, Template.AUTO) == [BOS, *QUESTION_IDS]


def test_chat_template_that_writes_bos_gets_exactly_one(bos_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(bos_model_dir))
    # A Llama-style template: it writes the BOS itself.
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}Q:{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    ids = render_prompt(tokenizer, QUESTION, Template.AUTO)
    assert ids == [BOS, *[BYTE_OFFSET + ord(c) for c in f"Q:{QUESTION}A:"]]
    assert ids.count(BOS) == 1


@pytest.mark.parametrize("with_bos", [True, False])
def test_engine_eval_and_warm_start_see_the_same_prompt(
    with_bos: bool, bos_model_dir: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    path = str(bos_model_dir if with_bos else tiny_model_dir)
    tokenizer = load_tokenizer(path)
    expected = [BOS, *QUESTION_IDS] if with_bos else QUESTION_IDS
    pad = tokenizer.pad_token_id

    # The engine, as the actor feeds it: render_prompt of the lease's question.
    engine = _engine(path, tokenizer, max_num_seqs=4, max_new_tokens=3)
    prefills = _record_inputs(engine.model)
    engine.add(Request(0, render_prompt(tokenizer, QUESTION, Template.NONE), 2, 0))
    while engine.has_work():
        engine.step()
    assert prefills[0].tolist() == [expected]  # one prefill of the shared prompt

    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seen = _record_inputs(model)
    prompt = Prompt(0, QUESTION, "46")
    greedy_accuracy(
        model,
        tokenizer,
        [prompt, Prompt(1, "1+2=", "3")],
        template=Template.NONE,
        max_new_tokens=2,
        stop_ids=[tokenizer.eos_token_id],
    )
    first = seen[0].tolist()  # generate's prefill: both prompts, left-padded
    assert _strip_left(first[0], pad) == expected
    second = [BYTE_OFFSET + ord(c) for c in "1+2="]
    assert _strip_left(first[1], pad) == ([BOS, *second] if with_bos else second)

    seen.clear()
    warm_start(
        model,
        tokenizer,
        [prompt],
        steps=1,
        batch_size=2,
        lr=1e-3,
        template=Template.NONE,
        seed=0,
        stop_ids=[tokenizer.eos_token_id],
    )
    answer = [BYTE_OFFSET + ord(c) for c in "46"]
    rows = seen[0].tolist()  # right-padded: prompt, reference answer + EOS
    assert rows == [[*expected, *answer, tokenizer.eos_token_id]] * 2


def test_stop_ids_come_from_generation_config_and_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = _copy_model(tiny_model_dir, tmp_path, eos=[1, 51])
    tokenizer = load_tokenizer(path)
    assert tokenizer.eos_token_id == 1
    assert stop_token_ids(path, tokenizer) == [1, 51]
    assert stop_token_ids(str(tiny_model_dir), load_tokenizer(str(tiny_model_dir))) == [1]


def test_either_of_two_stop_ids_ends_a_response(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With the final norm zeroed every logit is 0: tokens are uniform over the vocabulary, so
    each stop id turns up by chance. Every response must end at the first of either."""
    path = _copy_model(tiny_model_dir, tmp_path, eos=[1, 51])
    tokenizer = load_tokenizer(path)
    engine = _engine(path, tokenizer, max_num_seqs=64, max_new_tokens=200)
    with torch.no_grad():
        engine.model.model.norm.weight.zero_()
    prompt = render_prompt(tokenizer, QUESTION, Template.NONE)
    engine.add(Request(0, prompt, 64, 0))
    samples = []
    while engine.has_work():
        samples += engine.step()
    assert len(samples) == 64
    enders = {s.token_ids[-1] for s in samples if s.finish_reason == "stop"}
    assert enders == {1, 51}, "both stop ids must end some response"
    for s in samples:
        body = s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids
        assert not set(body) & {1, 51}, "a response ran past a stop id"
        if s.finish_reason == "length":
            assert len(s.token_ids) == 200


def test_scoring_leaves_out_whichever_stop_token_ended_the_response(tiny_model_dir: Path) -> None:
    """Stop id 51 is the character "0": "46" + 51 must score as "46", not as "460"."""
    from actors.torch_engine import Sample

    tokenizer = load_tokenizer(str(tiny_model_dir))
    answer = [BYTE_OFFSET + ord(c) for c in "46"]
    lease = Lease(7, 0, 0, QUESTION, "46")
    stops = frozenset({1, 51})
    for ender in (1, 51):
        sample = Sample(7, 0, [*answer, ender], [-1.0] * 3, [0] * 3, "stop")
        group = score_group(tokenizer, lease, QUESTION_IDS, [sample], "test", stops)
        assert group.responses[0].reward == 1.0, ender
        assert group.responses[0].token_ids.tolist() == [*answer, ender]  # trained on as sampled
    # Not a stop id here: the "0" is part of the answer, which is then wrong.
    sample = Sample(7, 0, [*answer, 51], [-1.0] * 3, [0] * 3, "length")
    assert (
        score_group(tokenizer, lease, QUESTION_IDS, [sample], "test", frozenset({1})).responses[0].reward
        == 0.0
    )


def _engine(path: str, tokenizer: Any, *, max_num_seqs: int, max_new_tokens: int) -> TorchEngine:
    """The torch engine on ``path``, stopping on the model's stop ids (as the actor builds it)."""
    return TorchEngine(
        path,
        device="cpu",
        dtype=torch.float32,
        max_num_seqs=max_num_seqs,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        stop_token_ids=stop_token_ids(path, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        seed=0,
    )


def _copy_model(source: Path, tmp_path: Path, *, eos: list[int]) -> str:
    import shutil

    target = tmp_path / "model"
    shutil.copytree(source, target)
    gen = json.loads((target / "generation_config.json").read_text())
    gen["eos_token_id"] = eos
    (target / "generation_config.json").write_text(json.dumps(gen))
    return str(target)
