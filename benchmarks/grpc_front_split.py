#!/usr/bin/env python
"""Which half of a bare gRPC call pays the idle-wait penalty: the server's or the client's, and
what a native (C++) server or client would save.

After a 20 ms wait a bare Python gRPC call costs 0.7-1.0 ms more than back to back, under every
CPU placement (benchmarks/NOTES.md, "The idle-wait penalty of a bare gRPC call is not where its
threads run"). The gateway's unary overhead under service conditions is mostly that penalty. A
gRPC front outside Python has been the standing idea for the 1 ms target; this measures first what
it could win. Each call is split at the server's handler:

  in   = handler entry - client's start of the call  (client send + server receive)
  out  = client's end of the call - handler exit     (server send + client receive)

Both processes read CLOCK_MONOTONIC, so the marks of the two compare directly. Four pairings:
{Python grpc.aio server, native C++ server} x {Python sync stub, native C++ client}; each with
`n` sequential unary calls (a 12 KB reply), sleeping the idle time before each, in alternating
rounds. The native pair is built by benchmarks/grpc_front/build.sh (gRPC C++ from Debian's
packages) into .grpcnative/. No gateway code is involved. Usage:

    bash benchmarks/grpc_front/build.sh
    python benchmarks/grpc_front_split.py [--n 300] [--idle-ms 0,20] [--rounds 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(ROOT, ".grpcnative")
METHOD = "/rtdiff.bench.Echo/Call"
REQUEST = b"\x0a\x01x"  # rtdiff.bench.Blob(data=b"x"), serialised by hand: the Python side has no stubs
DUMP = b"\x0a\x04dump"  # asks the server for its handler marks
FRAME_BYTES = 64 * 64 * 3
WARMUP = 50

# The Python server: the same contract as echo_server.cc (marks at handler entry and exit, "dump"
# answers them), on grpc.aio as the gateway runs. An optional first argument, "0,1", pins it to
# those CPUs before gRPC starts its threads (benchmarks/grpc_idle_wake.py).
PY_SERVER = textwrap.dedent('''
    import asyncio, os, sys, time
    import grpc
    if len(sys.argv) > 1 and sys.argv[1]:
        os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})

    def blob(data: bytes) -> bytes:  # rtdiff.bench.Blob(data=...) by hand: field 1, length-delimited
        n, head = len(data), bytearray(b"\\x0a")
        while n >= 0x80:
            head.append((n & 0x7F) | 0x80)
            n >>= 7
        head.append(n)
        return bytes(head) + data

    FRAME = blob(b"\\x07" * (64 * 64 * 3))
    marks = []

    async def call(request, context):
        entry = time.monotonic_ns()
        if request == b"\\x0a\\x04dump":
            return blob("".join(f"{a} {b}\\n" for a, b in marks).encode())
        marks.append((entry, time.monotonic_ns()))
        return FRAME

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "rtdiff.bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(main())
''')


def _unblob(raw: bytes) -> bytes:
    """The data field of a serialised Blob (tag byte, varint length, bytes)."""
    assert raw[0] == 0x0A, raw[:4]
    i, n, shift = 1, 0, 0
    while True:
        b = raw[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return raw[i:i + n]


def _native_env() -> dict:
    """The carried gRPC C++ libraries first (the binaries' RPATH names them too)."""
    lib = os.path.join(NATIVE, "lib")
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(filter(None, [lib, os.environ.get("LD_LIBRARY_PATH")]))}


def _start_server(kind: str, cpus: str = "") -> tuple[subprocess.Popen, int]:
    """A native or Python echo server in its own process, and its port. cpus: the Python server's
    CPU affinity ("0" or "0,1"; all where empty), set before gRPC starts its threads."""
    cmd = [os.path.join(NATIVE, "echo_server")] if kind == "native" else [sys.executable, "-c", PY_SERVER, cpus]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_native_env() if kind == "native" else None)
    line = proc.stdout.readline()
    if not line.strip():
        proc.kill()
        raise RuntimeError(f"{kind} echo server did not start (exit code {proc.wait()})")
    return proc, int(line)


def _python_client(target: str, n: int, idle_ms: float) -> list[tuple[int, int]]:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)
        for _ in range(WARMUP):
            call(REQUEST)
        marks = []
        for _ in range(n):
            if idle_ms:
                time.sleep(idle_ms / 1e3)
            t0 = time.monotonic_ns()
            reply = call(REQUEST)
            marks.append((t0, time.monotonic_ns()))
            if len(_unblob(reply)) != FRAME_BYTES:
                raise RuntimeError(f"reply of {len(reply)} bytes")
    return marks


def _native_client(target: str, n: int, idle_ms: float) -> list[tuple[int, int]]:
    out = subprocess.run([os.path.join(NATIVE, "echo_client"), target, str(n), f"{idle_ms:g}", str(WARMUP)],
                         capture_output=True, text=True, timeout=300, env=_native_env())
    if out.returncode:
        raise RuntimeError(f"echo_client exited {out.returncode}: {out.stderr.strip()}")
    return [tuple(map(int, line.split())) for line in out.stdout.splitlines()]


def _server_marks(target: str) -> list[tuple[int, int]]:
    with grpc.insecure_channel(target) as channel:
        text = _unblob(channel.unary_unary(METHOD)(DUMP)).decode()
    return [tuple(map(int, line.split())) for line in text.splitlines()]


def _p50_us(xs: list[int]) -> float:
    return statistics.median(xs) / 1e3


def run_case(server: str, client: str, idle_ms: float, n: int) -> dict:
    proc, port = _start_server(server)
    target = f"127.0.0.1:{port}"
    try:
        calls = (_native_client if client == "native" else _python_client)(target, n, idle_ms)
        handler = _server_marks(target)[WARMUP:]  # the server also saw the client's warm-up calls
    finally:
        proc.kill()
        proc.wait()
    if len(handler) != len(calls):
        raise RuntimeError(f"{len(handler)} handler marks for {len(calls)} calls")
    legs = {
        "total": [t1 - t0 for (t0, t1) in calls],
        "in": [h0 - t0 for (t0, _), (h0, _) in zip(calls, handler)],
        "handler": [h1 - h0 for (h0, h1) in handler],
        "out": [t1 - h1 for (_, t1), (_, h1) in zip(calls, handler)],
    }
    row = {"server": server, "client": client, "idle_ms": idle_ms, "n": n,
           **{f"{k}_p50_us": _p50_us(v) for k, v in legs.items()},
           "total_p90_us": sorted(legs["total"])[int(0.9 * (n - 1))] / 1e3}
    print(f"server {server:6s} client {client:6s} idle {idle_ms:4g} ms: total p50 {row['total_p50_us']:7.1f} us"
          f" (in {row['in_p50_us']:6.1f}, handler {row['handler_p50_us']:5.1f}, out {row['out_p50_us']:6.1f})",
          flush=True)
    return row


def _markdown(doc: dict) -> str:
    lines = [f"# gRPC call split at the handler: {doc['cpu']} ({doc['cpus']} cores), {doc['date']}", "",
             f"grpcio {doc['grpcio']} (Python), gRPC C++ {doc['grpc_cpp']} (native); {doc['method']}", "",
             "| server | client | idle ms | round | total p50 us | in p50 | handler p50 | out p50 | total p90 |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['server']} | {r['client']} | {r['idle_ms']:g} | {r['round']} | {r['total_p50_us']:.1f} | "
                     f"{r['in_p50_us']:.1f} | {r['handler_p50_us']:.1f} | {r['out_p50_us']:.1f} | {r['total_p90_us']:.1f} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--idle-ms", default="0,20")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="", help="FILE.json; a FILE.md table is written beside it")
    args = ap.parse_args()
    for prog in ("echo_server", "echo_client"):
        if not os.access(os.path.join(NATIVE, prog), os.X_OK):
            print(f"error: {NATIVE}/{prog} is missing: run bash benchmarks/grpc_front/build.sh first", file=sys.stderr)
            return 2
    with open(os.path.join(NATIVE, "VERSION")) as f:
        version = f.read().strip()
    rows = []
    for rnd in range(args.rounds):  # alternating rounds, so drift hits every pairing
        for idle in (float(x) for x in args.idle_ms.split(",")):
            for server in ("python", "native"):
                for client in ("python", "native"):
                    rows.append({**run_case(server, client, idle, args.n), "round": rnd + 1})
    doc = {"cpu": _cpu_name(), "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
           "grpcio": grpc.__version__, "grpc_cpp": version, "python": sys.version.split()[0],
           "method": "p50 of n sequential unary calls (12 KB reply), each after sleeping the idle time; "
                     "in = handler entry - call start, out = call end - handler exit (CLOCK_MONOTONIC in both "
                     "processes), unpinned", "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
