"""Token sampling with the logprob of the distribution actually sampled.

Randomness is counter-based: the uniform number that picks sample ``k`` of draw ``seq`` at
step ``t`` is a hash of ``(seed, seq, k, t)``. A sample therefore comes out the same
whichever actor draws it, whatever else is in the batch, and after a restart, which
is what makes sync mode reproducible across processes.
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, seqs: np.ndarray, sample_idx: np.ndarray) -> np.ndarray:
    """One 64-bit stream key per sample: [B] uint64."""
    with np.errstate(over="ignore"):
        z = _splitmix64(np.full(len(seqs), seed, dtype=np.uint64) + _GOLDEN)
        z = _splitmix64(z ^ (seqs.astype(np.uint64) * _GOLDEN))
        return _splitmix64(z ^ (sample_idx.astype(np.uint64) + _GOLDEN))


def uniforms(keys: np.ndarray, steps: np.ndarray) -> torch.Tensor:
    """U[0, 1) per row for decode step ``steps[i]`` of stream ``keys[i]``: [B] float64."""
    with np.errstate(over="ignore"):
        z = _splitmix64(keys + (steps.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    # The top 53 bits give a double in [0, 1) with full mantissa.
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)))


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probabilities of the distribution we sample from: temperature, then nucleus.

    logits [B, V] -> [B, V] float32, ``-inf`` outside the nucleus.
    """
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()
    # Keep a token if the mass of the tokens strictly before it is below top_p: the most
    # likely token is always kept.
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    kept = logprobs.masked_fill(drop, float("-inf"))
    return kept - torch.logsumexp(kept, dim=-1, keepdim=True)


def sample(
    logits: torch.Tensor, keys: np.ndarray, steps: np.ndarray, *, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row by inverse CDF on the counter-based uniforms.

    logits [B, V]; keys, steps [B]. Returns (tokens [B] int64, logprobs [B] float32), the
    logprob being that of the sampled token under the distribution sampled.
    """
    logprobs = sampling_logprobs(logits, temperature, top_p)
    # float64 CDF: the boundaries between tokens are far finer than float32 noise.
    cdf = logprobs.double().exp().cumsum(dim=-1)
    u = uniforms(keys, steps).to(cdf.device).unsqueeze(-1) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    # A zero-probability token can only be hit at the clamp; step back to a kept one.
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    bad = torch.isinf(chosen)
    if bad.any():
        tokens[bad] = logprobs[bad].argmax(dim=-1)
        chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, chosen
