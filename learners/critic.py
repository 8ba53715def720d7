"""Step-level critic for Direct Advantage Policy Optimization (Liu et al. 2024, arXiv:2412.18279).

A response is split into reasoning steps at delimiter tokens (newlines by default): a step ends
with, and includes, a token whose text contains the delimiter, and the last step ends with the
response. ``s_k`` is the state after the prompt and the first ``k`` steps. The critic, trained
apart from the policy on stored trajectories, predicts ``V(s_k)``: the probability that the final
answer will be correct. Step ``k`` (0-based) then gets the advantage ``A_k = V(s_k+1) - V(s_k)``
on each of its tokens, with ``V(s_K) = r`` for a response of ``K`` steps, so the advantages of a
response sum to ``r - V(s_0)``: the outcome is shared out over the steps that moved it.

Pieces, in the order the learner and the ``async-rl critic`` command use them:

* ``delimiter_token_ids`` / ``step_ends``: where steps end, from token ids.
* ``TrajectoryRecord``, ``TrajectoryWriter``, ``read_trajectories``, ``records_from_groups``:
  the trajectory store, one JSON object per line in ``<store>/part-NNNNNN.jsonl``.
* ``StepCritic``: token embedding (ids hashed into ``buckets`` rows) -> GRU -> one logit per
  prefix. Small, causal and honest: ``V`` at position ``t`` sees tokens ``0..t`` only.
* ``train_critic`` -> ``<out>/critic_NNNNNN/{model.safetensors, config.json}`` and
  ``<out>/latest``; ``load_latest_critic`` reads them back.
* ``step_advantages``: per-token advantages [N, R] for a padded learner batch.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from async_rl.schema import TrajectoryGroup

if TYPE_CHECKING:  # the factory in learners.advantages imports this module, not the other way round
    from learners.advantages import AdvantageInputs

logger = logging.getLogger(__name__)

__all__ = [
    "CriticArch",
    "DirectEstimator",
    "StepCritic",
    "TrajectoryRecord",
    "TrajectoryWriter",
    "delimiter_token_ids",
    "load_critic",
    "load_latest_critic",
    "read_trajectories",
    "records_from_groups",
    "save_critic",
    "spread_step_advantages",
    "step_advantages",
    "step_ends",
    "train_critic",
]

_PART = re.compile(r"^part-(\d{6,})\.jsonl$")
_CRITIC = re.compile(r"^critic_(\d{6,})$")


# ----------------------------------------------------------------------------- steps


def delimiter_token_ids(tokenizer: Any, delimiter: str = "\n") -> frozenset[int]:
    """Ids of the tokens whose decoded text contains ``delimiter`` (``algorithm.step_delimiter``).

    Decodes every id once (``len(tokenizer)`` calls, about a second for a 150k vocabulary), so
    call it once at start-up. Tokens such as ".\\n\\n" count: the step ends with that token.
    """
    if not delimiter:
        raise ValueError("algorithm.step_delimiter must not be empty (default: a newline)")
    return frozenset(i for i in range(len(tokenizer)) if delimiter in tokenizer.decode([i]))


def step_ends(response_token_ids: Sequence[int] | np.ndarray, delimiter_ids: Collection[int]) -> list[int]:
    """Exclusive end offset of each step in the response; the last is ``len(response)``.

    ``[a, NL, b, c, NL, d]`` -> ``[2, 5, 6]``; ``[a, NL]`` -> ``[2]``; ``[]`` -> ``[]``.
    """
    ends = [j + 1 for j, token in enumerate(response_token_ids) if int(token) in delimiter_ids]
    n = len(response_token_ids)
    if n and (not ends or ends[-1] != n):
        ends.append(n)
    return ends


def spread_step_advantages(
    prompt_value: torch.Tensor,
    response_values: torch.Tensor,
    is_delimiter: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
) -> torch.Tensor:
    """Per-token advantages from per-prefix values: each token of step ``k`` gets
    ``V(s_k+1) - V(s_k)``, the last step ``r - V(s_K-1)``.

    prompt_value: [N], V(s_0), the value after the prompt.
    response_values: [N, R], the value after response token ``t`` (read at step ends only).
    is_delimiter: [N, R] bool, the token ends a step. mask: [N, R] bool, response tokens,
    left-aligned (a prefix of each row). rewards: [N]. Returns [N, R] float32, 0 at padding.
    """
    n, width = mask.shape
    mask = mask.bool()
    length = mask.sum(dim=1)
    pos = torch.arange(width, device=mask.device).expand(n, width)
    if not bool((mask == (pos < length.unsqueeze(1))).all()):
        raise ValueError("spread_step_advantages: response_mask must be left-aligned (true, then false)")
    values = response_values.to(torch.float32)
    is_end = (is_delimiter.bool() | (pos == (length - 1).unsqueeze(1))) & mask
    # For each token, the position that ends its step: the first step end at or after it.
    end_at = torch.where(is_end, pos, torch.full_like(pos, width))
    next_end = end_at.flip(1).cummin(dim=1).values.flip(1).clamp(max=width - 1)
    end_value = torch.where(
        next_end == (length - 1).unsqueeze(1),
        rewards.to(torch.float32).unsqueeze(1).expand(n, width),
        values.gather(1, next_end),
    )
    # ... and the position that ended the previous step (-1: the prompt).
    start_at = torch.where(is_end, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    prev_end = torch.cat([torch.full_like(pos[:, :1], -1), start_at[:, :-1]], dim=1)
    start_value = torch.where(
        prev_end < 0,
        prompt_value.to(torch.float32).unsqueeze(1).expand(n, width),
        values.gather(1, prev_end.clamp(min=0)),
    )
    return torch.where(mask, end_value - start_value, torch.zeros_like(values))


# ----------------------------------------------------------------------------- store


@dataclass
class TrajectoryRecord:
    """One stored response. ``step_ends`` as ``step_ends()`` returns them; ``reward`` is the raw
    reward (the critic's target is ``clamp(reward, 0, 1)``, the probability of a correct answer)."""

    prompt_token_ids: list[int]
    response_token_ids: list[int]
    reward: float
    step_ends: list[int]
    prompt_id: int = -1
    version: int = -1

    def validate(self) -> None:
        """Types, lengths and ranges; raises ValueError naming the field."""
        for name in ("prompt_token_ids", "response_token_ids", "step_ends"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
                raise ValueError(f"{name} must be a list of non-negative ints")
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty (V(s_0) is read at the last prompt token)")
        if (
            isinstance(self.reward, bool)
            or not isinstance(self.reward, int | float)
            or not math.isfinite(self.reward)
        ):
            raise ValueError(f"reward must be a finite number, got {self.reward!r}")
        ends, n = self.step_ends, len(self.response_token_ids)
        if n == 0 and ends:
            raise ValueError("step_ends must be empty for an empty response")
        if n and (
            not ends or ends[-1] != n or any(b <= a for a, b in itertools.pairwise(ends)) or ends[0] < 1
        ):
            raise ValueError(f"step_ends must increase strictly from >= 1 to len(response)={n}, got {ends}")
        for name in ("prompt_id", "version"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an int")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> TrajectoryRecord:
        raw = json.loads(line)
        if not isinstance(raw, dict):
            raise ValueError("a record must be a JSON object")
        known = set(cls.__dataclass_fields__)
        if set(raw) - known or not {"prompt_token_ids", "response_token_ids", "reward", "step_ends"} <= set(
            raw
        ):
            raise ValueError(f"unexpected or missing fields: {sorted(raw)}")
        record = cls(**raw)
        record.validate()
        return record


def records_from_groups(
    groups: Iterable[TrajectoryGroup], *, delimiter_ids: Collection[int], version: int
) -> list[TrajectoryRecord]:
    """The learner's side of ``learner.save_trajectories``: one record per response, raw rewards."""
    return [
        TrajectoryRecord(
            prompt_token_ids=[int(t) for t in g.prompt_token_ids],
            response_token_ids=[int(t) for t in r.token_ids],
            reward=float(r.reward),
            step_ends=step_ends(r.token_ids, delimiter_ids),
            prompt_id=int(g.prompt_id),
            version=version,
        )
        for g in groups
        for r in g.responses
    ]


def _parts(store_dir: Path) -> list[tuple[int, Path]]:
    if not store_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in store_dir.iterdir() if (m := _PART.match(p.name))]
    return sorted(found)


@dataclass
class TrajectoryWriter:
    """Appends records to ``<store_dir>/part-NNNNNN.jsonl``, a new part every
    ``max_records_per_file`` records and for every writer (a restarted learner never appends to
    a file another process may have left half-written). Flushed after each ``write``."""

    store_dir: Path
    max_records_per_file: int = 10_000
    _file: Any = field(default=None, init=False, repr=False)
    _in_file: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        if self.max_records_per_file < 1:
            raise ValueError(f"max_records_per_file={self.max_records_per_file}: must be >= 1")
        self.store_dir.mkdir(parents=True, exist_ok=True)

    def _open_next(self) -> None:
        self.close()
        parts = _parts(self.store_dir)
        index = parts[-1][0] + 1 if parts else 0
        self._file = open(self.store_dir / f"part-{index:06d}.jsonl", "x", encoding="utf-8")  # noqa: SIM115
        self._in_file = 0

    def write(self, records: Iterable[TrajectoryRecord]) -> int:
        """Validate and append; returns the number written."""
        written = 0
        for record in records:
            record.validate()
            if self._file is None or self._in_file >= self.max_records_per_file:
                self._open_next()
            self._file.write(record.to_json() + "\n")
            self._in_file += 1
            written += 1
        if self._file is not None:
            self._file.flush()
        return written

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_trajectories(store_dir: str | Path, *, max_records: int = 0) -> list[TrajectoryRecord]:
    """All records of the store in write order (the newest ``max_records`` if > 0).

    A last line without its newline (a writer killed mid-line) is skipped with a warning; any
    other malformed line raises ValueError naming the file and line.
    """
    records: list[TrajectoryRecord] = []
    for _, path in _parts(Path(store_dir)):
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                records.append(TrajectoryRecord.from_json(line))
            except (ValueError, TypeError) as error:
                if number == len(lines):  # no newline after it: cut short by a crash
                    logger.warning("%s:%d: skipping a truncated last record", path, number)
                    continue
                raise ValueError(f"{path}:{number}: malformed trajectory record: {error}") from None
    return records[-max_records:] if max_records > 0 else records


# ----------------------------------------------------------------------------- model


@dataclass
class CriticArch:
    buckets: int = 32768  # embedding rows; token id t uses row t % buckets (bounded size for any vocab)
    dim: int = 64  # token embedding width
    hidden: int = 128  # GRU state width

    def __post_init__(self) -> None:
        for name in ("buckets", "dim", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"critic arch: {name} must be >= 1")


class StepCritic(nn.Module):
    """``V(prefix)`` for every prefix of a token sequence: embed -> GRU -> linear -> logit."""

    def __init__(self, arch: CriticArch | None = None) -> None:
        super().__init__()
        self.arch = arch or CriticArch()
        self.embed = nn.Embedding(self.arch.buckets, self.arch.dim)
        self.rnn = nn.GRU(self.arch.dim, self.arch.hidden, batch_first=True)
        self.head = nn.Linear(self.arch.hidden, 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, L] long, right-padded (padding after a prefix never affects it).
        Returns [B, L] logits; ``sigmoid(logits[b, t])`` = V(tokens 0..t of row b)."""
        states, _ = self.rnn(self.embed(input_ids.remainder(self.arch.buckets)))
        return self.head(states).squeeze(-1)

    @torch.no_grad()
    def prefix_values(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """V of the prefixes ending at ``positions`` ([B] or [B, K] long) -> same shape, float32."""
        was_training = self.training
        self.eval()
        try:
            device = self.head.weight.device
            probs = torch.sigmoid(self(input_ids.to(device)).float())
        finally:
            self.train(was_training)
        index = positions.to(device).long()
        flat = index.unsqueeze(1) if index.dim() == 1 else index
        picked = probs.gather(1, flat)
        return (picked.squeeze(1) if index.dim() == 1 else picked).to(positions.device)


def step_advantages(
    critic: StepCritic,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    response_mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    delimiter_ids: Collection[int],
) -> torch.Tensor:
    """Per-token DAPO step advantages for a padded learner batch.

    input_ids: [N, L] prompt + response, right-padded (``trainer.Batch.input_ids``).
    prompt_lengths: [N] long, >= 1; response token j of row i is ``input_ids[i, prompt_lengths[i] + j]``.
    response_mask: [N, R] bool, left-aligned. rewards: [N] (shaped rewards; on the critic's 0..1
    scale for the telescoping sum to mean "probability gained"). Returns [N, R] float32, 0 at
    padding, on ``rewards``' device. No gradient flows (the critic is trained apart).
    """
    n, width = response_mask.shape
    if (
        input_ids.dim() != 2
        or input_ids.shape[0] != n
        or prompt_lengths.shape != (n,)
        or rewards.shape != (n,)
    ):
        raise ValueError(
            f"step_advantages: shapes input_ids {tuple(input_ids.shape)}, prompt_lengths {tuple(prompt_lengths.shape)}, "
            f"response_mask {tuple(response_mask.shape)}, rewards {tuple(rewards.shape)} do not agree on N"
        )
    if bool((prompt_lengths < 1).any()):
        raise ValueError("step_advantages: every prompt needs at least one token")
    device = rewards.device
    lengths = prompt_lengths.to(input_ids.device).long()
    positions = (lengths.unsqueeze(1) + torch.arange(width, device=input_ids.device)).clamp(
        max=input_ids.shape[1] - 1
    )
    # One forward pass; values at the last prompt token and after every response token.
    all_positions = torch.cat([(lengths - 1).unsqueeze(1), positions], dim=1)
    values = critic.prefix_values(input_ids, all_positions).to(device)
    response_ids = input_ids.gather(1, positions).to(device)
    delimiters = torch.tensor(sorted(delimiter_ids), dtype=response_ids.dtype, device=device)
    mask = response_mask.to(device).bool()
    is_delimiter = torch.isin(response_ids, delimiters) & mask
    return spread_step_advantages(values[:, 0], values[:, 1:], is_delimiter, mask, rewards)


class DirectEstimator:
    """``algorithm.advantage=direct`` (the ``AdvantageEstimator`` protocol of learners.advantages):
    Direct Advantage Policy Optimization's step-level advantages (Liu et al. 2024). A critic trained
    apart from the policy gives ``V(s_k)``, the probability of a correct final answer after ``k``
    steps; every token of step ``k`` gets ``A_k = V(s_k+1) - V(s_k)``, ``V(s_K) = r`` (see
    ``step_advantages``). Returns [N, R]. The critic is frozen here (``train_critic`` refits it),
    so the estimator has no state of its own."""

    filters_zero_variance = False  # an all-equal group still gets per-step credit
    needs_embeddings = False
    needs_tokens = True

    def __init__(self, group_size: int, *, critic: StepCritic, delimiter_ids: Collection[int]) -> None:
        if not delimiter_ids:
            raise ValueError("algorithm.step_delimiter: no token of the vocabulary contains the delimiter")
        self.group_size, self.critic, self.delimiter_ids = group_size, critic, frozenset(delimiter_ids)
        self.metrics: dict[str, float] = {}

    @staticmethod
    def _tokens(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if inputs.input_ids is None or inputs.prompt_lengths is None or inputs.response_mask is None:
            raise ValueError("algorithm.advantage=direct needs input_ids, prompt_lengths and response_mask")
        return inputs.input_ids, inputs.prompt_lengths, inputs.response_mask

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        input_ids, prompt_lengths, mask = self._tokens(inputs)
        advantages = step_advantages(
            self.critic, input_ids, prompt_lengths, mask, inputs.rewards, delimiter_ids=self.delimiter_ids
        )
        picked = advantages[mask.to(advantages.device).bool()]
        self.metrics = {"advantage/step_abs_mean": float(picked.abs().mean()) if picked.numel() else 0.0}
        return advantages

    def values(self, inputs: AdvantageInputs) -> torch.Tensor:
        """V(s_0) [N]: the critic's value of each prompt."""
        input_ids, prompt_lengths, _ = self._tokens(inputs)
        return self.critic.prefix_values(input_ids, prompt_lengths.to(input_ids.device) - 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"direct estimator is stateless, got state keys {sorted(state)}")


# ----------------------------------------------------------------------------- training


def _value_positions(record: TrajectoryRecord) -> list[int]:
    """Positions (in prompt + response) at which V(s_0), ..., V(s_K-1) are read."""
    p = len(record.prompt_token_ids)
    return [p - 1] + [p + end - 1 for end in record.step_ends[:-1]]


def _collate(records: Sequence[TrajectoryRecord], device: torch.device) -> tuple[torch.Tensor, ...]:
    """ids [B, L], value positions [B, K], valid [B, K], targets [B]."""
    seqs = [r.prompt_token_ids + r.response_token_ids for r in records]
    points = [_value_positions(r) for r in records]
    ids = torch.zeros(len(records), max(map(len, seqs)), dtype=torch.long)
    pos = torch.zeros(len(records), max(map(len, points)), dtype=torch.long)
    valid = torch.zeros(pos.shape, dtype=torch.bool)
    for i, (seq, pts) in enumerate(zip(seqs, points, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        pos[i, : len(pts)] = torch.tensor(pts)
        valid[i, : len(pts)] = True
    targets = torch.tensor([min(max(r.reward, 0.0), 1.0) for r in records], dtype=torch.float32)
    return ids.to(device), pos.to(device), valid.to(device), targets.to(device)


def _batch_loss(critic: StepCritic, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy of every V(s_k) against the trajectory's outcome, each trajectory
    weighted equally (a long response does not count more), and the summed squared error."""
    ids, pos, valid, targets = batch
    logits = critic(ids).gather(1, pos)
    target = targets.unsqueeze(1).expand_as(logits)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    per_record = torch.where(valid, bce, torch.zeros_like(bce)).sum(1) / valid.sum(1)
    squared = torch.where(valid, (torch.sigmoid(logits) - target) ** 2, torch.zeros_like(bce))
    return per_record.mean(), (squared.sum(1) / valid.sum(1)).sum()


def train_critic(
    store_dir: str | Path,
    out_dir: str | Path,
    *,
    arch: CriticArch | None = None,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    max_records: int = 0,
    val_fraction: float = 0.05,
    device: str | torch.device = "cpu",
) -> Path:
    """Fit a fresh ``StepCritic`` on the store's trajectories (the newest ``max_records`` if > 0)
    with AdamW, save it as the next ``critic_NNNNNN`` under ``out_dir`` and return that path.

    Monte Carlo targets: every ``V(s_k)`` of a trajectory regresses on that trajectory's outcome,
    so the fit converges to the expected outcome given the prefix (the value) as data grows.
    ``val_fraction`` of the records (at least one when there are 20) are held out; their Brier
    score ``mean (V - outcome)^2`` goes into ``config.json`` as ``val_brier``.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0.0 <= val_fraction < 1.0:
        raise ValueError("train_critic: need epochs >= 1, batch_size >= 1, lr > 0, 0 <= val_fraction < 1")
    records = read_trajectories(store_dir, max_records=max_records)
    if not records:
        raise ValueError(
            f"no trajectories in {store_dir}: run the learner with learner.save_trajectories=true first"
        )
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(records), generator=generator).tolist()
    n_val = max(int(len(records) * val_fraction), 1) if len(records) >= 20 and val_fraction > 0 else 0
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:]]

    critic = StepCritic(arch).to(device)
    optimizer = torch.optim.AdamW(critic.parameters(), lr=lr)
    # Linear decay to 0: the last iterates average out minibatch noise instead of jumping around
    # the optimum with the full step size (the value targets are 0/1 outcomes, very noisy).
    total_steps = epochs * math.ceil(len(train) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(1.0 - step / total_steps, 0.0))
    critic.train()
    loss = torch.zeros(())
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=generator).tolist()
        total, batches = 0.0, 0
        for start in range(0, len(perm), batch_size):
            batch = _collate([train[i] for i in perm[start : start + batch_size]], device)
            loss, _ = _batch_loss(critic, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, batches = total + loss.item(), batches + 1
        logger.info("critic epoch %d/%d: bce %.4f", epoch + 1, epochs, total / max(batches, 1))

    val_brier = float("nan")
    if val:
        critic.eval()
        with torch.no_grad():
            squared = sum(
                float(_batch_loss(critic, _collate(val[s : s + batch_size], device))[1])
                for s in range(0, len(val), batch_size)
            )
        val_brier = squared / len(val)
    info = {"records": len(records), "train_records": len(train), "epochs": epochs, "lr": lr, "seed": seed}
    info |= {"final_train_bce": float(loss.detach()), "val_brier": val_brier}
    return save_critic(critic, out_dir, info=info)


def save_critic(critic: StepCritic, out_dir: str | Path, *, info: dict[str, Any] | None = None) -> Path:
    """Write ``<out_dir>/critic_NNNNNN/`` (next index) atomically and point ``<out_dir>/latest`` at it."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := _CRITIC.match(p.name))]
    name = f"critic_{max(taken, default=0) + 1:06d}"
    tmp = root / f".tmp_{name}"
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in critic.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({"arch": asdict(critic.arch), **(info or {})}, indent=1))
    tmp.replace(root / name)  # a crash mid-save never leaves a half critic under the final name
    marker = root / ".latest.tmp"
    marker.write_text(name)
    marker.replace(root / "latest")
    logger.info("critic saved: %s", root / name)
    return root / name


def load_critic(path: str | Path, *, device: str | torch.device = "cpu") -> StepCritic:
    """A critic directory written by ``save_critic``, in eval mode."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        critic = StepCritic(CriticArch(**config["arch"]))
        critic.load_state_dict(load_file(str(path / "model.safetensors")))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as error:
        raise ValueError(
            f"{path}: not a critic checkpoint ({error}); train one with `async-rl critic`"
        ) from None
    return critic.to(device).eval()


def load_latest_critic(out_dir: str | Path, *, device: str | torch.device = "cpu") -> StepCritic | None:
    """The critic ``<out_dir>/latest`` names, or None when ``out_dir`` holds none yet."""
    marker = Path(out_dir) / "latest"
    if not marker.is_file():
        return None
    return load_critic(marker.parent / marker.read_text().strip(), device=device)
