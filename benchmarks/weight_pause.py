"""Generation pause per weight sync with staging, against the broadcast time, side by side.

A sender process (the learner's half: ``weight_sync.group.form`` + ``broadcast.send``) and a
receiver process (the actor's half: ``actors.weight_receiver.WeightReceiver``) exchange a
synthetic float32 model of ``--mb`` MiB over gloo on 127.0.0.1, ``--syncs`` times. The
receiver's main thread plays the actor's generation loop: it polls for a staged version
between "decode steps" and swaps it in. Reported per sync: the broadcast time seen by the
receiver, the pause (the swap), and their ratio. The issue's target for a 1 GB model: pause
at most 20% of the broadcast. Both swaps run, one pair of processes each: ``rebind`` (the
torch engine: staging and weights exchanged by reference) and ``copy`` (SGLang's staging:
one copy per parameter). The sender's parameters are one flat buffer, as the learner's are.

    python benchmarks/weight_pause.py --mb 1024 --syncs 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import time
from pathlib import Path

import torch

_TENSOR_MB = 16


def _params(mb: int) -> dict[str, torch.Tensor]:
    n = max(1, mb // _TENSOR_MB)
    side = int((_TENSOR_MB << 20) / 4) // 1024
    return {f"layer{i}.weight": torch.zeros(side, 1024) for i in range(n)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sender(port: int, mb: int, syncs: int, bucket_mb: int, out: mp.Queue) -> None:
    from weight_sync import broadcast
    from weight_sync.group import form, host_store

    torch.set_num_threads(1)
    store = host_store("127.0.0.1", port, 120.0)
    params = broadcast.flat_like(_params(mb))  # the learner's layout (flatten_parameters_)
    group, missing = form(store, epoch=0, world_size=2, backend="gloo", timeout_s=120.0)
    assert group is not None, missing
    times = []
    buffers = broadcast.Buffers()
    for version in range(1, syncs + 1):
        for t in params.values():
            t.fill_(float(version))
        header = broadcast.plan(params, version=version, epoch=0, bucket_mb=bucket_mb)
        out.put(("header", header))
        times.append(broadcast.send(group, params, header, torch.device("cpu"), buffers))
    out.put(("send_s", times))
    group.close()
    time.sleep(1.0)


def _receiver(port: int, mb: int, syncs: int, rebind: bool, inbox: mp.Queue, out: mp.Queue) -> None:
    from actors.weight_receiver import WeightReceiver
    from async_rl.schema import JoinGroup

    torch.set_num_threads(1)
    params = _params(mb)
    receiver = WeightReceiver(params, device="cpu", timeout_s=120.0, rebind=rebind)
    receiver.submit(JoinGroup(0, 1, 2, "127.0.0.1", port, "gloo"))
    rows = []
    while len(rows) < syncs:
        try:
            kind, header = inbox.get(timeout=0.001)
            if kind == "header":
                receiver.submit(header)
        except Exception:  # queue.Empty: no new header this "decode step"
            pass
        ready = receiver.poll()
        if ready is None:
            continue
        header, receive_s = ready
        start = time.perf_counter()
        receiver.swap()
        pause_s = time.perf_counter() - start
        first = next(iter(params.values()))
        assert float(first[0, 0]) == float(header.version), "swapped weights are not the sent version"
        rows.append({"version": header.version, "receive_s": receive_s, "pause_s": pause_s})
    out.put(("rows", rows))
    receiver.close(timeout_s=10)


def _pair(args: argparse.Namespace, rebind: bool) -> list[dict]:
    """One sender and one receiver process, ``--syncs`` syncs; the receiver's rows."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    headers: mp.Queue = ctx.Queue()
    results: mp.Queue = ctx.Queue()
    send = ctx.Process(target=_sender, args=(port, args.mb, args.syncs, args.bucket_mb, headers))
    recv = ctx.Process(target=_receiver, args=(port, args.mb, args.syncs, rebind, headers, results))
    send.start()
    recv.start()
    try:
        kind, rows = results.get(timeout=600)
        assert kind == "rows"
    finally:
        for proc in (send, recv):
            proc.join(timeout=30)
            if proc.is_alive():
                os.kill(proc.pid, 9)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1024, help="model size in MiB (float32)")
    ap.add_argument("--syncs", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    result: dict = {"mb": args.mb}
    for swap in ("rebind", "copy"):
        rows = _pair(args, rebind=swap == "rebind")
        print(
            f"\n{swap}: {args.mb} MiB float32, bucket {args.bucket_mb} MiB, gloo on 127.0.0.1, "
            f"load {os.getloadavg()[0]:.1f}"
        )
        print("| sync | broadcast (receiver) s | pause s | pause / broadcast |")
        print("|---:|---:|---:|---:|")
        for r in rows:
            r["pause_frac"] = r["pause_s"] / r["receive_s"]
            print(f"| v{r['version']} | {r['receive_s']:.3f} | {r['pause_s']:.4f} | {r['pause_frac']:.4f} |")
        median = statistics.median(r["pause_frac"] for r in rows)
        print(f"{swap}: median pause / broadcast: {median:.4f} (target <= 0.2)")
        result[swap] = {"rows": rows, "median_pause_frac": median}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
