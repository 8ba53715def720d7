"""Weight-sync throughput over gloo: the bucketed broadcast vs one flat broadcast vs raw TCP (issue 5).

    nice .venv/bin/python benchmarks/weight_broadcast.py [--quick] [--sizes-mb 10 100 1024 2048]
        [--receivers 1 2 3] [--bucket-mb 64 16 256] [--warmup 1] [--repeats 5]
        [--max-mem-gb 7.5] [--threads 1] [--timeout-s 120] [--out weight_sync.json]

The sender is this process (rank 0, hosting the TCPStore); each receiver is a real OS process
started from this file, on 127.0.0.1 (gloo on ``lo``, free ports). The model is synthetic:
float32, Llama-like names and shapes (embedding, per layer two norms, q/k/v/o, gate/up/down,
final norm, untied lm_head), as many layers as fit in the nominal size; the embedding rows
absorb the rest, so the byte count is within one row pair of it. In every process the
parameters are views of ONE contiguous storage, so (b) and (c) move exactly the model's bytes,
in place, and a process holds one copy of the model. Methods, on the same group and bytes:

* bucketed B MiB  (a) ``weight_sync.broadcast.plan/send/receive`` on a real ``SyncGroup``
                  (gloo), the tensors in storage order: every bucket is one contiguous span and
                  travels in place. This is the learner's case (``flatten_parameters_``) and the
                  actor's staging (``flat_like``).
* ..., packed     (a') the same, with the tensors taken in REVERSE order: no multi-tensor bucket
                  is one span, so ``send`` packs each into a buffer and ``receive`` copies each
                  out, overlapped with the transfer of the next bucket (two buffers). The case
                  of parameters that are separate allocations (an unflattened model).
* flat            (b) one broadcast of the whole contiguous storage on the same group: the baseline.
* tcp             (c) raw sockets, the sender writing to every receiver IN PARALLEL (one thread per
                  receiver, ``sendall`` of a memoryview of the storage), each receiver
                  ``recv_into`` the storage: what loopback TCP does with no framework.

Timing: all ranks leave a barrier, the sender reads CLOCK_MONOTONIC (one system-wide clock on
Linux, so times of different processes subtract), each receiver reads it when it holds the
whole model, and the time of a transfer is the LAST receiver's end minus the sender's start.
GB/s per receiver = model bytes / that time (GB = 1e9 bytes); aggregate = receivers x that.
Before each transfer the receivers overwrite their storage with -1 and after it check every
tensor (outside the timed span). Each round runs every method once, in an order rotated
round by round so the shared machine's load spreads over all of them; the first ``warmup``
rounds are dropped and the median of the rest is reported.

Memory: each process holds the model plus at most two buckets (``send`` and ``receive``
allocate the next bucket while the last is still referenced) plus about 300 MiB of runtime.
A (size, receivers) cell whose estimate over all processes exceeds ``--max-mem-gb`` is
skipped with its reason printed.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from async_rl.config import WeightSyncConfig
from async_rl.schema import WeightHeader
from weight_sync import broadcast
from weight_sync.group import SyncGroup, connect_store, host_store

MIB = 1 << 20
GB = 1e9
CPU = torch.device("cpu")
RUNTIME_BYTES = 300 * MIB  # one process with torch, gloo and the schema imported (measured: ~230 MiB)
DEFAULT_BUCKET_MB = WeightSyncConfig().bucket_mb
TARGET_RATIO = 0.8  # issue 5: bucketed >= 0.8 of the flat broadcast at 1 GB


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# --------------------------------------------------------------------------- the synthetic model


def layout(target_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and float32 shapes of a Llama-like model of about ``target_bytes``."""
    d = 128 if target_bytes <= 32 * MIB else 512 if target_bytes <= 320 * MIB else 1024
    ffn = 3 * d
    block = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (d, d),
        "self_attn.k_proj.weight": (d, d),
        "self_attn.v_proj.weight": (d, d),
        "self_attn.o_proj.weight": (d, d),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (ffn, d),
        "mlp.up_proj.weight": (ffn, d),
        "mlp.down_proj.weight": (d, ffn),
    }
    block_numel = sum(torch.Size(s).numel() for s in block.values())
    target = target_bytes // 4
    # Leave room for a 16*d-row embedding and lm_head first, then let their rows take the rest.
    n_layers = max(1, (target - 2 * 16 * d * d - d) // block_numel)
    vocab = max(1, (target - n_layers * block_numel - d) // (2 * d))
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(n_layers):
        shapes += [(f"model.layers.{i}.{name}", shape) for name, shape in block.items()]
    return [*shapes, ("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]


def expected_value(i: int) -> float:
    return float(i % 1000 + 1)  # tensor i holds this everywhere: a misplaced slice shows


class Model:
    """Named float32 parameters that are views of one contiguous storage ``flat``."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], device: str = "cpu") -> None:
        sizes = [torch.Size(s).numel() for _, s in shapes]
        self.flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
        self.params: dict[str, torch.Tensor] = {}
        offset = 0
        for (name, shape), numel in zip(shapes, sizes):
            self.params[name] = self.flat[offset : offset + numel].view(shape)
            offset += numel
        self.nbytes = self.flat.numel() * 4
        self.reversed_params = dict(reversed(self.params.items()))

    def fill(self) -> None:
        for i, t in enumerate(self.params.values()):
            t.fill_(expected_value(i))

    def poison(self) -> None:
        self.flat.fill_(-1.0)

    def holds_expected(self) -> bool:
        for i, t in enumerate(self.params.values()):
            lo, hi = torch.aminmax(t)
            if lo.item() != expected_value(i) or hi.item() != expected_value(i):
                return False
        return True

    def byte_view(self) -> memoryview:
        return self.flat.numpy().data.cast("B")


def reset_peak_rss() -> None:
    """Start this process's VmHWM afresh (Linux >= 4.0; best effort). Not ru_maxrss: a
    receiver would inherit the sender's through fork and exec."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def estimate_peak_bytes(size_mb: int, receivers: int, bucket_mbs: list[int]) -> int:
    """The estimated peak resident bytes of all processes, from the layout alone."""
    meta = Model(layout(size_mb * MIB), device="meta")
    biggest = 0
    for bucket_mb in bucket_mbs:
        header = broadcast.plan(meta.params, version=0, epoch=0, bucket_mb=bucket_mb)
        biggest = max(biggest, max(numel * 4 for _, numel, _, _ in header.buckets))
    return (receivers + 1) * (meta.nbytes + 2 * biggest + RUNTIME_BYTES)


# --------------------------------------------------------------------------- methods


class Kind(enum.Enum):
    BUCKETED = "bucketed"
    PACKED = "packed"
    FLAT = "flat"
    TCP = "tcp"


@dataclass(frozen=True)
class Method:
    kind: Kind
    bucket_mb: int = 0  # BUCKETED and PACKED only

    @property
    def label(self) -> str:
        if self.kind is Kind.BUCKETED:
            default = " (default)" if self.bucket_mb == DEFAULT_BUCKET_MB else ""
            return f"bucketed {self.bucket_mb} MiB{default}"
        if self.kind is Kind.PACKED:
            return f"bucketed {self.bucket_mb} MiB, packed"
        return "tcp (parallel)" if self.kind is Kind.TCP else "flat broadcast"


def rounds(methods: list[Method], warmup: int, repeats: int) -> Iterator[tuple[bool, Method]]:
    """(is_warmup, method) for every run, each round rotated by one: identical on all ranks."""
    for r in range(warmup + repeats):
        shift = r % len(methods)
        for method in methods[shift:] + methods[:shift]:
            yield r < warmup, method


@dataclass
class Peer:
    rank: int
    world_size: int
    conns: list[socket.socket]  # sender: one per receiver, in rank order; receiver: its one
    timeout_s: float
    group: SyncGroup


def send_tcp(conns: list[socket.socket], data: memoryview, timeout_s: float) -> None:
    errors: list[BaseException] = []

    def push(conn: socket.socket) -> None:
        try:
            conn.sendall(data)  # releases the GIL: the threads write concurrently
        except OSError as err:
            errors.append(err)

    threads = [threading.Thread(target=push, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"tcp send failed or passed {timeout_s} s: {errors}")


def recv_exact(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])  # the socket's timeout bounds each wait
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
        got += n


# As in the learner and the actors, one set of bucket buffers per process, reused by every sync.
_BUFFERS = broadcast.Buffers()


def transfer(peer: Peer, method: Method, model: Model, headers: dict[Method, WeightHeader]) -> float:
    """One timed transfer on every rank; returns (on all ranks) the seconds until the last
    receiver held the whole model. Raises if any receiver's bytes are wrong."""
    if peer.rank > 0:
        model.poison()
    peer.group.barrier()
    start = now()
    match method.kind:
        case Kind.BUCKETED | Kind.PACKED:
            header = headers[method]
            params = model.params if method.kind is Kind.BUCKETED else model.reversed_params
            if peer.rank == 0:
                broadcast.send(peer.group, params, header, CPU, _BUFFERS)
            else:
                broadcast.receive(peer.group, header, params, CPU, _BUFFERS)
        case Kind.FLAT:
            peer.group.broadcast(model.flat)
        case Kind.TCP:
            if peer.rank == 0:
                send_tcp(peer.conns, model.byte_view(), peer.timeout_s)
            else:
                recv_exact(peer.conns[0], model.byte_view())
    end = now()
    ok = peer.rank == 0 or model.holds_expected()
    report = torch.tensor([start, end, float(ok)], dtype=torch.float64)
    reports = peer.group.all_gather(report)
    bad = [r for r, rep in enumerate(reports) if rep[2].item() != 1.0]
    if bad:
        raise RuntimeError(f"{method.label}: receivers {bad} do not hold the sent weights")
    return max(rep[1].item() for rep in reports[1:]) - reports[0][0].item()


def measure_size(peer: Peer, size_mb: int, methods: list[Method], warmup: int, repeats: int) -> dict:
    """Every method on one model size; every rank runs it, rank 0's result is the one used."""
    reset_peak_rss()
    model = Model(layout(size_mb * MIB))
    if peer.rank == 0:
        model.fill()
    headers: dict[Method, WeightHeader] = {}
    for m in methods:
        if m.kind in (Kind.BUCKETED, Kind.PACKED):
            params = model.params if m.kind is Kind.BUCKETED else model.reversed_params
            headers[m] = broadcast.plan(params, version=1, epoch=0, bucket_mb=m.bucket_mb)
            broadcast.check_compatible(headers[m], params)
    seconds: dict[str, list[float]] = {m.label: [] for m in methods}
    for warm, method in rounds(methods, warmup, repeats):
        s = transfer(peer, method, model, headers)
        if not warm:
            seconds[method.label].append(s)
    rss = torch.tensor([peak_rss_mib()], dtype=torch.float64)
    rss_all = peer.group.all_gather(rss)
    n_buckets = {m.bucket_mb: len(h.buckets) for m, h in headers.items() if m.kind is Kind.BUCKETED}
    return {
        "size_mb": size_mb,
        "bytes": model.nbytes,
        "tensors": len(model.params),
        "receivers": peer.world_size - 1,
        "buckets": n_buckets,
        "peak_rss_mib": [round(r.item()) for r in rss_all],
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- processes


def worker(args: argparse.Namespace) -> int:
    """A receiver: join the group and the TCP listener, run the same schedule as the sender."""
    torch.set_num_threads(args.threads)
    store = connect_store("127.0.0.1", args.store_port, args.timeout_s)
    group = SyncGroup(
        store,
        epoch=args.epoch,
        rank=args.worker_rank,
        world_size=args.world_size,
        backend="gloo",
        timeout_s=args.timeout_s,
    )
    conn = None
    try:
        conn = socket.create_connection(("127.0.0.1", args.tcp_port), timeout=args.timeout_s)
        conn.sendall(struct.pack("<I", args.worker_rank))
        peer = Peer(args.worker_rank, args.world_size, [conn], args.timeout_s, group)
        for size_mb in args.sizes_mb:
            measure_size(peer, size_mb, methods_of(args), args.warmup, args.repeats)
    finally:
        if conn is not None:
            conn.close()
        group.close()
    return 0


def accept_receivers(listener: socket.socket, n: int, timeout_s: float) -> list[socket.socket]:
    by_rank: dict[int, socket.socket] = {}
    try:
        while len(by_rank) < n:
            conn, _ = listener.accept()
            conn.settimeout(timeout_s)
            hello = bytearray(4)
            recv_exact(conn, memoryview(hello))
            by_rank[struct.unpack("<I", hello)[0]] = conn
    except BaseException:
        for c in by_rank.values():
            c.close()
        raise
    return [by_rank[r] for r in sorted(by_rank)]


def stop(procs: list[subprocess.Popen], timeout_s: float) -> list[int | None]:
    """Wait for each receiver; one still running at its deadline is killed by its pid."""
    deadline = time.monotonic() + timeout_s
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            print(f"receiver pid {p.pid} still running: killing it", file=sys.stderr)
            p.kill()
            p.wait(10)
            codes.append(None)
    return codes


def run_group(args: argparse.Namespace, store: dist.TCPStore, receivers: int, sizes_mb: list[int]) -> list:
    """Start ``receivers`` processes, form the group, measure every size, end the processes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(args.timeout_s)
    procs: list[subprocess.Popen] = []
    conns: list[socket.socket] = []
    group = None
    cells = []
    try:
        common = [
            *("--store-port", str(store.port), "--tcp-port", str(listener.getsockname()[1])),
            *("--world-size", str(receivers + 1), "--epoch", str(receivers)),
            *("--sizes-mb", *map(str, sizes_mb), "--bucket-mb", *map(str, args.bucket_mb)),
            *("--warmup", str(args.warmup), "--repeats", str(args.repeats)),
            *("--threads", str(args.threads), "--timeout-s", str(args.timeout_s)),
        ]
        for rank in range(1, receivers + 1):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-rank", str(rank), *common]
            procs.append(subprocess.Popen(cmd))
        group = SyncGroup(
            store, epoch=receivers, rank=0, world_size=receivers + 1, backend="gloo", timeout_s=args.timeout_s
        )
        conns = accept_receivers(listener, receivers, args.timeout_s)
        peer = Peer(0, receivers + 1, conns, args.timeout_s, group)
        for size_mb in sizes_mb:
            print(f"measuring {size_mb} MiB x {receivers} receiver(s) ...", file=sys.stderr, flush=True)
            cells.append(measure_size(peer, size_mb, methods_of(args), args.warmup, args.repeats))
    finally:
        for c in conns:
            c.close()
        listener.close()
        if group is not None:
            group.close()
        codes = stop(procs, args.timeout_s)
    if any(c != 0 for c in codes):
        raise RuntimeError(f"receivers exited with {codes}")
    return cells


def methods_of(args: argparse.Namespace) -> list[Method]:
    return [
        *(Method(Kind.BUCKETED, b) for b in args.bucket_mb),
        Method(Kind.PACKED, DEFAULT_BUCKET_MB),
        Method(Kind.FLAT),
        Method(Kind.TCP),
    ]


# --------------------------------------------------------------------------- report


def summarize(cell: dict) -> dict:
    n, nbytes = cell["receivers"], cell["bytes"]
    flat_s = statistics.median(cell["seconds"]["flat broadcast"])
    rows = {}
    for label, times in cell["seconds"].items():
        median = statistics.median(times)
        rows[label] = {
            "median_s": median,
            "min_s": min(times),
            "gbps_per_receiver": nbytes / median / GB,
            "gbps_aggregate": n * nbytes / median / GB,
            "vs_flat": flat_s / median,  # throughput ratio: (a)/(b) for the bucketed rows
        }
    return cell | {"methods": rows}


def print_table(cells: list[dict], repeats: int) -> None:
    print(f"\n| model | tensors | receivers | method | s (median of {repeats}) | GB/s per receiver "
          "| GB/s aggregate | vs flat |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for c in cells:
        for label, r in c["methods"].items():
            print(
                f"| {c['size_mb']} MiB | {c['tensors']} | {c['receivers']} | {label} | {r['median_s']:.3f} "
                f"| {r['gbps_per_receiver']:.2f} | {r['gbps_aggregate']:.2f} | {r['vs_flat']:.2f} |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="10 MiB, 1-2 receivers, 64 and 1 MiB buckets, 2 rounds"
    )
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100, 1024, 2048], help="MiB")
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[DEFAULT_BUCKET_MB, 16, 256])
    parser.add_argument("--warmup", type=int, default=1, help="rounds dropped before the median")
    parser.add_argument("--repeats", type=int, default=5, help="rounds in the median")
    parser.add_argument("--max-mem-gb", type=float, default=7.5, help="GiB, all processes together")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="deadline of every wait")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    hidden = argparse.SUPPRESS  # a receiver is this file started by the sender
    for flag in ("--worker-rank", "--world-size", "--epoch", "--store-port", "--tcp-port"):
        parser.add_argument(flag, type=int, default=None, help=hidden)
    args = parser.parse_args(argv)
    if args.worker_rank is not None:
        return worker(args)
    if args.quick:
        args.sizes_mb, args.receivers, args.warmup, args.repeats = [10], [1, 2], 1, 2
        args.bucket_mb = [DEFAULT_BUCKET_MB, 1]  # 1 MiB: several buckets even at 10 MiB
    if min(args.sizes_mb + args.receivers + args.bucket_mb) < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("sizes, receivers, bucket sizes and repeats must be >= 1, warmup >= 0")
    # Gloo on the loopback interface, like the raw sockets it is compared with.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} on {os.cpu_count()} CPUs")

    store = host_store("127.0.0.1", 0, args.timeout_s)
    cells: list[dict] = []
    skipped: list[str] = []
    for receivers in args.receivers:
        fitting = []
        for size_mb in sorted(args.sizes_mb):
            peak = estimate_peak_bytes(size_mb, receivers, args.bucket_mb)
            if peak > args.max_mem_gb * (1 << 30):
                reason = (
                    f"skipped {size_mb} MiB x {receivers} receiver(s): estimated {peak / (1 << 30):.1f} GiB "
                    f"in {receivers + 1} processes > --max-mem-gb {args.max_mem_gb}"
                )
                print(reason)
                skipped.append(reason)
            else:
                fitting.append(size_mb)
        if fitting:
            cells += [summarize(c) for c in run_group(args, store, receivers, fitting)]
    load_after = os.getloadavg()

    print_table(cells, args.repeats)
    print("\ntcp: the sender writes to all receivers in parallel (one thread each).")
    for label in (
        Method(Kind.BUCKETED, DEFAULT_BUCKET_MB).label,
        Method(Kind.PACKED, DEFAULT_BUCKET_MB).label,
    ):
        for c in cells:
            if c["size_mb"] == 1024 and label in c["methods"]:
                ratio = c["methods"][label]["vs_flat"]
                verdict = "meets" if ratio >= TARGET_RATIO else "misses"
                print(f"1024 MiB, {c['receivers']} receiver(s): {label} / flat = {ratio:.2f} "
                      f"({verdict} the {TARGET_RATIO} target)")  # fmt: skip
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f}")
    if args.out:
        result = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": load_after,
            "settings": {k: v for k, v in vars(args).items() if k != "out" and v is not None}
            | {"tcp": "parallel, one sender thread per receiver", "gb": GB},
            "skipped": skipped,
            "cells": cells,
        }
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
