"""Answer extraction and the math reward: GSM8K references, hand-made cases, hostile inputs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_rl.rewards import extract_answer, math_reward


def _gsm8k_dir() -> Path:
    env = os.environ.get("ASYNC_RL_GSM8K_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k"


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_references_score_themselves(split: str) -> None:
    path = _gsm8k_dir() / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K {split} split not found at {path}; set ASYNC_RL_GSM8K_DIR to its directory")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows, f"{path} is empty"
    failures = []
    for row in rows:
        solution = row["answer"]
        final = solution.split("####")[-1].strip()
        if math_reward(solution, final) != 1.0 or math_reward(final, final) != 1.0:
            failures.append((final, solution[-80:]))
    assert not failures, f"{len(failures)} of {len(rows)} failed, e.g. {failures[:5]}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the total is \boxed{42}.", "42"),
        (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{1}, on reflection \boxed{2}", "2"),
        (r"\boxed{7} and then a truncated \boxed{8", "7"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        ("48/2 = <<48/2=24>>24\n#### 72", "72"),
        ("#### 1,080", "1,080"),
        ("The answer is 1,234.", "1,234"),
        ("So the final answer is **$18**.", "18"),
        ("Answer: -5", "-5"),
        ("Q: how many?\nA: 7", "7"),
        ("The answer is 42 apples.", "42"),
        (r"The answer is $\frac{1}{2}$.", r"\frac{1}{2}"),
        ("The answer is not obvious. In total there are 42", "42"),
        ("He has 42 apples", "42"),
        ("about 3/4 of a cup", "3/4"),
        ("It costs 2.50 dollars", "2.50"),
        ("The drive takes 3-4 hours", "4"),
        ("The temperature is -5 degrees", "-5"),
        ("case a: 5, so the result is 9", "9"),
        (r"The answer is 5. \boxed{6}", "6"),
        ("#### 3\nThe answer is 4", "3"),
        ("", None),
        ("no numbers here", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        (r"\boxed{42}", "42"),
        (r"\boxed{\frac{3}{4}}", "0.75"),
        (r"\boxed{\frac{\sqrt{4}}{2}}", "1"),
        (r"\boxed{\dfrac12}", r"\frac{1}{2}"),
        ("The answer is 1,234.", "1234"),
        ("$18", "18"),
        ("-5", "-5"),
        ("42 apples", "42"),
        ("A: 7", "7"),
        ("#### 72", "72"),
        ("She sold 48 + 24 = 72 clips.\n#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72"),
        ("First 3, then 5, so 8 in all", "8"),
        ("The ribbon is 12 meters long.", "12"),
        ("2.50", "2.5"),
        ("72.00", "72"),
        ("$72", "72.0"),
        ("1,000", "1000"),
        ("3/4", "0.75"),
        (r"\boxed{42 \text{ apples}}", "42"),
        (r"\boxed{\$1{,}000}", "1000"),
        (r"\boxed{x = 5}", "5"),
    ],
)
def test_correct_answers_score_one(response: str, answer: str) -> None:
    assert math_reward(response, answer) == 1.0


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("-5", "5"),
        (r"\boxed{41}", "42"),
        ("The answer is 7", "8"),
        ("3/4", "0.7"),
        (r"\boxed{\frac{2}{3}}", "0.75"),
        ("1,234", "1.234"),
        ("2.5", "25"),
        ("#### 72", "#### 73"),
        ("", "42"),
        ("no number here", "42"),
        ("42", ""),
    ],
)
def test_wrong_answers_score_zero(response: str, answer: str) -> None:
    assert math_reward(response, answer) == 0.0


# Both plain text and text drawn from the characters answers are made of, so that the
# extraction rules and the math-verify path are reached, not just "no number found".
_MATHY = st.text(alphabet="0123456789.,-+/*^$#:()[]{}\\ abfrcxetsqoxdA\n", max_size=60)
_ANY = st.one_of(st.text(max_size=200), _MATHY)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=_ANY, answer=_ANY)
def test_never_raises_on_any_text(response: str, answer: str) -> None:
    assert math_reward(response, answer) in (0.0, 1.0)


_PATHOLOGICAL = [
    "\\boxed{" * 10_000,
    "9" * 100_000,
    "{" * 5_000 + "1" + "}" * 5_000,
    "{" * 20 + "1" + "}" * 20,
    "(" * 8,
    "1/0",
    r"\boxed{9^{9^{9}}}",
    r"\boxed{10^{10^{10}}}",
    r"\boxed{99999999!}",
    r"\boxed{2^{2^{2^{2^{2}}}}}",
    ",".join(["((((((1))))))"] * 20),
]


@pytest.mark.parametrize("bad", _PATHOLOGICAL, ids=range(len(_PATHOLOGICAL)))
def test_pathological_inputs_score_zero_quickly(bad: str) -> None:
    for response, answer in ((bad, "42"), ("42", bad)):
        start = time.perf_counter()
        assert math_reward(response, answer) == 0.0
        # A safety net against hangs, not a performance test.
        assert time.perf_counter() - start < 5.0


def test_works_off_the_main_thread() -> None:
    # math-verify's own timeout uses signal.alarm, which raises off the main thread.
    cases = [(r"\boxed{\frac{3}{4}}", "0.75", 1.0), ("#### 72", "72", 1.0), (r"\boxed{9^{9^{9}}}", "5", 0.0)]
    results: list[float] = []
    errors: list[BaseException] = []

    def score() -> None:
        try:
            results.extend(math_reward(response, answer) for response, answer, _ in cases)
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=score)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert not errors
    assert results == [expected for _, _, expected in cases]


@pytest.fixture
def no_pending_alarm() -> Iterator[None]:
    """Pause pytest-timeout's SIGALRM timer (if armed) so that math-verify may use its own."""
    delay, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        if delay > 0:
            signal.setitimer(signal.ITIMER_REAL, delay, interval)


@pytest.mark.usefixtures("no_pending_alarm")
def test_main_thread_alarm_bounds_math_verify() -> None:
    # math-verify evaluates this binomial while parsing: only its signal timeout stops it.
    start = time.perf_counter()
    assert math_reward(r"\boxed{\binom{10^{9}}{500000}}", "42", timeout_s=1.0) == 0.0
    assert time.perf_counter() - start < 5.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.usefixtures("no_pending_alarm")
def test_leaves_someone_elses_alarm_alone() -> None:
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert math_reward(r"\boxed{\frac{3}{4}}", "0.75") == 1.0
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 90.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
