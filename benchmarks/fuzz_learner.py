"""Fuzz a real learner process through its sockets.

Starts ``python -m async_rl.cli learner`` (the embedded tiny model, no warm start), then
sends random, truncated, byte-flipped, field-mutated, structurally hostile and oversized
messages to its control port (ROUTER, through a DEALER) and its trajectory port (PULL,
through a PUSH), then random and mutated queries to its rendezvous store port (torch's
TCPStore), one connection each. Reports whether the learner is still alive and answering
on every port, its malformed counter against the exact number of malformed messages sent,
and the growth of its resident memory. Ends only the process it started, by pid.

    python benchmarks/fuzz_learner.py [--messages 10000] [--store-connections 200] [--seed 0] [--run-dir DIR]

The learner is left waiting for actors throughout: it forms its weight-sync group only
after ``rollout.num_actors`` registrations, but its service thread answers the sockets from
the start, which is what this measures. It writes ``metrics.jsonl`` only from step 0 (after
the group forms), so the malformed counter is read from the rate-limited line in
``learner.log``: ``dropped malformed message (N so far)``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from async_rl.metrics import read_metrics
from async_rl.schema import (
    SCHEMA_VERSION,
    Bye,
    FinishReason,
    Heartbeat,
    LeaseRequest,
    Message,
    Register,
    Rejected,
    Response,
    SchemaError,
    TrajectoryGroup,
    decode,
    encode,
)
from async_rl.transport import Endpoints

_MAX_MESSAGE_MB = 1  # the learner's transport.max_message_mb: keeps oversized probes cheap
_LOG_PERIOD_S = 5.0  # transport.RateLimitedLog's period: one malformed line per period
_FUZZ_ID = "fuzzer"
_OVERRIDES = [
    "trainer.warmup_sft_steps=0",
    "trainer.num_threads=1",
    "trainer.idle_timeout_s=900",  # keep waiting for actors while we fuzz
    f"transport.max_message_mb={_MAX_MESSAGE_MB}",
    # The protocol has no authentication: a mutated Register that stays valid registers the
    # fuzzer as an actor. With one expected actor that would start group formation with a
    # peer that never joins; with two, the learner keeps waiting and keeps serving.
    "rollout.num_actors=2",
]


# --------------------------------------------------------------------------- messages


def _seeds() -> dict[str, list[bytes]]:
    r = Response(
        np.array([3, 4], np.int32),
        np.array([-0.5, -1.0], np.float32),
        np.array([0, 0], np.int32),
        1.0,
        FinishReason.STOP,
    )
    group = TrajectoryGroup(7, 8, _FUZZ_ID, np.array([1, 2, 3], np.int32), [r, r])
    control: list[Message] = [
        Register(_FUZZ_ID, SCHEMA_VERSION, 1, "fuzz-host"),
        LeaseRequest(_FUZZ_ID, 4),
        Heartbeat(_FUZZ_ID, 0, 1),
        Bye(_FUZZ_ID, "fuzz"),
    ]
    return {"control": [encode(m) for m in control], "trajectory": [encode(group)]}


_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**31,
    2**40,
    2**64 - 1,
    -(2**63),
    1.5,
    math.nan,
    math.inf,
    "",
    "x" * 1000,
    b"\xff" * 9,
    [1, 2],
    {"a": 1},
    msgpack.ExtType(3, b"x"),
]


def _array32(n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n)


def _bomb(rng: random.Random, limit: int) -> bytes:
    """A small message that costs msgpack a lot: huge claims, deep nesting, many containers."""
    head = b"\x83\xa1v\x01\xa1k\xa3ack\xa9lease_ids"
    match rng.randrange(4):
        case 0:  # 2**32 - 1 elements declared, nothing behind them
            return head + _array32(2**32 - 1)
        case 1:  # 1000 nested lists, each claiming half of what the message holds
            pad = limit // 2
            return head + _array32(pad // 2) * 1000 + b"\xc0" * pad
        case 2:  # as many one-byte empty maps as fit
            n = limit - 64
            return head + _array32(n) + b"\x80" * n
        case _:  # nesting past msgpack's stack
            return head + b"\x91" * 5000 + b"\xc0"


def _mutate(rng: random.Random, base: bytes) -> bytes:
    body = msgpack.unpackb(base, raw=False)
    target = body
    if "responses" in body and rng.random() < 0.5:
        target = body["responses"][0]
    key = rng.choice([*target, "v", "k", "extra"])
    if rng.random() < 0.2:
        target.pop(key, None)
    elif isinstance(target.get(key), bytes) and rng.random() < 0.5:
        raw = target[key]  # an array: resize it, or write a hostile first element
        target[key] = rng.choice(
            [raw[:-1], raw + b"\0\0\0\0", struct.pack("<f", rng.choice([math.nan, 1.0, -math.inf])) + raw[4:]]
        )
    else:
        target[key] = rng.choice(_VALUES)
    return msgpack.packb(body, use_bin_type=True)


def hostile(rng: random.Random, seeds: list[bytes], limit: int) -> tuple[str, bytes]:
    """One message and its category."""
    base = rng.choice(seeds)
    roll = rng.random()
    if roll < 0.25:
        return "random", rng.randbytes(rng.randrange(512))
    if roll < 0.40:
        return "truncated", base[: rng.randrange(len(base))]
    if roll < 0.55:
        flipped = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return "byte-flip", bytes(flipped)
    if roll < 0.90:
        return "mutated", _mutate(rng, base)
    if roll < 0.91:
        return "bomb", _bomb(rng, limit)
    return "valid", base


def is_malformed(data: bytes) -> bool:
    try:
        decode(data)
    except SchemaError:
        return True
    return False


# --------------------------------------------------------------------------- learner process


def start_learner(run_dir: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "async_rl.cli", "learner", f"run_dir={run_dir}", *_OVERRIDES]
    out = (run_dir / "learner.out").open("wb")
    # Its own session: a Ctrl-C here reaches only this script, which then stops the learner.
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_learner(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process this script started (by pid), then SIGKILL after a grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_for_endpoints(run_dir: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> Endpoints:
    path = run_dir / "endpoints.json"
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"learner exited with {proc.returncode}; see {run_dir / 'learner.out'}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout_s:.0f} s")
        time.sleep(0.1)
    return Endpoints.load(path)


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of ``pid``, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


_MALFORMED_LINE = re.compile(r"dropped malformed message \((\d+) so far\)")


def logged_malformed(run_dir: Path) -> int | None:
    counts = _MALFORMED_LINE.findall((run_dir / "learner.log").read_text(errors="replace"))
    return int(counts[-1]) if counts else None


# --------------------------------------------------------------------------- sockets


def _socket(ctx: zmq.Context, kind: int, endpoint: str, routing_id: str | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 30_000)  # a learner that stopped reading fails the run, not hangs it
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id.encode())
    sock.connect(endpoint)
    return sock


def probe(ctx: zmq.Context, endpoint: str, timeout_s: float) -> float:
    """A control round trip that changes no learner state: a Register from a future schema
    version is refused with ``Rejected``. Returns the round-trip seconds."""
    sock = _socket(ctx, zmq.DEALER, endpoint, f"probe-{time.monotonic_ns()}")
    try:
        start = time.monotonic()
        sock.send(encode(Register("probe", SCHEMA_VERSION + 1, os.getpid(), "probe")))
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"the learner did not answer a control probe within {timeout_s:.0f} s")
        reply = decode(sock.recv())
        if not isinstance(reply, Rejected):
            raise RuntimeError(f"unexpected probe reply {reply!r}")
        return time.monotonic() - start
    finally:
        sock.close()


@dataclass
class Sent:
    total: int = 0
    malformed: int = 0  # expected to reach decode and be rejected there
    oversized: int = 0  # dropped by ZMQ before Python
    by_category: Counter[str] = field(default_factory=Counter)


def fuzz(ctx: zmq.Context, endpoints: Endpoints, n: int, seed: int) -> dict[str, Sent]:
    rng = random.Random(seed)
    seeds = _seeds()
    limit = _MAX_MESSAGE_MB << 20
    sent = {"control": Sent(), "trajectory": Sent()}
    dealer = _socket(ctx, zmq.DEALER, endpoints.control, _FUZZ_ID)
    push = _socket(ctx, zmq.PUSH, endpoints.trajectory)
    try:
        for _ in range(n):
            for port, sock in (("control", dealer), ("trajectory", push)):
                category, data = hostile(rng, seeds[port], limit)
                s = sent[port]
                if port == "control" and rng.random() < 0.02:
                    # Two frames from a DEALER arrive as three at the ROUTER: always malformed.
                    category = "multi-frame"
                    sock.send_multipart([data, data])
                    s.malformed += 1
                else:
                    sock.send(data)
                    s.malformed += is_malformed(data)
                s.total += 1
                s.by_category[category] += 1
        # Over the size limit: ZMQ drops the message and the connection. On their own sockets,
        # so that no fuzz message queued behind them is lost with the connection.
        for port, kind in (("control", zmq.DEALER), ("trajectory", zmq.PUSH)):
            endpoint = endpoints.control if port == "control" else endpoints.trajectory
            for i in range(5):
                sock = _socket(ctx, kind, endpoint, f"oversized-{i}" if kind == zmq.DEALER else None)
                sock.send(rng.randbytes(limit + 1 + i))
                sent[port].total += 1
                sent[port].oversized += 1
                sent[port].by_category["oversized"] += 1
                time.sleep(0.05)
                sock.close()
    finally:
        dealer.close()
        push.close()
    return sent


def settle_malformed(ctx: zmq.Context, endpoints: Endpoints, run_dir: Path, expected: int) -> tuple[int, int]:
    """Wait until the learner's logged count reaches ``expected`` plus the sentinels sent to
    read it. Returns (count logged, sentinels)."""
    push = _socket(ctx, zmq.PUSH, endpoints.trajectory)
    sentinels, count = 0, logged_malformed(run_dir) or 0
    try:
        for _ in range(6):
            # One malformed line per period: wait out the period, then a sentinel is logged
            # with the count so far.
            time.sleep(_LOG_PERIOD_S + 0.3)
            push.send(b"\xc1")
            sentinels += 1
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                count = logged_malformed(run_dir) or 0
                if count >= expected + sentinels:
                    return count, sentinels
                time.sleep(0.1)
    finally:
        push.close()
    return count, sentinels


# --------------------------------------------------------------------------- store port

# torch's c10d TCPStore wire protocol (TCPStoreBackend.hpp): a VALIDATE query with a magic
# number opens a session; then a query byte and u64-length-prefixed keys and values.
_STORE_VALIDATE = b"\x00" + struct.pack("<I", 0x3C85F7CE)
_STORE_SET = b"\x01"


def store_message(rng: random.Random) -> bytes:
    roll = rng.random()
    huge = struct.pack("<Q", rng.choice([2**63, 2**40, 2**32, 8 << 20, 1 << 20, 8193]))
    if roll < 0.4:
        return rng.randbytes(rng.randrange(1, 256))
    if roll < 0.5:  # a wrong magic number
        return b"\x00" + rng.randbytes(20)
    if roll < 0.8:  # any query, a huge declared length
        return _STORE_VALIDATE + bytes([rng.randrange(32)]) + huge + rng.randbytes(rng.randrange(64))
    # A SET whose value never arrives.
    return _STORE_VALIDATE + _STORE_SET + struct.pack("<Q", 3) + b"key" + huge + rng.randbytes(64)


def fuzz_store(host: str, port: int, n: int, seed: int) -> None:
    """One connection per message: the store parses each connection's stream separately."""
    rng = random.Random(seed)
    for _ in range(n):
        try:
            with socket.create_connection((host, port), timeout=5) as conn:
                conn.sendall(store_message(rng))
        except OSError:
            pass  # reset or refused mid-flood: the next connection tries again


def probe_store(host: str, port: int, timeout_s: float) -> float:
    """Connect a store client (validate + ping) and count keys. Returns the seconds taken."""
    from datetime import timedelta

    import torch.distributed as dist

    start = time.monotonic()
    client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), use_libuv=True)
    client.num_keys()
    return time.monotonic() - start


# --------------------------------------------------------------------------- main


@dataclass
class Report:
    pid: int
    sent: dict[str, Sent]
    send_s: float
    malformed_logged: int
    sentinels: int
    rtt_s: list[float]  # control round trips: start-up, before, after the fuzz, after the store fuzz
    store_connections: int
    store_s: float  # a store client's connect + round trip after the store fuzz
    rss_kb: list[dict[str, int]]  # before, after the ZMQ fuzz, after the store fuzz
    alive: bool
    log: str
    out: str
    metrics: list[dict[str, Any]]

    @property
    def expected_malformed(self) -> int:
        return sum(s.malformed for s in self.sent.values())

    @property
    def rss_growth_mb(self) -> float:
        return (self.rss_kb[-1]["VmRSS"] - self.rss_kb[0]["VmRSS"]) / 1024


def run(run_dir: Path, n: int, store_connections: int, seed: int) -> Report:
    proc = start_learner(run_dir)
    ctx = zmq.Context()
    try:
        endpoints = wait_for_endpoints(run_dir, proc, timeout_s=300)
        rtt = [probe(ctx, endpoints.control, timeout_s=120), probe(ctx, endpoints.control, timeout_s=10)]
        rss = [memory_kb(proc.pid)]
        start = time.monotonic()
        sent = fuzz(ctx, endpoints, n, seed)
        send_s = time.monotonic() - start
        rtt.append(probe(ctx, endpoints.control, timeout_s=30))
        expected = sum(s.malformed for s in sent.values())
        logged, sentinels = settle_malformed(ctx, endpoints, run_dir, expected)
        rss.append(memory_kb(proc.pid))
        fuzz_store(endpoints.store_host, endpoints.store_port, store_connections, seed)
        rtt.append(probe(ctx, endpoints.control, timeout_s=30))  # ZMQ, while the store catches up
        store_s = probe_store(endpoints.store_host, endpoints.store_port, timeout_s=600)
        rss.append(memory_kb(proc.pid))
        alive = proc.poll() is None
    finally:
        ctx.term()
        stop_learner(proc)
    return Report(
        pid=proc.pid,
        sent=sent,
        send_s=send_s,
        malformed_logged=logged,
        sentinels=sentinels,
        rtt_s=rtt,
        store_connections=store_connections,
        store_s=store_s,
        rss_kb=rss,
        alive=alive,
        log=(run_dir / "learner.log").read_text(errors="replace"),
        out=(run_dir / "learner.out").read_text(errors="replace"),
        metrics=read_metrics(run_dir / "metrics.jsonl"),
    )


def print_report(r: Report, run_dir: Path) -> None:
    mb = [{k: v / 1024 for k, v in m.items()} for m in r.rss_kb]
    print(f"run dir:               {run_dir}")
    print(f"learner pid:           {r.pid} ({'alive' if r.alive else 'DEAD'} after the fuzz)")
    for port, s in r.sent.items():
        cats = ", ".join(f"{k} {v}" for k, v in sorted(s.by_category.items()))
        print(f"sent to {port:<10}    {s.total} ({cats})")
        print(f"  malformed expected:  {s.malformed}; oversized (dropped by ZMQ): {s.oversized}")
    print(f"send time:             {r.send_s:.1f} s")
    print(
        f"malformed counted:     {r.malformed_logged - r.sentinels} (learner.log, less {r.sentinels} "
        f"sentinels), expected {r.expected_malformed}"
    )
    if r.metrics:
        print(f"metrics.jsonl:         transport/malformed={r.metrics[-1].get('transport/malformed')}")
    else:
        print("metrics.jsonl:         none yet (written from step 0, after the weight-sync group forms)")
    first, before, after, during_store = r.rtt_s
    print(
        f"control round trip:    first {first:.3f} s, before {before * 1e3:.1f} ms, after {after * 1e3:.1f} ms, "
        f"after the store fuzz {during_store * 1e3:.1f} ms"
    )
    print(
        f"store port:            {r.store_connections} connections; then a client connects in {r.store_s:.2f} s"
    )
    print(
        f"learner RSS (MB):      {mb[0]['VmRSS']:.1f} -> {mb[1]['VmRSS']:.1f} (ZMQ fuzz) -> {mb[2]['VmRSS']:.1f} "
        f"(store fuzz): growth {r.rss_growth_mb:+.1f}; peak {mb[0]['VmHWM']:.1f} -> {mb[2]['VmHWM']:.1f}"
    )
    print(
        f"learner log lines:     {r.log.count('dropped malformed message')} 'dropped malformed', "
        f"{r.log.count('unexpected ')} 'unexpected <kind>', {r.log.count('rejected group')} 'rejected group', "
        f"{r.log.count(' registered (pid')} 'registered'; "
        f"{r.out.count('Error processing client message')} store tracebacks in learner.out"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=10_000, help="messages per port")
    # Each hostile connection stalls torch's TCPStore for ~0.1 s (measured): 200 keep the run short.
    parser.add_argument("--store-connections", type=int, default=200, help="connections to the store port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--max-rss-growth-mb", type=float, default=100.0)
    args = parser.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="fuzz-learner-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        report = run(run_dir, args.messages, args.store_connections, args.seed)
    except (TimeoutError, RuntimeError, OSError) as err:
        print(f"FAIL: {err}; see {run_dir / 'learner.out'}")
        return 1
    print_report(report, run_dir)
    counted = report.malformed_logged - report.sentinels
    ok = (
        report.alive
        and counted == report.expected_malformed
        and report.rss_growth_mb < args.max_rss_growth_mb
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
