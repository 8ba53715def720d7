"""Prompt loading, the synthetic tasks and the resumable prompt stream."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from async_rl.data import (
    Prompt,
    PromptSource,
    arithmetic_problem_ids,
    arithmetic_prompts,
    chain_solution,
    load_jsonl,
    load_parquet,
    load_prompts,
    long_tail_prompts,
    reference_answer,
    sft_text,
)

GSM8K_DIR = Path(
    os.environ.get("ASYNC_RL_GSM8K_DIR")
    or Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k"
)


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------
# Files


@pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").exists(), reason=f"GSM8K not found at {GSM8K_DIR}")
def test_gsm8k_sizes_and_final_answers() -> None:
    train = load_prompts(GSM8K_DIR / "train.jsonl")
    test = load_prompts(GSM8K_DIR / "test.jsonl")
    assert (len(train), len(test)) == (7473, 1319)
    # "Natalia sold clips to 48 of her friends in April ... #### 72"
    assert train[0].answer == "72"
    assert train[0].question.startswith("Natalia sold clips to 48 of her friends")
    assert test[0].answer == "18"  # Janet's ducks
    assert [p.prompt_id for p in train[:3]] == [0, 1, 2]
    assert all("####" not in p.answer and "," not in p.answer for p in train + test)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("48/2 = <<48/2=24>>24 clips\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### 1,234,567 ", "1234567"),
        ("a #### 3 #### 4", "4"),  # after the last marker
        ("#### 1,2", "1,2"),  # not a thousands separator
        ("#### -3.5", "-3.5"),
        ("  46 ", "46"),  # no marker: only stripped
        ("1,000", "1,000"),  # no marker: left alone
    ],
)
def test_reference_answer(raw: str, expected: str) -> None:
    assert reference_answer(raw) == expected


def test_jsonl_custom_keys_numeric_answer_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "custom.jsonl"
    path.write_text(
        json.dumps({"problem": "2+2?", "solution": 4, "extra": 1})
        + "\n\n"
        + json.dumps({"problem": "Big?", "solution": "so #### 1,000"})
        + "\n"
    )
    prompts = load_prompts(path, question_key="problem", answer_key="solution")
    assert prompts == [Prompt(0, "2+2?", "4"), Prompt(1, "Big?", "1000")]


def test_missing_column_names_key_line_and_config_fields(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}, {"problem": "q", "answer": "2"}]
    )
    with pytest.raises(ValueError) as err:
        load_jsonl(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "line 2" in msg
    assert "'question'" in msg
    assert "['answer', 'problem']" in msg  # the keys the row does have
    assert "data.question_key" in msg and "data.answer_key" in msg


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": }\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: invalid JSON"):
        load_jsonl(path)


def test_row_not_an_object(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "list.jsonl", [["q", "a"]])
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        load_jsonl(path)


def test_null_value_and_non_utf8(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "null.jsonl", [{"question": "q", "answer": None}])
    with pytest.raises(ValueError, match="line 1: 'answer' is null"):
        load_jsonl(path)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "caf\xe9", "answer": "1"}\n')  # latin-1 e-acute
    with pytest.raises(ValueError, match=r"latin1\.jsonl is not UTF-8 text"):
        load_jsonl(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl does not exist.*data\.path"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="is a directory"):
        load_jsonl(tmp_path)


def test_empty_dataset(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl has no rows"):
        load_prompts(path)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"unknown prompt file type '\.csv'.*\.jsonl"):
        load_prompts(path)


def test_parquet_round_trip_and_missing_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["1+1=", "Sum?"], "a": ["2", "x\n#### 2,500"]}), path)
    assert load_prompts(path, question_key="q", answer_key="a") == [
        Prompt(0, "1+1=", "2"),
        Prompt(1, "Sum?", "2500"),
    ]
    with pytest.raises(ValueError) as err:
        load_parquet(path)
    assert "no column 'question'" in str(err.value)
    assert "['q', 'a']" in str(err.value)
    assert "data.question_key" in str(err.value)


# --------------------------------------------------------------------------------------------
# Arithmetic


def test_arithmetic_is_deterministic_and_seeded() -> None:
    a = arithmetic_prompts(50, seed=3, split="train")
    assert a == arithmetic_prompts(50, seed=3, split="train")
    assert a != arithmetic_prompts(50, seed=4, split="train")
    # prompt_id encodes (op, a, b): "12+34=" is 1234 whatever the seed.
    for p in a:
        x, y = p.question[:-1].split("+")
        assert p.prompt_id == int(x) * 100 + int(y)


def test_arithmetic_answers_are_correct() -> None:
    for ops in ("+", "-", "*", "+-*"):
        for split in ("train", "eval"):
            prompts = arithmetic_prompts(500, seed=0, split=split, ops=ops)
            for p in prompts:
                assert p.question.endswith("=")
                operands = p.question[:-1].replace("-", " ").replace("+", " ").replace("*", " ").split()
                assert all(len(x) == 2 for x in operands)  # exactly two digits
                assert p.answer == str(eval(p.question[:-1]))
    assert Prompt(1234, "12+34=", "46") in arithmetic_prompts(7198, seed=0, split="train")


def test_arithmetic_splits_are_disjoint_and_cover_everything() -> None:
    for digits, ops in ((1, "+"), (2, "+"), (2, "+-*")):
        train = set(arithmetic_problem_ids("train", digits=digits, ops=ops))
        held_out = set(arithmetic_problem_ids("eval", digits=digits, ops=ops))
        assert not train & held_out
        n_operands = 10 if digits == 1 else 90
        assert len(train) + len(held_out) == len(ops) * n_operands**2
    # 2-digit addition: 902 of 8,100 problems are held out (~10%).
    assert len(arithmetic_problem_ids("eval", digits=2, ops="+")) == 902
    # Commuted pairs stay together, so eval cannot be passed by memorising the training twin.
    eval_ids = set(arithmetic_problem_ids("eval", digits=2, ops="+"))
    assert all((pid % 100) * 100 + pid // 100 in eval_ids for pid in eval_ids)


def test_arithmetic_samples_only_from_its_split() -> None:
    held_out = set(arithmetic_problem_ids("eval", digits=2, ops="+"))
    assert all(p.prompt_id in held_out for p in arithmetic_prompts(300, seed=1, split="eval"))
    assert not any(p.prompt_id in held_out for p in arithmetic_prompts(3000, seed=1, split="train"))
    # Large spaces are sampled by rejection on the same hash: 4-digit problems stay disjoint.
    train4 = {p.question for p in arithmetic_prompts(2000, seed=0, split="train", digits=4)}
    eval4 = {p.question for p in arithmetic_prompts(2000, seed=0, split="eval", digits=4)}
    assert not train4 & eval4


def test_arithmetic_with_and_without_replacement() -> None:
    few = arithmetic_prompts(900, seed=0, split="eval")
    assert len({p.prompt_id for p in few}) == 900  # n <= 902: no repeats
    many = arithmetic_prompts(2000, seed=0, split="eval")
    assert len(many) == 2000
    assert len({p.prompt_id for p in many}) <= 902  # n > split: repeats


def test_arithmetic_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split='test'"):
        arithmetic_prompts(1, seed=0, split="test")
    with pytest.raises(ValueError, match="ops='/'"):
        arithmetic_prompts(1, seed=0, split="train", ops="/")


# --------------------------------------------------------------------------------------------
# Long tail


def test_chain_solution_hand_checked() -> None:
    assert chain_solution("sum 3,5,8,1:") == "3+5=8,8+8=16,16+1=17"
    assert chain_solution("12+34=") == "46"
    assert chain_solution("12-34=") == "-22"
    with pytest.raises(ValueError, match="not a synthetic question"):
        chain_solution("What is 2+2?")


def test_sft_text() -> None:
    assert sft_text(Prompt(1234, "12+34=", "46")) == "46"
    assert sft_text(Prompt(0, "sum 9,9,9:", "27")) == "9+9=18,18+9=27"
    assert sft_text(Prompt(0, "Natalia sold clips...", "72")) == "72"


def test_long_tail_answers_and_determinism() -> None:
    prompts = long_tail_prompts(500, seed=0, split="train")
    assert prompts == long_tail_prompts(500, seed=0, split="train")
    for p in prompts:
        solution = chain_solution(p.question)
        # The last number of the reference response is the answer the reward checks.
        assert solution.rsplit("=", 1)[-1] == p.answer
        if p.question.startswith("sum "):
            terms = [int(t) for t in p.question[4:-1].split(",")]
            assert 3 <= len(terms) <= 16
            assert p.answer == str(sum(terms))
            assert solution.count("=") == len(terms) - 1


def test_long_tail_length_ratio() -> None:
    prompts = long_tail_prompts(2000, seed=0, split="train")
    lengths = sorted(len(chain_solution(p.question)) for p in prompts)  # chars == tokens
    p50, p99 = lengths[len(lengths) // 2], lengths[int(0.99 * len(lengths))]
    assert p50 <= 3  # "46" / "124"
    assert p99 >= 90  # ~14-term chains
    assert p99 / p50 >= 8
    tail = sum(p.question.startswith("sum ") for p in prompts)
    assert 150 <= tail <= 250  # tail_prob 0.1 of 2000, +-3.5 sigma


def test_long_tail_splits_disjoint() -> None:
    train = {p.question for p in long_tail_prompts(3000, seed=0, split="train", tail_prob=0.5)}
    held_out = {p.question for p in long_tail_prompts(3000, seed=0, split="eval", tail_prob=0.5)}
    assert not train & held_out


def test_long_tail_ids_unique_per_question() -> None:
    prompts = long_tail_prompts(3000, seed=1, split="train", tail_prob=0.5)
    id_of: dict[str, int] = {}
    for p in prompts:
        assert id_of.setdefault(p.question, p.prompt_id) == p.prompt_id
    assert len(set(id_of.values())) == len(id_of)


# --------------------------------------------------------------------------------------------
# PromptSource


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(i, f"q{i}", str(i)) for i in range(n)]


def test_prompt_source_epochs_are_permutations() -> None:
    source = PromptSource(_prompts(5), seed=0)
    draws = source.take(15)
    assert [index for index, _ in draws] == list(range(15))
    epochs = [[p.prompt_id for _, p in draws[i : i + 5]] for i in (0, 5, 10)]
    assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    assert source.cursor == 15 and source.epoch == 3


def test_prompt_source_deterministic_and_unshuffled() -> None:
    a = [p.prompt_id for _, p in PromptSource(_prompts(7), seed=1).take(20)]
    assert a == [p.prompt_id for _, p in PromptSource(_prompts(7), seed=1).take(20)]
    assert a != [p.prompt_id for _, p in PromptSource(_prompts(7), seed=2).take(20)]
    plain = PromptSource(_prompts(3), seed=0, shuffle=False)
    assert [(i, p.prompt_id) for i, p in plain.take(4)] == [(0, 0), (1, 1), (2, 2), (3, 0)]


def test_prompt_source_resume_mid_epoch() -> None:
    reference = PromptSource(_prompts(5), seed=7)
    expected = reference.take(13)

    first = PromptSource(_prompts(5), seed=7)
    assert first.take(7) == expected[:7]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["cursor"] == 7

    resumed = PromptSource(_prompts(5), seed=7)
    resumed.load_state_dict(state)
    assert resumed.take(6) == expected[7:]


def test_prompt_source_rejects_state_of_other_data() -> None:
    state = PromptSource(_prompts(5), seed=7).state_dict()
    with pytest.raises(ValueError, match="different prompts or seed"):
        PromptSource(_prompts(6), seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="different prompts or seed"):
        PromptSource(_prompts(5), seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptSource([], seed=0)
