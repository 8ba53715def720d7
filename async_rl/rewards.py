"""Verifiable reward for math answers: extract the final answer, compare it with the reference.

``math_reward`` runs inside the actor's generation loop, once per sampled response, so it must
be cheap on the common case and can never raise or hang on the rest. Nearly every GSM8K-style
answer is a plain number, which an exact ``Fraction`` comparison settles in microseconds; only
the rest (LaTeX, expressions) goes to math-verify, whose sympy backend is slow and can be
made to run for hours by a short answer such as ``9^{9^{9}}``.
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

# No real final answer is this long; a longer one is garbage or an attack on the parser, and
# the cap bounds the LaTeX parser's work on the math-verify path.
_MAX_ANSWER_CHARS = 512
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
    except ZeroDivisionError:  # "1/0" is not a number; math-verify will say no as well
        return None


def _log10_bound(expr: Any) -> float:
    """Upper bound on log10 of the largest number sympy may build while simplifying ``expr``.

    Towers and factorials are the inputs that hang sympy, and the bound grows exponentially
    through them. Symbols count as order one; an unknown node is as large as its largest child.
    """
    import sympy

    if isinstance(expr, sympy.Rational):
        return 0.30103 * max(abs(expr.p).bit_length(), expr.q.bit_length(), 1)
    if isinstance(expr, sympy.Float):  # float() of a huge Float is inf, and inf is rejected
        return 0.30103 + math.log10(abs(float(expr)) + 1.0)
    args = [_log10_bound(a) for a in getattr(expr, "args", ()) if isinstance(a, sympy.Basic)]
    if isinstance(expr, sympy.Pow) and len(args) == 2:
        base, exp = args
        return math.inf if exp > 300 else base * 10.0**exp
    if isinstance(expr, sympy.exp) and args:
        return math.inf if args[0] > 300 else 10.0 ** args[0]
    if isinstance(expr, (sympy.factorial, sympy.factorial2, sympy.gamma, sympy.binomial)) and args:
        n = args[0]
        return math.inf if n > 300 else n * 10.0**n  # log10(n!) <= n log10(n)
    if isinstance(expr, sympy.Mul):
        return sum(args)
    return max(args, default=1.0) + 1.0


def _math_verify_equal(answer: str, reference: str, timeout_s: float) -> bool:
    """Symbolic equality by math-verify, bounded in time without relying on signals."""
    # Lazy: math-verify pulls in sympy and an ANTLR parser (about a second to import), and
    # most runs never get here. Imported outside math_reward's catch-all so that a broken
    # install fails loudly instead of scoring every response 0.
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    # math-verify's own timeout is signal.alarm: it raises ValueError off the main thread,
    # and on the main thread it would cancel anyone else's pending alarm (pytest-timeout,
    # a supervisor's watchdog). Use it only on the main thread with no timer armed; it
    # counts whole seconds and bounds each of the three steps separately.
    use_alarm = threading.current_thread() is threading.main_thread()
    use_alarm = use_alarm and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    limit = max(1, math.ceil(timeout_s)) if use_alarm else None
    try:
        # Wrapped in $...$ so the LaTeX extractor sees "\frac{3}{4}" as math, not prose.
        gold = parse(f"${reference}$", parsing_timeout=limit)
        pred = parse(f"${answer}$", parsing_timeout=limit)
        if not gold or not pred:
            return False
        # Where no alarm can interrupt sympy, the magnitude bound is the only time limit.
        if any(_log10_bound(e) > _MAX_LOG10 for e in (*gold, *pred) if not isinstance(e, str)):
            logger.debug("math-verify skipped: %r or %r builds too large a number", answer, reference)
            return False
        return bool(verify(gold, pred, timeout_seconds=limit))
    except TimeoutException:  # a BaseException; normally caught inside math-verify already
        return False


def math_reward(response: str, answer: str, *, timeout_s: float = 2.0) -> float:
    """1.0 when the final answer in ``response`` equals ``answer``, else 0.0. Never raises.

    ``answer`` is the reference: a bare answer ("72", "\\frac{3}{4}") is used as it is, a full
    GSM8K solution (with ``####``) is reduced to its final answer first. Two plain numbers are
    compared exactly ("72" == "72.00" == "$72", "1,000" == "1000", "3/4" == "0.75"); anything
    else goes to math-verify, with ``timeout_s`` per step where a signal can enforce it (main
    thread) and a cap on answer length and number size everywhere.
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
    except Exception:
        logger.debug("math_reward failed on %.200r", response, exc_info=True)
        return 0.0
    try:
        return float(_math_verify_equal(predicted, reference, timeout_s))
    except ImportError:
        raise
    except Exception:
        logger.debug("math-verify failed on %r vs %r", predicted, reference, exc_info=True)
        return 0.0
