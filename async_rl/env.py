"""Environments: what answers the policy between its turns, and what scores an episode.

An episode starts from one prompt row (question, reference answer). The policy writes a
turn; the turn ends at an EOS token, at one of the environment's ``stop_strings``, or when the
response's token budget (``rollout.max_new_tokens``, observations included) runs out. The
environment then either answers with an ``Observe`` (text the actor tokenizes and appends to
the same sequence: prefilled, never sampled, masked out of the loss) or ends the episode with
``Done(reward)``. A ``Turn`` with ``last=True`` cannot be followed by another (``env.max_turns``
reached, or too little budget left): the environment must answer it with ``Done``.

Environments are registered by name (``@register("calculator")``) and chosen with
``env.kind``. Three ship: ``math`` (single turn, the default: the response is scored with
``math_reward``), ``calculator`` and ``guess``; ``docs/environments.md`` shows how to write one.

The actor runs episodes (``actors/actor.py``); the learner evaluates with them and warm-starts
from their ``demonstration``s. Both call only what is defined here.
"""

from __future__ import annotations

import ast
import logging
import math
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from async_rl.rewards import math_reward
from async_rl.schema import NOT_SAMPLED, FinishReason
from async_rl.text import response_text, stop_string_end, strip_stop

if TYPE_CHECKING:
    from async_rl.config import EnvConfig

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- the interface


@dataclass
class Turn:
    """One policy turn as the environment sees it.

    ``text``: the decoded turn (a final EOS removed); ``token_ids``: exactly what was sampled;
    ``ended_by``: "eos" | "stop_string" | "length"; ``last``: no turn may follow this one."""

    text: str
    token_ids: list[int]
    ended_by: str
    last: bool


@dataclass
class Observe:
    """Append ``text`` to the sequence and let the policy write its next turn."""

    text: str


@dataclass
class Done:
    """The episode is over; ``reward`` is its return."""

    reward: float


@dataclass
class DemoTurn:
    """One turn of a demonstration for the supervised warm start: the policy writes ``text``
    (then EOS if ``eos``), the environment answers ``observation`` ("" after the last turn)."""

    text: str
    eos: bool
    observation: str = ""


class Episode:
    """The state of one episode. ``tool_calls`` and ``tool_errors`` are counted by the
    environment and reported per response (``rollout/tool_calls_mean``, ``rollout/tool_errors``)."""

    def __init__(self) -> None:
        self.tool_calls = 0
        self.tool_errors = 0

    def step(self, turn: Turn) -> Observe | Done:
        raise NotImplementedError


class Environment:
    """A kind of episode. Subclasses set ``stop_strings`` (texts that end a policy turn, besides
    EOS) and implement ``start`` and ``demonstration``."""

    name = ""
    stop_strings: tuple[str, ...] = ()
    multi_turn = True

    def __init__(self, cfg: EnvConfig) -> None:
        self.cfg = cfg  # the env section of the config: max_turns and the environment's settings

    def start(self, question: str, answer: str) -> Episode:
        raise NotImplementedError

    def demonstration(self, question: str, answer: str, rng: random.Random) -> list[DemoTurn]:
        """A good episode for ``(question, answer)``, for the warm start to imitate."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Environment]] = {}


def register(name: str) -> Callable[[type[Environment]], type[Environment]]:
    """Class decorator: make an environment available as ``env.kind=name``."""

    def add(cls: type[Environment]) -> type[Environment]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"environment {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def env_names() -> list[str]:
    return sorted(_REGISTRY)


def make_env(cfg: EnvConfig) -> Environment:
    """The environment ``cfg.kind`` names (``cfg``: the ``env`` section of the config)."""
    cls = _REGISTRY.get(cfg.kind)
    if cls is None:
        raise ValueError(f"env.kind={cfg.kind!r}: no such environment; choose one of {env_names()}")
    return cls(cfg)


# ---------------------------------------------------------------------------- running an episode


class EpisodeRun:
    """One episode in progress: its tokens so far and what the environment said.

    ``end_turn`` takes each policy turn as the engine returned it: it cuts the turn at the
    environment's first stop string (SGLang and the learner's greedy eval do not stop on them),
    hands it to the environment and appends the observation's tokens (``sampled`` false,
    logprob 0, version ``NOT_SAMPLED``), or records the reward. The token budget
    ``max_new_tokens`` covers the whole response, observations included; a turn is the last
    one after ``env.max_turns`` turns or when fewer than two tokens of budget are left (one
    observation token and one sampled token). The actor (``actors/episodes.py``) and the
    learner's evaluation both run episodes with it.
    """

    def __init__(
        self,
        env: Environment,
        question: str,
        answer: str,
        *,
        tokenizer: Any,
        stop_ids: frozenset[int],
        max_new_tokens: int,
    ) -> None:
        self.env = env
        self.state = env.start(question, answer)
        self.max_turns = env.cfg.max_turns if env.multi_turn else 1
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.max_new_tokens = max_new_tokens
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.sampled: list[bool] = []
        self.turns = 0
        self.reward: float | None = None  # set when the episode is over
        self.finish = FinishReason.STOP

    @property
    def over(self) -> bool:
        return self.reward is not None

    @property
    def budget_left(self) -> int:
        return self.max_new_tokens - len(self.token_ids)

    def end_turn(self, tokens: list[int], logprobs: list[float], versions: list[int], finish: str) -> bool:
        """Record one turn (``finish``: the engine's "stop" | "length" | "stop_string"). True if
        the policy writes another turn, on ``token_ids`` as the context."""
        ended_by = {"stop": "eos", "length": "length"}.get(finish, "stop_string")
        cut = stop_string_end(self.tokenizer, tokens, self.env.stop_strings)
        if cut is not None:  # the turn ends at the stop string; tokens run on past it are dropped
            tokens, ended_by = tokens[:cut], "stop_string"
        n = len(tokens)
        self.token_ids += tokens
        self.logprobs += logprobs[:n]
        self.versions += versions[:n]
        self.sampled += [True] * n
        self.turns += 1
        left = self.budget_left
        last = self.turns >= self.max_turns or left < 2 or ended_by == "length"
        text = response_text(self.tokenizer, strip_stop(tokens, self.stop_ids))
        result = self.state.step(Turn(text, tokens, ended_by, last))
        if isinstance(result, Done) or last:
            if not isinstance(result, Done):
                logger.warning(
                    "environment %s answered the last turn with an observation; reward 0", self.env.name
                )
            self.reward = float(result.reward) if isinstance(result, Done) else 0.0
            self.finish = FinishReason.LENGTH if ended_by == "length" or left <= 0 else FinishReason.STOP
            return False
        observed = self.tokenizer(result.text, add_special_tokens=False)["input_ids"]
        observed = list(observed[: min(self.env.cfg.max_observation_tokens, left - 1)])
        self.token_ids += observed
        self.logprobs += [0.0] * len(observed)
        self.versions += [NOT_SAMPLED] * len(observed)
        self.sampled += [False] * len(observed)
        return True


# ---------------------------------------------------------------------------- math (single turn)


@register("math")
class MathEnv(Environment):
    """One turn: the response is the answer, scored by ``math_reward`` against the reference."""

    multi_turn = False

    def start(self, question: str, answer: str) -> Episode:
        return _MathEpisode(answer)

    def demonstration(self, question: str, answer: str, rng: random.Random) -> list[DemoTurn]:
        from async_rl.data import Prompt, sft_text

        return [DemoTurn(sft_text(Prompt(0, question, answer)), eos=True)]


class _MathEpisode(Episode):
    def __init__(self, answer: str) -> None:
        super().__init__()
        self.answer = answer

    def step(self, turn: Turn) -> Done:
        return Done(math_reward(turn.text, self.answer))


# ---------------------------------------------------------------------------- calculator

CALC_OPEN, CALC_CLOSE = "<calc>", "</calc>"
# Limits of the evaluator: an expression of at most this many characters, at most this many
# operators, every intermediate value within +-MAX_CALC_VALUE, exponents within +-MAX_EXPONENT.
MAX_CALC_CHARS = 200
MAX_CALC_OPS = 64
MAX_CALC_VALUE = 10**30
MAX_EXPONENT = 64

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalcError(ValueError):
    """An expression the calculator refuses; the message is what the policy is shown."""


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text, or ``"error: ..."``. Never raises.

    Numbers, ``+ - * / // % **`` and parentheses only, parsed with ``ast`` (nothing is
    evaluated by Python): names, calls, strings and everything else are refused. The work is
    bounded by the limits above, so a hostile expression costs microseconds."""
    try:
        return _format(_evaluate(expression))
    except CalcError as err:
        return f"error: {err}"


def _evaluate(expression: str) -> int | float:
    text = expression.strip()
    if not text:
        raise CalcError("empty expression")
    if len(text) > MAX_CALC_CHARS:
        raise CalcError(f"expression longer than {MAX_CALC_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise CalcError("not an arithmetic expression") from None
    budget = [MAX_CALC_OPS]
    return _node(tree.body, budget)


def _node(node: ast.AST, budget: list[int]) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool, not complex
        value: int | float = node.value  # type: ignore[assignment]
        return _bounded(value)
    budget[0] -= 1
    if budget[0] < 0:
        raise CalcError(f"more than {MAX_CALC_OPS} operations")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _bounded(_UNARY[type(node.op)](_node(node.operand, budget)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _node(node.left, budget), _node(node.right, budget)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
        except (OverflowError, ValueError):
            raise CalcError("result out of range") from None
    raise CalcError("only numbers, + - * / // % ** and parentheses")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise CalcError(f"exponent beyond +-{MAX_EXPONENT}")
    if base == 0 and exponent < 0:
        raise CalcError("division by zero")
    if abs(base) > 1 and exponent * math.log10(abs(base)) > math.log10(MAX_CALC_VALUE):
        raise CalcError("result out of range")
    if base < 0 and not float(exponent).is_integer():
        raise CalcError("fractional power of a negative number")


def _bounded(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("result out of range")
    if abs(value) > MAX_CALC_VALUE:
        raise CalcError("result out of range")
    return value


def _format(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@register("calculator")
class CalculatorEnv(Environment):
    """Arithmetic with a tool. The policy may write ``<calc>EXPR</calc>``; the environment
    appends ``=VALUE`` and a newline (or ``=error: ...``) and the policy goes on. The episode ends
    when a turn ends without a call (EOS or the budget). The whole response, results included,
    is scored with ``math_reward`` (its last number, unless it states an answer otherwise), so
    the policy may stop right after a result or restate it. A call in the last allowed turn
    scores 0.

    Demonstrations call the tool and stop after the result on a fraction
    ``env.demo_tool_frac`` of the prompts, and state the reference answer on the rest."""

    stop_strings = (CALC_CLOSE,)

    def start(self, question: str, answer: str) -> Episode:
        return _CalculatorEpisode(answer)

    def demonstration(self, question: str, answer: str, rng: random.Random) -> list[DemoTurn]:
        match = _PROBLEM.search(question)
        if match is None or rng.random() >= self.cfg.demo_tool_frac:
            return [DemoTurn(answer, eos=True)]
        expression = match.group(1)
        return [
            DemoTurn(f"{CALC_OPEN}{expression}{CALC_CLOSE}", eos=False, observation=observation(expression)),
            DemoTurn("", eos=True),
        ]


# The problem in a question of the arithmetic task ("What is 37*48=?" -> "37*48").
_PROBLEM = re.compile(r"(\d+\s*[-+*/]\s*\d+)")


def observation(expression: str) -> str:
    """What the calculator appends after ``<calc>expression</calc>``."""
    return f"={calculate(expression)}\n"


class _CalculatorEpisode(Episode):
    def __init__(self, answer: str) -> None:
        super().__init__()
        self.answer = answer
        self.transcript = ""  # the policy's turns and the results, as the reader sees them

    def step(self, turn: Turn) -> Observe | Done:
        self.transcript += turn.text
        if turn.ended_by != "stop_string":
            return Done(math_reward(self.transcript, self.answer))
        if turn.last:
            return Done(0.0)  # a call with no turn left to get its result
        self.tool_calls += 1
        start = turn.text.rfind(CALC_OPEN)
        if start < 0:
            self.tool_errors += 1
            result = f"=error: {CALC_CLOSE} without {CALC_OPEN}\n"
        else:
            result = observation(turn.text[start + len(CALC_OPEN) : turn.text.rfind(CALC_CLOSE)])
            self.tool_errors += result.startswith("=error:")
        self.transcript += result
        return Observe(result)


# ---------------------------------------------------------------------------- guess


@register("guess")
class GuessEnv(Environment):
    """Guess the hidden number (the prompt's reference answer) in at most ``env.max_turns``
    turns. Each turn is one guess ending with EOS; the environment answers ``higher`` or
    ``lower`` (a newline after it), or ends the episode with reward 1 on a right guess and 0
    when the turns run out. A turn without a number is answered ``invalid`` and counted in
    ``tool_errors``.

    Demonstrations guess uniformly among the numbers still possible, a strategy that uses the
    answers but is far from bisection: it leaves RL something to learn."""

    def start(self, question: str, answer: str) -> Episode:
        return _GuessEpisode(int(answer))

    def demonstration(self, question: str, answer: str, rng: random.Random) -> list[DemoTurn]:
        low, high = guess_range(question)
        target = int(answer)
        turns = []
        for _ in range(self.cfg.max_turns):
            guess = rng.randint(low, high)
            if guess == target:
                turns.append(DemoTurn(str(guess), eos=True))
                break
            feedback = "higher" if target > guess else "lower"
            turns.append(DemoTurn(str(guess), eos=True, observation=f"{feedback}\n"))
            low, high = (guess + 1, high) if target > guess else (low, guess - 1)
        turns[-1].observation = ""
        return turns


_RANGE = re.compile(r"(-?\d+)\s*(?:-|to|\.\.)\s*(-?\d+)")
_INTEGER = re.compile(r"-?\d+")


def guess_range(question: str) -> tuple[int, int]:
    """The range a guess prompt names ("Guess 1-15:" -> (1, 15))."""
    match = _RANGE.search(question)
    if match is None:
        raise ValueError(f"{question!r} names no range like '1-15'")
    return int(match.group(1)), int(match.group(2))


class _GuessEpisode(Episode):
    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target

    def step(self, turn: Turn) -> Observe | Done:
        match = _INTEGER.search(turn.text)
        if match is not None and int(match.group()) == self.target:
            return Done(1.0)
        if turn.last:
            return Done(0.0)
        if match is None:
            self.tool_errors += 1
            return Observe("invalid\n")
        return Observe("higher\n" if self.target > int(match.group()) else "lower\n")
