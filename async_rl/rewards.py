"""Verifiable reward for math answers: extract the final answer, compare it with the reference.

``math_reward`` runs in the actor's generation loop, once per sampled response, so it must be
cheap on the common case and never raise or stall on the rest. Nearly every GSM8K-style answer
is a plain number, which an exact ``Fraction`` comparison settles in microseconds; only the
rest (LaTeX, expressions) goes to math-verify, whose parser and sympy backend are slow and,
without a timeout, never finish on some answers of a dozen characters (``10^{10^{10}}``).
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from fractions import Fraction
from typing import Any

logger = logging.getLogger(__name__)

# No real final answer is longer; a longer one is garbage, and math-verify's parse time grows
# with length (a 256-character list of nested tuples takes seconds).
_MAX_ANSWER_CHARS = 256
# Deepest bracket nesting sent to math-verify; real answers rarely exceed 3 or 4.
_MAX_NESTING = 6
# Refuse to let sympy build any number with more decimal digits than this. A length cap
# alone does not bound the work: ``10^{10^{10}}`` is 12 characters and never finishes.
_MAX_LOG10 = 10_000.0

# A sign counts only where it cannot be a subtraction or a hyphen ("3-4 hours" is not -4).
_SIGN = r"(?:(?<![\w)\]}])-)?"
# Thousands commas only in groups of three, so the list "1,2,3" stays three numbers.
_UNSIGNED = r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(rf"{_SIGN}{_UNSIGNED}(?:/\d+)?")
# A leading number must end where the math ends: "42 apples" gives 42, "2^{10}" gives nothing.
_LEADING_NUMBER = re.compile(rf"-?{_UNSIGNED}(?:/\d+)?(?=$|[\s.,;:!?)]|\\text)")
_EXACT_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+|\d+/\d+)")
# Escaped braces ("\\{1, 2\\}", a set) are matched so that they can be skipped.
_BOXED_OR_BRACE = re.compile(r"\\boxed\s*\{|\\[{}]|[{}]")
_HASHES = re.compile(r"####[ \t]*(.*)")
# "The answer is 42", "Final answer: 42", and "A: 42" at the start of a line; "a:" elsewhere
# is too often a label ("case a: ...") to count.
_PHRASE = re.compile(r"(?im)(?:answer\s*(?:is\b\s*:?|:)|^[ \t]*(?-i:A)[ \t]*:)[ \t]*(.*)$")


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``, nested braces included.

    One pass over the braces with a stack, so ``"\\boxed{" * 10_000`` stays linear; a
    truncated last box (no closing brace) is skipped in favour of an earlier complete one.
    """
    stack: list[int] = []  # content start of each open brace; -1 for a brace not opening a box
    last_start, last = -1, None
    for m in _BOXED_OR_BRACE.finditer(text):
        tok = m.group()
        if tok in ("\\{", "\\}"):
            continue
        if tok == "{":
            stack.append(-1)
        elif tok != "}":
            stack.append(m.end())
        elif stack:
            start = stack.pop()
            if start > last_start:
                last_start, last = start, text[start : m.start()]
    return last


def _clean_span(span: str) -> str | None:
    """The answer stated in the rest of a line after ``####`` or "the answer is"."""
    span = re.sub(r"\\[()\[\]]|[$*]", "", span).strip()
    span = re.split(r"\.(?:\s|$)", span, maxsplit=1)[0].strip()  # end of the sentence
    if m := _LEADING_NUMBER.match(span):
        return m.group()
    # Without a leading number, keep only what looks like math: "The answer is not obvious"
    # is prose, and the next rule (or an earlier phrase) is the better guess.
    return span if re.search(r"[\d\\]", span) else None


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``, or ``None`` when it states none.

    In priority order: the last ``\\boxed{...}``; the last ``#### ...`` (GSM8K); the last
    "the answer is ..." / "answer: ..." / "A: ..."; else the last number in the text. Units
    after a stated number are dropped ("42 apples" gives "42"); thousands commas are kept and
    removed only when comparing.
    """
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    for pattern in (_HASHES, _PHRASE):
        for m in reversed(list(pattern.finditer(text))):
            if (answer := _clean_span(m.group(1))) is not None:
                return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalize(answer: str) -> str:
    # LaTeX spacing and currency marks carry no value: "\$1{,}000" is 1000.
    answer = re.sub(r"\\[$!,;: ]|\$", "", answer).replace("{,}", ",").strip()
    return answer.rstrip(".").strip()


def _as_fraction(answer: str) -> Fraction | None:
    """Exact value of a plain number, or ``None``.

    Only our own number grammar reaches ``Fraction``: it also accepts "1e999999999", whose
    value takes minutes to build.
    """
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer)
    if not _EXACT_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except ZeroDivisionError:  # "1/0" is no number; leave it to math-verify
        return None


def _nesting_depth(text: str) -> int:
    depth = peak = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            peak = max(peak, depth)
        elif ch in ")]}":
            depth -= 1
    return peak


def _log10_bound(expr: Any) -> float:
    """Upper bound on log10 of the largest number sympy may build while simplifying ``expr``.

    Towers and factorials are what hang sympy, and the bound grows exponentially through
    them. Symbols count as zero: sympy cannot evaluate ``x^{x^{x}}``, so it is cheap.
    """
    import sympy

    if isinstance(expr, sympy.Rational):
        return 0.30103 * max(abs(expr.p).bit_length(), expr.q.bit_length(), 1)
    if isinstance(expr, sympy.Float):  # float() of a huge Float is inf, and inf is rejected
        return 0.30103 + math.log10(abs(float(expr)) + 1.0)
    args = [_log10_bound(a) for a in expr.args if isinstance(a, sympy.Basic)]
    if isinstance(expr, sympy.Pow) and len(args) == 2:
        base, exponent = args
        return math.inf if exponent > 300 else base * 10.0**exponent
    if isinstance(expr, sympy.exp) and args:
        return math.inf if args[0] > 300 else 10.0 ** args[0]
    if isinstance(expr, (sympy.factorial, sympy.factorial2, sympy.gamma, sympy.binomial)) and args:
        return math.inf if args[0] > 300 else args[0] * 10.0 ** args[0]  # log10(n!) <= n log10(n)
    if isinstance(expr, sympy.Mul):
        return sum(args)
    if isinstance(expr, sympy.Add):
        return max(args) + math.log10(len(args))
    return max(args, default=0.0)


def _math_verify_equal(answer: str, reference: str, timeout_s: float) -> bool:
    """Symbolic equality by math-verify, for answers that are not both plain numbers.

    Off the main thread nothing can interrupt math-verify, and the caps here do not cover
    everything: its parser evaluates ``\\binom{10^{9}}{500000}`` eagerly. Score from the main
    thread (as the actor does) where inputs may be hostile.
    """
    # Lazy: math-verify pulls in sympy and an ANTLR parser (about a second to import), and
    # most calls never get here.
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    # math-verify parses in time superlinear in bracket depth and compares nested sets in
    # exponential time ("{" * 20 ran for over a minute), so deep answers are refused outright.
    if max(_nesting_depth(answer), _nesting_depth(reference)) > _MAX_NESTING:
        return False
    # math-verify's own timeout is signal.alarm: off the main thread it raises ValueError, and
    # on the main thread it would cancel anyone else's pending alarm (pytest-timeout, a
    # watchdog). So it is used only on the main thread with no timer armed. It counts whole
    # seconds and bounds each of the three steps separately.
    use_alarm = threading.current_thread() is threading.main_thread()
    use_alarm = use_alarm and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    limit = max(1, math.ceil(timeout_s)) if use_alarm else None
    try:
        # Wrapped in $...$ so that the LaTeX extractor reads "\frac{3}{4}" as math.
        gold = parse(f"${reference}$", parsing_timeout=limit)
        pred = parse(f"${answer}$", parsing_timeout=limit)
        if not gold or not pred:
            return False
        # Parsing leaves 9^{9^{9}} unevaluated; comparing would evaluate it, which no alarm
        # interrupts off the main thread (and which costs the full timeout on it).
        if any(_log10_bound(e) > _MAX_LOG10 for e in (*gold, *pred) if not isinstance(e, str)):
            logger.debug("math-verify skipped: %r vs %r builds too large a number", answer, reference)
            return False
        return bool(verify(gold, pred, timeout_seconds=limit))
    except TimeoutException:  # a BaseException; math-verify normally catches it itself
        return False


def math_reward(response: str, answer: str, *, timeout_s: float = 2.0) -> float:
    """1.0 when the final answer in ``response`` equals ``answer``, else 0.0.

    ``answer`` is the reference: a bare answer ("72", "\\frac{3}{4}") is used as it is, a full
    GSM8K solution (with ``####``) is reduced to its final answer first. Two plain numbers are
    compared exactly ("72" == "72.00" == "$72", "1,000" == "1000", "3/4" == "0.75"); anything
    else goes to math-verify. ``timeout_s`` bounds each math-verify step on the main thread;
    elsewhere caps on length, nesting and number size limit it (see ``_math_verify_equal``).

    Never raises on any input; a missing math-verify install does raise ``ImportError``.
    """
    try:
        predicted = extract_answer(response)
        reference = extract_answer(answer) if "####" in answer else answer
        if predicted is None or reference is None:
            return 0.0
        predicted, reference = _normalize(predicted), _normalize(reference)
        if not predicted or not reference:
            return 0.0
        if len(predicted) > _MAX_ANSWER_CHARS or len(reference) > _MAX_ANSWER_CHARS:
            return 0.0
        pred_value, ref_value = _as_fraction(predicted), _as_fraction(reference)
        if pred_value is not None and ref_value is not None:
            return float(pred_value == ref_value)
        return float(_math_verify_equal(predicted, reference, timeout_s))
    except ImportError:
        raise  # a broken install, not a bad input: scoring every response 0 would hide it
    except Exception:
        logger.debug("math_reward failed on %.200r vs %.200r", response, answer, exc_info=True)
        return 0.0
