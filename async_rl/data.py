"""Prompts: loading question/answer files, the seeded synthetic tasks, and the prompt stream.

A ``Prompt`` is a question and the reference final answer the reward checks against. Files are
jsonl or parquet rows with a question column and an answer column (names configurable).
GSM8K-style answers ("...worked solution...\\n#### 1,000") are reduced to the final answer
("1000").

Two synthetic tasks need no files:

* ``arithmetic_prompts``: "12+34=" -> "46". Train and eval splits are disjoint sets of problems.
* ``long_tail_prompts``: the same short questions, mixed with a ``tail_prob`` fraction of
  "sum 3,5,8,1:" questions whose reference response writes every partial sum, giving a
  long-tailed response-length distribution for length experiments.

``PromptSource`` streams a prompt list forever, reshuffled every epoch, with a resumable cursor.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from async_rl.config import DataConfig, DataKind

__all__ = [
    "Prompt",
    "PromptSource",
    "arithmetic_problem_ids",
    "arithmetic_prompts",
    "chain_solution",
    "guess_prompts",
    "load_jsonl",
    "load_parquet",
    "load_prompts",
    "long_tail_prompts",
    "reference_answer",
    "sft_text",
]


@dataclass(frozen=True)
class Prompt:
    # Stable id of the problem: the row index for files, an encoding of the operands for the
    # synthetic tasks. Unique within one list/split; repeated draws of a problem share it.
    prompt_id: int
    # Text given to the model verbatim (or through the chat template, if the model has one).
    question: str
    # Reference final answer, e.g. "46"; what the reward compares the response's answer with.
    answer: str


# --------------------------------------------------------------------------------------------
# Files


_KEY_FIX = "set data.question_key / data.answer_key to this file's column names"
_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
# "1,000" -> "1000", but not "1,2" (a list) or "3,14" (a decimal comma).
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def reference_answer(raw: str) -> str:
    """The final answer in a reference answer text.

    GSM8K-style text with ``####`` reduces to what follows the last ``####``, stripped, with
    thousands separators removed ("#### 1,000" -> "1000"). Other text is only stripped.
    """
    if "####" not in raw:
        return raw.strip()
    return _THOUSANDS_COMMA.sub("", raw.rsplit("####", 1)[1].strip())


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory; set data.path / data.eval_path to a .jsonl or .parquet file in it"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"prompt file {path} does not exist; set data.path / data.eval_path to an existing "
            ".jsonl or .parquet file"
        )


def _make_prompt(row: Any, where: str, path: Path, index: int, question_key: str, answer_key: str) -> Prompt:
    if not isinstance(row, dict):
        raise ValueError(
            f"{path}, {where}: expected a JSON object with keys {question_key!r} and "
            f"{answer_key!r}, got {type(row).__name__}"
        )
    for key in (question_key, answer_key):
        if key not in row:
            raise ValueError(f"{path}, {where}: row has no {key!r} (keys: {sorted(row)}); {_KEY_FIX}")
        if row[key] is None:
            raise ValueError(f"{path}, {where}: {key!r} is null; fill it in or drop the row")
    question, answer = row[question_key], row[answer_key]
    if not isinstance(question, str):
        raise ValueError(f"{path}, {where}: {question_key!r} must be a string, got {type(question).__name__}")
    # Numeric answers (a common shape for custom datasets) are accepted as their text.
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(
            f"{path}, {where}: {answer_key!r} must be a string or a number, got {type(answer).__name__}"
        )
    return Prompt(prompt_id=index, question=question, answer=reference_answer(str(answer)))


def _nonempty(prompts: list[Prompt], path: Path) -> list[Prompt]:
    if not prompts:
        raise ValueError(f"{path} has no rows; point data.path / data.eval_path at a non-empty file")
    return prompts


def _lines(f: Iterable[str], path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8"
        ) from None


def load_jsonl(
    path: str | Path, *, question_key: str = "question", answer_key: str = "answer"
) -> list[Prompt]:
    """Prompts from a jsonl file: one JSON object per line; blank lines are skipped.

    ``prompt_id`` is the row's index among the non-blank lines (0-based).
    """
    path = Path(path)
    _check_file(path)
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(_lines(f, path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {line_no}: invalid JSON ({e.msg}, column {e.colno}); "
                    "each line must be one JSON object"
                ) from None
            prompts.append(_make_prompt(row, f"line {line_no}", path, len(prompts), question_key, answer_key))
    return _nonempty(prompts, path)


def load_parquet(
    path: str | Path, *, question_key: str = "question", answer_key: str = "answer"
) -> list[Prompt]:
    """Prompts from a parquet file (needs pyarrow: ``pip install 'async-rl[parquet]'``).

    ``prompt_id`` is the row index (0-based).
    """
    path = Path(path)
    _check_file(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"reading {path} needs pyarrow; install the parquet extra: pip install 'async-rl[parquet]'"
        ) from None
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for corrupt files
        raise ValueError(f"{path} is not a readable parquet file ({e})") from None
    for key in (question_key, answer_key):
        if key not in schema.names:
            raise ValueError(f"{path}: no column {key!r} (columns: {schema.names}); {_KEY_FIX}")
    table = pq.read_table(path, columns=[question_key, answer_key])
    rows = table.to_pylist()
    prompts = [_make_prompt(row, f"row {i}", path, i, question_key, answer_key) for i, row in enumerate(rows)]
    return _nonempty(prompts, path)


def load_prompts(
    path: str | Path, *, question_key: str = "question", answer_key: str = "answer"
) -> list[Prompt]:
    """Prompts from a .jsonl or .parquet (.pq) file, chosen by suffix."""
    path = Path(path)
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind == "jsonl":
        return load_jsonl(path, question_key=question_key, answer_key=answer_key)
    if kind == "parquet":
        return load_parquet(path, question_key=question_key, answer_key=answer_key)
    _check_file(path)
    raise ValueError(f"{path}: unknown prompt file type {path.suffix!r}; use one of {sorted(_SUFFIXES)}")


# --------------------------------------------------------------------------------------------
# Synthetic arithmetic


# Fixed order: an operator's position is part of prompt_id, so ids do not depend on `ops`.
_OPS = "+-*"
# Fraction of problems held out for eval. 10% of 2-digit addition is ~800 problems, plenty for
# an accuracy estimate with a few % standard error, and training keeps 90% of the space.
EVAL_FRACTION = 0.1
# Above this many candidate problems, enumerating a split costs seconds and hundreds of MB;
# sample by rejection instead (2-digit, all three ops: 24,300; 3-digit, one op: 810,000).
_ENUMERATE_LIMIT = 250_000
_SPLITS = ("train", "eval")


def _unit_hash(key: str) -> float:
    """A uniform number in [0, 1) fixed by ``key`` (stable across processes and Python versions)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _split_of(key: str, eval_fraction: float = EVAL_FRACTION) -> str:
    return "eval" if _unit_hash(key) < eval_fraction else "train"


def _pair_split(a: int, op: str, b: int, eval_fraction: float = EVAL_FRACTION) -> str:
    # For commutative ops the pair is canonicalised, so "34+12=" is held out with "12+34=":
    # otherwise eval accuracy would reward memorising the commuted training problem.
    if op in "+*":
        a, b = min(a, b), max(a, b)
    return _split_of(f"{a}{op}{b}", eval_fraction)


def _operand_range(digits: int) -> range:
    # Exactly `digits` digits (1 digit: 0..9), so the digit count is a real difficulty knob.
    return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def _problem_id(a: int, op: str, b: int, digits: int) -> int:
    return (_OPS.index(op) * 10**digits + a) * 10**digits + b


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _problem(a: int, op: str, b: int, digits: int) -> Prompt:
    return Prompt(_problem_id(a, op, b, digits), f"{a}{op}{b}=", str(_apply(a, op, b)))


def _check_arithmetic_args(
    n: int, split: str, digits: int, ops: str, eval_fraction: float = EVAL_FRACTION
) -> None:
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    if split not in _SPLITS:
        raise ValueError(f"split={split!r}: use 'train' or 'eval'")
    if not 1 <= digits <= 9:
        raise ValueError(f"digits={digits}: use 1..9 (data.digits)")
    if not ops or any(op not in _OPS for op in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"ops={ops!r}: use distinct operators from {_OPS!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}: use a fraction in (0, 1)")


def arithmetic_problem_ids(
    split: str, *, digits: int = 2, ops: str = "+", eval_fraction: float = EVAL_FRACTION
) -> list[int]:
    """Every problem of ``split``: the ``prompt_id`` of each, ascending.

    The full set is enumerated, so this is for small spaces (and for checking disjointness).
    """
    _check_arithmetic_args(0, split, digits, ops, eval_fraction)
    operands = _operand_range(digits)
    return sorted(
        _problem_id(a, op, b, digits)
        for op in ops
        for a in operands
        for b in operands
        if _pair_split(a, op, b, eval_fraction) == split
    )


def _decode_problem_id(pid: int, digits: int) -> tuple[int, str, int]:
    rest, b = divmod(pid, 10**digits)
    op_index, a = divmod(rest, 10**digits)
    return a, _OPS[op_index], b


def arithmetic_prompts(
    n: int,
    *,
    seed: int,
    split: str,
    digits: int = 2,
    ops: str = "+",
    eval_fraction: float = EVAL_FRACTION,
) -> list[Prompt]:
    """``n`` seeded problems like "12+34=" -> "46" from the ``split`` ("train" or "eval").

    Operands have exactly ``digits`` digits; ``ops`` is a subset of "+-*" ("-" may give a
    negative answer). A problem belongs to one split for good, by a hash of its operands
    (commuted pairs together), so the splits are disjoint whatever ``n`` and ``seed``. When the
    split is small enough to enumerate, the draw is without replacement unless ``n`` exceeds
    the split; in larger spaces problems are drawn independently (repeats are then vanishingly
    rare). ``prompt_id`` encodes (op, a, b), so it is stable across seeds and ``n``. A fraction
    ``eval_fraction`` of the problems is held out (more than the default 0.1 for small spaces:
    1-digit problems number 100 per operator).
    """
    _check_arithmetic_args(n, split, digits, ops, eval_fraction)
    # String seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED. The
    # default fraction keeps the seed string of earlier versions (the same draws).
    frac = "" if eval_fraction == EVAL_FRACTION else f"/{eval_fraction}"
    rng = random.Random(f"arithmetic/{split}/{digits}/{ops}{frac}/{seed}")
    operands = _operand_range(digits)
    if len(ops) * len(operands) ** 2 <= _ENUMERATE_LIMIT:
        ids = arithmetic_problem_ids(split, digits=digits, ops=ops, eval_fraction=eval_fraction)
        if not ids and n:
            raise ValueError(
                f"split={split!r} has no problems for digits={digits}, ops={ops!r}; use more digits"
            )
        chosen = rng.sample(ids, n) if n <= len(ids) else rng.choices(ids, k=n)
        return [_problem(*_decode_problem_id(pid, digits), digits) for pid in chosen]
    prompts: list[Prompt] = []
    while len(prompts) < n:
        a, op, b = rng.choice(operands), rng.choice(ops), rng.choice(operands)
        if _pair_split(a, op, b, eval_fraction) == split:
            prompts.append(_problem(a, op, b, digits))
    return prompts


# --------------------------------------------------------------------------------------------
# Long-tail task: response length is what varies


_CHAIN_QUESTION = re.compile(r"sum (\d+(?:,\d+)+):")
_BINARY_QUESTION = re.compile(r"(\d+)([-+*])(\d+)=")
# Chain ids are offset past every 2-digit "+" id (< 10**4) so the two kinds never collide.
_CHAIN_ID_OFFSET = 10**4
# prompt_id packs one digit per term; 18 digits plus the offset still fit an int64.
_MAX_CHAIN_TERMS = 18
_MIN_CHAIN_TERMS = 3


def long_tail_prompts(
    n: int, *, seed: int, split: str, max_terms: int = 16, tail_prob: float = 0.1
) -> list[Prompt]:
    """``n`` seeded prompts whose reference *responses* have a long-tailed length.

    With probability ``1 - tail_prob`` a prompt is a 2-digit addition "12+34=" (reference
    response "46", 2-3 tokens), the same problems and split as ``arithmetic_prompts``. Otherwise
    it is a chain "sum 3,5,8,1:" of 3..``max_terms`` single-digit terms (1..9, count uniform);
    the answer is the total ("17"), and what makes the response long is that the reference
    response (``chain_solution``, taught by the SFT warm start) writes every partial sum:
    "3+5=8,8+8=16,16+1=17", about 8 tokens per term, ~110 tokens at 15 terms. With the
    defaults the p99/p50 ratio of reference response lengths is about 35 (p50 3, p99 ~110).

    Chains are assigned to splits by a hash of their terms, like the short problems.
    """
    _check_arithmetic_args(n, split, 2, "+")
    if not _MIN_CHAIN_TERMS <= max_terms <= _MAX_CHAIN_TERMS:
        raise ValueError(f"max_terms={max_terms}: use {_MIN_CHAIN_TERMS}..{_MAX_CHAIN_TERMS}")
    if not 0.0 <= tail_prob <= 1.0:
        raise ValueError(f"tail_prob={tail_prob}: use a probability in [0, 1]")
    rng = random.Random(f"long-tail/{split}/{max_terms}/{tail_prob}/{seed}")
    short_ids = arithmetic_problem_ids(split, digits=2, ops="+")
    prompts: list[Prompt] = []
    for _ in range(n):
        if rng.random() >= tail_prob:
            prompts.append(_problem(*_decode_problem_id(rng.choice(short_ids), 2), 2))
            continue
        while True:  # rejection: ~10% of chains are eval, so a train draw takes ~1.1 tries
            k = rng.randint(_MIN_CHAIN_TERMS, max_terms)
            digits = "".join(str(rng.randint(1, 9)) for _ in range(k))
            if _split_of(f"sum {digits}") == split:
                break
        terms = [int(d) for d in digits]
        prompts.append(
            Prompt(
                prompt_id=_CHAIN_ID_OFFSET + int(digits),
                question=f"sum {','.join(digits)}:",
                answer=str(sum(terms)),
            )
        )
    return prompts


def chain_solution(question: str) -> str:
    """The reference response to a synthetic question.

    "sum 3,5,8,1:" -> "3+5=8,8+8=16,16+1=17" (every partial sum; the last number is the
    answer). "12+34=" -> "46". Raises ValueError for any other question.
    """
    # search, not fullmatch: a question put into data.prompt_format still has its problem inside.
    if match := _CHAIN_QUESTION.search(question):
        terms = [int(t) for t in match.group(1).split(",")]
        steps, total = [], terms[0]
        for term in terms[1:]:
            steps.append(f"{total}+{term}={total + term}")
            total += term
        return ",".join(steps)
    if match := _BINARY_QUESTION.search(question):
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        return str(_apply(a, op, b))
    raise ValueError(f"{question!r} is not a synthetic question ('a+b=' or 'sum 3,5,8:')")


def guess_prompts(n: int, *, seed: int, guess_max: int) -> list[Prompt]:
    """``n`` seeded hidden numbers "Guess 1-15:" -> "11" for the guess environment; ``n=0``:
    every number once, in order (the eval set: a success rate over the whole range)."""
    rng = random.Random(f"guess/{guess_max}/{seed}")
    targets = [rng.randint(1, guess_max) for _ in range(n)] if n else list(range(1, guess_max + 1))
    return [Prompt(t, f"Guess 1-{guess_max}:", str(t)) for t in targets]


def sft_text(prompt: Prompt) -> str:
    """Supervised target response for the warm start: "46" for "12+34=".

    Synthetic questions get ``chain_solution`` (the worked partial sums for chains); any other
    prompt (e.g. from a file) gets its reference answer.
    """
    try:
        return chain_solution(prompt.question)
    except ValueError:
        return prompt.answer


# --------------------------------------------------------------------------------------------
# The prompt stream


def _fingerprint(prompts: Iterable[Prompt]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in prompts:
        h.update(f"{p.prompt_id}\0{p.question}\0{p.answer}\0".encode())
    return h.hexdigest()


class PromptSource:
    """An endless, seeded stream of ``prompts``, reshuffled every epoch, resumable.

    Draw ``i`` (0-based, counted over all epochs) is prompt ``order(i // N)[i % N]``, where the
    order of each epoch is a permutation fixed by (``seed``, epoch). ``cursor`` is the number of
    draws so far, so ``state_dict``/``load_state_dict`` of one int resumes the exact sequence.
    The draw index is returned with each prompt as a unique id for that draw.
    """

    def __init__(self, prompts: Sequence[Prompt], *, seed: int, shuffle: bool = True) -> None:
        if not prompts:
            raise ValueError("PromptSource needs at least one prompt")
        self._prompts = list(prompts)
        self._seed = seed
        self._shuffle = shuffle
        self._fingerprint = _fingerprint(self._prompts)
        self.cursor = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:
        """Prompts per epoch."""
        return len(self._prompts)

    @property
    def epoch(self) -> int:
        """The epoch the next draw comes from."""
        return self.cursor // len(self._prompts)

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            order = list(range(len(self._prompts)))
            if self._shuffle:
                # Seeded by the (seed, epoch) pair as a string, not seed + epoch: with a sum,
                # seed 1 would replay seed 0's orders shifted by one epoch.
                random.Random(f"prompt-source/{self._seed}/{epoch}").shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def __iter__(self) -> Iterator[tuple[int, Prompt]]:
        return self

    def __next__(self) -> tuple[int, Prompt]:
        index = self.cursor
        epoch, position = divmod(index, len(self._prompts))
        prompt = self._prompts[self._epoch_order(epoch)[position]]
        self.cursor = index + 1
        return index, prompt

    def take(self, n: int) -> list[tuple[int, Prompt]]:
        """The next ``n`` draws as (draw index, prompt)."""
        if n < 0:
            raise ValueError(f"n={n}: must be >= 0")
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "num_prompts": len(self._prompts),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["cursor"]``; the prompts, seed and shuffle must match the saved ones."""
        saved = (state.get("seed"), state.get("shuffle"), state.get("num_prompts"), state.get("fingerprint"))
        current = (self._seed, self._shuffle, len(self._prompts), self._fingerprint)
        if saved != current:
            raise ValueError(
                "the prompt-source state was saved for different prompts or seed "
                f"(seed, shuffle, count, fingerprint: saved {saved}, now {current}); resume with "
                "the same data settings and seed, or start without the saved state"
            )
        cursor = state["cursor"]
        if not isinstance(cursor, int) or cursor < 0:
            raise ValueError(f"prompt-source state has cursor={cursor!r}; expected an int >= 0")
        self.cursor = cursor


# --------------------------------------------------------------------------------------------
# From the data config to prompt lists


def build_datasets(cfg: DataConfig, *, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """The training prompts and the held-out prompts (may be empty) for ``cfg``."""
    match cfg.kind:
        case DataKind.ARITHMETIC:
            train, held = (
                arithmetic_prompts(
                    n, seed=seed, split=split, digits=cfg.digits, ops=cfg.ops, eval_fraction=cfg.eval_fraction
                )
                for n, split in ((cfg.train_size, "train"), (cfg.eval_size, "eval"))
            )
        case DataKind.LONG_TAIL:
            train = long_tail_prompts(cfg.train_size, seed=seed, split="train")
            held = long_tail_prompts(cfg.eval_size, seed=seed, split="eval")
        case DataKind.GUESS:
            train = guess_prompts(cfg.train_size, seed=seed, guess_max=cfg.guess_max)
            held = guess_prompts(0, seed=seed, guess_max=cfg.guess_max)
        case DataKind.GSM8K:
            root = Path(cfg.path)
            train = load_prompts(root / "train.jsonl")
            held = load_prompts(Path(cfg.eval_path) if cfg.eval_path else root / "test.jsonl")
        case DataKind.JSONL | DataKind.PARQUET:
            keys = {"question_key": cfg.question_key, "answer_key": cfg.answer_key}
            train = load_prompts(cfg.path, **keys)
            held = load_prompts(cfg.eval_path, **keys) if cfg.eval_path else []
    if cfg.eval_limit:
        held = held[: cfg.eval_limit]
    if cfg.prompt_format != "{question}":
        train, held = format_questions(train, cfg.prompt_format), format_questions(held, cfg.prompt_format)
    return train, held


def format_questions(prompts: list[Prompt], prompt_format: str) -> list[Prompt]:
    """``prompts`` with each question put into ``prompt_format`` (``data.prompt_format``, a text
    with one ``{question}``): "12+34=" -> "What is 12+34=?" for "What is {question}?"."""
    return [Prompt(p.prompt_id, prompt_format.replace("{question}", p.question), p.answer) for p in prompts]
