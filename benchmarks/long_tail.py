"""Generation throughput on a long-tailed workload: continuous vs static batching vs HF generate.

    nice python benchmarks/long_tail.py [--quick] [--prompts 256] [--group-size 4]
        [--max-num-seqs 32] [--repeats 3] [--threads 1] [--json out.json]

The workload is ``long_tail_prompts`` (mostly "12+34=", about 10% "sum 3,5,8,1:" chains),
``group-size`` samples per prompt. Response lengths are FORCED, not learnt: the embedded
tiny model is random, so every sample of a prompt is made to run exactly as many tokens as
the reference response (``chain_solution``: "46", "3+5=8,8+8=16,16+1=17", one token per
character) plus one for the EOS that would end it. EOS sampling is switched off everywhere
(engine ``stop_token_ids=[]``, HF ``generation_config.eos_token_id=None``) and each response
stops at its length: a per-request ``max_new_tokens`` in the engine, the longest length of
the batch in HF generate (a batch runs until its last row is done). What is measured is
therefore the scheduling of a long tail, with the tiny model's per-token cost; the tokens
themselves are random text.

Modes, all on the same model, prompts and sampling (temperature 1, no top-k, no top-p):

* continuous    the torch engine with every request queued at once: a finished row leaves
                at once and a waiting request takes its slots at the next step.
* static-pad    the same engine, one batch of ``max_num_seqs / group_size`` prompts at a
                time; a batch is admitted only when the previous one has fully finished, and
                finished rows stay in the batch as padding until its longest row is done
                (they keep being decoded, as in classic static batching).
* static-retire the same batches, but finished rows leave the batch (it shrinks).
* hf-generate   ``model.generate(do_sample=True, top_k=0, temperature=1.0,
                num_return_sequences=group_size)`` on the same batches of prompts.

Throughput is useful tokens (the forced response lengths, summed) per second of wall time
for the whole workload, prefill included; the median over ``repeats`` rounds, each round
running every mode once in a rotated order.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.torch_engine import Request, TorchEngine
from async_rl.config import Template
from async_rl.data import chain_solution, long_tail_prompts
from async_rl.text import load_tokenizer, render_prompt
from async_rl.tiny_model import ensure_tiny_model

MODES = ("continuous", "static-pad", "static-retire", "hf-generate")


@dataclass
class Workload:
    prompt_ids: list[list[int]]
    lengths: list[int]  # forced response length of every sample of prompt i (tokens, EOS included)
    group_size: int

    def batches(self, prompts_per_batch: int) -> list[range]:
        n = len(self.prompt_ids)
        return [range(i, min(i + prompts_per_batch, n)) for i in range(0, n, prompts_per_batch)]

    @property
    def useful_tokens(self) -> int:
        return sum(self.lengths) * self.group_size


@dataclass
class Timing:
    seconds: float
    useful_tokens: int
    computed_tokens: int  # decode work done, padding rows included


def build_workload(
    tokenizer: Any, *, prompts: int, group_size: int, seed: int, max_terms: int, tail_prob: float
) -> Workload:
    rows = long_tail_prompts(prompts, seed=seed, split="train", max_terms=max_terms, tail_prob=tail_prob)
    prompt_ids = [render_prompt(tokenizer, p.question, Template.AUTO) for p in rows]
    lengths = [
        len(tokenizer(chain_solution(p.question), add_special_tokens=False)["input_ids"]) + 1 for p in rows
    ]
    return Workload(prompt_ids, lengths, group_size)


def length_percentiles(w: Workload) -> tuple[float, float]:
    """p50 and p99 of response lengths over all samples (each prompt counts group_size times)."""
    per_response = np.repeat(np.asarray(w.lengths), w.group_size)
    return float(np.percentile(per_response, 50)), float(np.percentile(per_response, 99))


def _drain(engine: TorchEngine) -> list[Any]:
    done = []
    while engine.has_work():
        done += engine.step()
    return done


def run_continuous(engine: TorchEngine, w: Workload) -> Timing:
    start = time.perf_counter()
    for i, ids in enumerate(w.prompt_ids):
        engine.add(Request(i, ids, w.group_size, seq=i, max_new_tokens=w.lengths[i]))
    done = _drain(engine)
    seconds = time.perf_counter() - start
    assert all(len(s.token_ids) == w.lengths[s.request_id] for s in done)
    return Timing(seconds, w.useful_tokens, w.useful_tokens)


def run_static(engine: TorchEngine, w: Workload, prompts_per_batch: int, *, pad: bool) -> Timing:
    computed = 0
    start = time.perf_counter()
    for batch in w.batches(prompts_per_batch):
        longest = max(w.lengths[i] for i in batch)
        for i in batch:
            # Padding: every row of the batch decodes until the longest one is done.
            cap = longest if pad else w.lengths[i]
            engine.add(Request(i, w.prompt_ids[i], w.group_size, seq=i, max_new_tokens=cap))
            computed += cap * w.group_size
        done = _drain(engine)
        assert len(done) == len(batch) * w.group_size
    return Timing(time.perf_counter() - start, w.useful_tokens, computed)


def run_hf(model: Any, w: Workload, prompts_per_batch: int, pad_token_id: int) -> Timing:
    from transformers import GenerationConfig

    computed = 0
    start = time.perf_counter()
    for batch in w.batches(prompts_per_batch):
        width = max(len(w.prompt_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(w.prompt_ids[i]) :] = torch.tensor(w.prompt_ids[i])
            mask[row, width - len(w.prompt_ids[i]) :] = 1
        longest = max(w.lengths[i] for i in batch)
        config = GenerationConfig(
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=longest,
            min_new_tokens=0,
            num_return_sequences=w.group_size,
            pad_token_id=pad_token_id,
        )
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        assert out.shape == (len(batch) * w.group_size, width + longest)
        computed += longest * len(batch) * w.group_size
    return Timing(time.perf_counter() - start, w.useful_tokens, computed)


def make_runners(
    model_dir: Path, w: Workload, *, max_num_seqs: int, pad_token_id: int, seed: int
) -> dict[str, Callable[[Workload], Timing]]:
    from transformers import AutoModelForCausalLM

    engine = TorchEngine(
        str(model_dir),
        device="cpu",
        dtype=torch.float32,
        max_num_seqs=max_num_seqs,
        max_new_tokens=max(w.lengths),
        temperature=1.0,
        top_p=1.0,
        stop_token_ids=[],  # lengths are forced: no sampled token ends a response
        pad_token_id=pad_token_id,
        seed=seed,
    )
    hf_model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # generate() fills an unset eos_token_id from the model's generation config: unset it there.
    hf_model.generation_config.eos_token_id = None
    per_batch = max_num_seqs // w.group_size
    return {
        "continuous": lambda wl: run_continuous(engine, wl),
        "static-pad": lambda wl: run_static(engine, wl, per_batch, pad=True),
        "static-retire": lambda wl: run_static(engine, wl, per_batch, pad=False),
        "hf-generate": lambda wl: run_hf(hf_model, wl, per_batch, pad_token_id),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 prompts, 1 round (about 20 s)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--tail-prob", type=float, default=0.1)
    parser.add_argument("--max-terms", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the embedded tiny model")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}"
    )
    args = parser.parse_args(argv)
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    if not modes or set(args.modes.split(",")) - set(MODES):
        parser.error(f"--modes {args.modes}: choose from {','.join(MODES)}")
    if args.quick:
        args.prompts, args.repeats = 64, 1
    if args.max_num_seqs % args.group_size:
        parser.error("--max-num-seqs must be a multiple of --group-size")
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or ensure_tiny_model(0)
    tokenizer = load_tokenizer(str(model_dir))
    w = build_workload(
        tokenizer,
        prompts=args.prompts,
        group_size=args.group_size,
        seed=args.seed,
        max_terms=args.max_terms,
        tail_prob=args.tail_prob,
    )
    p50, p99 = length_percentiles(w)
    load_before = os.getloadavg()
    print(
        f"workload: {len(w.prompt_ids)} prompts x {w.group_size} samples, {w.useful_tokens} response tokens; "
        f"length p50 {p50:.0f}, p99 {p99:.0f}, max {max(w.lengths)}: p99/p50 = {p99 / p50:.1f}"
        f"{'' if p99 / p50 >= 8 else '  (below the issue target of 8)'}"
    )
    print(
        f"batch: max_num_seqs {args.max_num_seqs} = {args.max_num_seqs // args.group_size} prompts; "
        f"torch threads {args.threads}; load average {load_before[0]:.2f} {load_before[1]:.2f}"
    )
    runners = make_runners(
        model_dir, w, max_num_seqs=args.max_num_seqs, pad_token_id=tokenizer.pad_token_id, seed=args.seed
    )
    warm = Workload(w.prompt_ids[:8], w.lengths[:8], w.group_size)
    for mode in modes:  # first-call allocations and lazy imports
        runners[mode](warm)
    times: dict[str, list[Timing]] = {mode: [] for mode in modes}
    for r in range(args.repeats):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for mode in order:
            times[mode].append(runners[mode](w))
            print(f"  round {r + 1}: {mode:<13} {times[mode][-1].seconds:7.2f} s", file=sys.stderr)
    seconds = {mode: statistics.median(t.seconds for t in times[mode]) for mode in modes}
    rate = {mode: w.useful_tokens / seconds[mode] for mode in modes}
    print(f"\n| mode | useful tokens | decoded tokens | seconds (median of {args.repeats}) | useful tok/s |")
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        t = times[mode][0]
        print(
            f"| {mode} | {t.useful_tokens} | {t.computed_tokens} | {seconds[mode]:.2f} | {rate[mode]:.0f} |"
        )
    ratios = {
        f"continuous/{mode}": rate["continuous"] / rate[mode]
        for mode in modes
        if mode != "continuous" and "continuous" in modes
    }
    print()
    for name, value in ratios.items():
        print(f"{name:<26} {value:5.2f}x  ({'meets' if value >= 1.5 else 'misses'} the 1.5x target)")
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f}")
    if args.json:
        result = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "length_p50": p50,
            "length_p99": p99,
            "p99_over_p50": p99 / p50,
            "timings": {mode: [asdict(t) for t in times[mode]] for mode in modes},
            "tokens_per_s": rate,
            "ratios": ratios,
            "load_average": {"before": load_before, "after": load_after},
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
