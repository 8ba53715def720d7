"""Environments: the calculator's evaluator, the episodes' answers, and EpisodeRun's bookkeeping
of turns, observations, budgets and stop strings, on the tiny model's byte-level tokenizer."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from async_rl.config import EnvConfig, compose
from async_rl.env import (
    MAX_CALC_CHARS,
    DemoTurn,
    Done,
    EpisodeRun,
    Observe,
    Turn,
    calculate,
    env_names,
    make_env,
)
from async_rl.schema import NOT_SAMPLED, FinishReason
from async_rl.text import load_tokenizer, stop_string_end


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("12*34", "408"),
        (" 37 * 48 ", "1776"),
        ("7/2", "3.5"),
        ("8/2", "4"),
        ("7//2", "3"),
        ("-7%3", "2"),
        ("2**10", "1024"),
        ("(1+2)*(3+4)", "21"),
        ("-(-5)", "5"),
        ("1.5*4", "6"),
    ],
)
def test_calculator_computes_arithmetic(expression: str, value: str) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("9**9**9", "exponent"),  # 9**387420489: never computed
        ("10**40", "out of range"),
        ("2**-70", "exponent"),
        ("(" * 1000 + "1" + ")" * 1000, "longer than"),
        ("1" + "+1" * 80, "operations"),
        ("9" * 150 + "*2", "out of range"),
        ("__import__('os').system('true')", "only numbers"),
        ("open('/etc/passwd')", "only numbers"),
        ("a+b", "only numbers"),
        ("'ab'*3", "only numbers"),
        ("lambda: 1", "only numbers"),
        ("[1]*10", "only numbers"),
        ("1/0", "division by zero"),
        ("0**-1", "division by zero"),
        ("(-8)**0.5", "fractional power"),
        ("what is 2+2", "only numbers"),  # parses: a comparison of names
        ("two plus two", "not an arithmetic expression"),
        ("1+", "not an arithmetic expression"),
        ("", "empty"),
        ("1e308*10", "out of range"),
        ("True+1", "only numbers"),
    ],
)
def test_calculator_answers_hostile_input_with_an_error_string_quickly(expression: str, reason: str) -> None:
    start = time.perf_counter()
    answer = calculate(expression)
    elapsed = time.perf_counter() - start
    assert answer.startswith("error: ") and reason in answer, answer
    # Generous: the limits make any input cost microseconds; sympy-style evaluation of
    # 9**9**9 would not finish at all.
    assert elapsed < 0.5, elapsed


def test_calculator_takes_deep_parentheses_within_its_length_limit() -> None:
    assert calculate("(" * 90 + "6*7" + ")" * 90) == "42"


def test_calculator_refuses_an_expression_over_its_length_limit() -> None:
    assert calculate("1+" * (MAX_CALC_CHARS // 2) + "1").startswith("error: expression longer")


def test_calculator_episode_observes_a_call_and_scores_the_final_answer() -> None:
    env = make_env(EnvConfig(kind="calculator", max_turns=3))
    episode = env.start("37*48=", "1776")
    call = Turn("<calc>37*48</calc>", [], "stop_string", last=False)
    assert episode.step(call) == Observe("=1776\n")
    assert episode.step(Turn("1776", [], "eos", last=False)) == Done(1.0)
    assert (episode.tool_calls, episode.tool_errors) == (1, 0)
    # The response is scored whole: stopping right after the result answers with it, and a
    # restated wrong number is the answer.
    for final, reward in (("", 1.0), ("so 1777", 0.0)):
        episode = env.start("37*48=", "1776")
        episode.step(call)
        assert episode.step(Turn(final, [], "eos", last=False)) == Done(reward)
    # Without a call, the answer is the policy's own.
    assert env.start("37*48=", "1776").step(Turn("1776", [], "eos", last=False)) == Done(1.0)
    # A bad expression is answered with the error, and counted.
    episode = env.start("37*48=", "1776")
    assert episode.step(Turn("<calc>37*x</calc>", [], "stop_string", last=False)) == Observe(
        "=error: only numbers, + - * / // % ** and parentheses\n"
    )
    assert episode.step(Turn("<calc>", [], "eos", last=False)) == Done(0.0)
    assert (episode.tool_calls, episode.tool_errors) == (1, 1)
    # A call in the last turn cannot be answered: the episode scores 0.
    episode = env.start("37*48=", "1776")
    assert episode.step(Turn("<calc>37*48</calc>", [], "stop_string", last=True)) == Done(0.0)


def test_guess_episode_answers_higher_lower_and_ends_on_the_number() -> None:
    env = make_env(EnvConfig(kind="guess", max_turns=4))
    episode = env.start("Guess 1-15:", "11")
    assert episode.step(Turn("8", [], "eos", last=False)) == Observe("higher\n")
    assert episode.step(Turn("12", [], "eos", last=False)) == Observe("lower\n")
    assert episode.step(Turn("hm", [], "eos", last=False)) == Observe("invalid\n")
    assert episode.step(Turn("11", [], "eos", last=True)) == Done(1.0)
    assert episode.tool_errors == 1
    assert env.start("Guess 1-15:", "11").step(Turn("3", [], "eos", last=True)) == Done(0.0)


def test_guess_demonstrations_only_guess_numbers_still_possible() -> None:
    env = make_env(EnvConfig(kind="guess", max_turns=4))
    rng = random.Random(0)
    wins = 0
    for target in range(1, 16):
        for _ in range(40):
            low, high = 1, 15
            turns = env.demonstration("Guess 1-15:", str(target), rng)
            assert 1 <= len(turns) <= 4 and all(t.eos for t in turns) and turns[-1].observation == ""
            for turn in turns:
                guess = int(turn.text)
                assert low <= guess <= high
                if turn is turns[-1]:
                    break  # the environment's last word is the reward, not an observation
                if guess < target:
                    assert turn.observation == "higher\n"
                    low = guess + 1
                elif guess > target:
                    assert turn.observation == "lower\n"
                    high = guess - 1
            wins += int(turns[-1].text) == target
    # The uniform-among-possible player wins 0.604 of the time at 15 numbers and 4 turns
    # (by dynamic programming over the interval size); 600 episodes land within 0.06.
    assert abs(wins / 600 - 0.604) < 0.06, wins / 600


def test_calculator_demonstrations_use_the_tool_on_the_configured_fraction() -> None:
    env = make_env(EnvConfig(kind="calculator", demo_tool_frac=0.25))
    rng = random.Random(0)
    demos = [env.demonstration("What is 37*48=?", "1776", rng) for _ in range(400)]
    with_tool = [d for d in demos if len(d) == 2]
    assert with_tool[0] == [
        DemoTurn("<calc>37*48</calc>", eos=False, observation="=1776\n"),
        DemoTurn("", eos=True),
    ]
    assert all(d == [DemoTurn("1776", eos=True)] for d in demos if len(d) == 1)
    assert abs(len(with_tool) / 400 - 0.25) < 0.06


def test_env_kind_is_checked_in_the_config_with_the_choices() -> None:
    assert {"math", "calculator", "guess"} <= set(env_names())
    with pytest.raises(ValueError, match=r"env.kind='calculater': no such environment; choose one of \["):
        compose("train", ["env.kind=calculater"])
    with pytest.raises(ValueError, match=r"env\.max_turns=0"):
        compose("train", ["env.max_turns=0"])


# ---------------------------------------------------------------------------- running episodes


def test_stop_string_end_is_the_shortest_prefix_holding_the_string(tokenizer) -> None:
    ids = _ids(tokenizer, "ab<calc>1+2</calc>tail")
    end = stop_string_end(tokenizer, ids, ("</calc>",))
    assert tokenizer.decode(ids[:end]) == "ab<calc>1+2</calc>"
    assert stop_string_end(tokenizer, ids, ("</x>",)) is None
    assert stop_string_end(tokenizer, ids, ()) is None


def test_two_turn_calculator_episode_by_value(tokenizer) -> None:
    env = make_env(EnvConfig(kind="calculator", max_turns=2, max_observation_tokens=64))
    eos = tokenizer.eos_token_id
    run = EpisodeRun(env, "37*48=", "1776", tokenizer=tokenizer, stop_ids=frozenset({eos}), max_new_tokens=40)
    # Turn 1 as SGLang would return it: run on past the stop string to EOS. Cut at the string.
    first = [*_ids(tokenizer, "<calc>37*48</calc>junk"), eos]
    assert run.end_turn(first, [-0.5] * len(first), [3] * len(first), "stop")
    call = _ids(tokenizer, "<calc>37*48</calc>")
    observed = _ids(tokenizer, "=1776\n")
    assert run.token_ids == call + observed
    assert run.sampled == [True] * len(call) + [False] * len(observed)
    assert run.logprobs == [-0.5] * len(call) + [0.0] * len(observed)
    assert run.versions == [3] * len(call) + [NOT_SAMPLED] * len(observed)
    assert run.budget_left == 40 - 18 - 6
    # Turn 2, sampled partly by version 3 and partly by 4 (an update inside the turn).
    second = [*_ids(tokenizer, "1776"), eos]
    assert not run.end_turn(second, [-0.1] * 5, [3, 3, 4, 4, 4], "stop")
    assert run.reward == 1.0 and run.finish is FinishReason.STOP and run.turns == 2
    assert run.versions[-5:] == [3, 3, 4, 4, 4] and run.sampled[-5:] == [True] * 5
    assert (run.state.tool_calls, run.state.tool_errors) == (1, 0)


def test_observations_are_cut_to_the_limit_and_the_budget(tokenizer) -> None:
    env = make_env(EnvConfig(kind="guess", max_turns=4, max_observation_tokens=3))
    eos = tokenizer.eos_token_id
    run = EpisodeRun(
        env, "Guess 1-15:", "11", tokenizer=tokenizer, stop_ids=frozenset({eos}), max_new_tokens=9
    )
    guess = [*_ids(tokenizer, "8"), eos]
    assert run.end_turn(guess, [-1.0, -1.0], [0, 0], "stop")
    assert run.token_ids == guess + _ids(tokenizer, "hig")  # "higher\n" cut to 3 tokens
    # 2 tokens of budget left after the next guess: the observation keeps one for the turn after.
    assert run.end_turn([*_ids(tokenizer, "9"), eos], [-1.0, -1.0], [0, 0], "stop")
    assert run.token_ids[-3:] == [*_ids(tokenizer, "9"), eos, *_ids(tokenizer, "h")]
    assert run.budget_left == 1 and run.sampled[-3:] == [True, True, False]
    # The next turn is the last (fewer than two tokens left): a wrong guess scores 0.
    assert not run.end_turn(_ids(tokenizer, "7"), [-1.0], [0], "length")
    assert run.reward == 0.0 and run.finish is FinishReason.LENGTH and run.turns == 3


def test_max_turns_ends_the_episode(tokenizer) -> None:
    env = make_env(EnvConfig(kind="guess", max_turns=2))
    eos = tokenizer.eos_token_id
    run = EpisodeRun(
        env, "Guess 1-15:", "11", tokenizer=tokenizer, stop_ids=frozenset({eos}), max_new_tokens=40
    )
    assert run.end_turn([*_ids(tokenizer, "3"), eos], [-1.0] * 2, [0] * 2, "stop")
    assert not run.end_turn([*_ids(tokenizer, "4"), eos], [-1.0] * 2, [0] * 2, "stop")
    assert run.reward == 0.0 and run.turns == 2 and run.finish is FinishReason.STOP


def test_math_env_is_one_turn_scored_by_math_reward(tokenizer) -> None:
    env = make_env(EnvConfig(kind="math", max_turns=4))
    eos = tokenizer.eos_token_id
    run = EpisodeRun(env, "12+34=", "46", tokenizer=tokenizer, stop_ids=frozenset({eos}), max_new_tokens=6)
    assert not run.end_turn([*_ids(tokenizer, "46"), eos], [-1.0] * 3, [0] * 3, "stop")
    assert run.reward == 1.0 and run.sampled == [True] * 3 and run.turns == 1


def test_the_worked_example_in_the_docs_runs(tokenizer) -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "environments.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.splitlines()) < 60
    exec(compile(code, "docs/environments.md", "exec"), {"__name__": "docs_example"})
    env = make_env(EnvConfig(kind="retry", max_turns=2))
    eos = tokenizer.eos_token_id
    run = EpisodeRun(env, "12+34=", "46", tokenizer=tokenizer, stop_ids=frozenset({eos}), max_new_tokens=24)
    assert run.end_turn([*_ids(tokenizer, "45"), eos], [-1.0] * 3, [0] * 3, "stop")
    assert run.sampled[3:] == [False] * len(_ids(tokenizer, " wrong, again:"))
    assert not run.end_turn([*_ids(tokenizer, "46"), eos], [-1.0] * 3, [0] * 3, "stop")
    assert run.reward == 0.5 and run.state.tool_errors == 1 and run.turns == 2


def test_env_module_is_imported_and_a_missing_one_is_named() -> None:
    with pytest.raises(ValueError, match=r"env.module=.no_such_envs. cannot be imported"):
        EnvConfig(module="no_such_envs")
    assert EnvConfig(module="async_rl.env", kind="guess").kind == "guess"
