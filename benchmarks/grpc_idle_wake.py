#!/usr/bin/env python
"""What a bare gRPC call costs after the caller and the server sat idle, by CPU placement.

The gateway's overhead grows by 0.6-0.7 ms when the replica computes for 20 ms between a request
and its answer (benchmarks/NOTES.md, "The gateway asleep while a replica computes"), and a bare
grpc.aio call pays the same after an idle wait while a raw socket pays 0.03-0.07 ms ("A bare gRPC
call after an idle wait"). gRPC hands each call between several threads (the client's, the
server's completion-queue poller, its event loop). This measures whether the penalty is those
threads waking on idle cores: the same calls with the server and the client unpinned, the server
alone pinned to one or two cores, both on one core, and each on its own core.

Server: grpc.aio, a generic unary handler returning 12 KB (a 64x64 RGB frame), in its own process;
client: grpc's synchronous stub in this process, sleeping `idle` ms before each timed call.
No gateway code is involved. Usage:

    python benchmarks/grpc_idle_wake.py [--n 300] [--idle-ms 0,20] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import grpc

from grpc_front_split import _python_client, _start_server  # the same bare echo server and timed calls


def _percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50": statistics.median(xs), "p90": xs[int(0.9 * (len(xs) - 1))], "n": len(xs)}


def run_case(name: str, server_cpus: str, client_cpus: str, idle_ms: list[float], n: int) -> dict:
    all_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(c) for c in client_cpus.split(",")} if client_cpus else all_cpus)
    proc, port = _start_server("python", server_cpus)
    try:
        out = {}
        for idle in idle_ms:
            marks = _python_client(f"127.0.0.1:{port}", n, idle)
            out[f"idle {idle:g} ms"] = _percentiles([(t1 - t0) / 1e6 for t0, t1 in marks])
    finally:
        proc.kill()
        proc.wait()
        os.sched_setaffinity(0, all_cpus)
    print(f"{name}: " + ", ".join(f"{k}: p50 {v['p50']:.3f} ms, p90 {v['p90']:.3f}" for k, v in out.items()), flush=True)
    return {"case": name, "server_cpus": server_cpus or "all", "client_cpus": client_cpus or "all", "results": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--idle-ms", default="0,20")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    idle = [float(x) for x in args.idle_ms.split(",")]
    cpus = sorted(os.sched_getaffinity(0))
    # The server's placement is what a deployment controls (the gateway's process); the client's
    # is not, so most cases leave it unpinned.
    cases = [("unpinned", "", ""), ("server on one core", str(cpus[0]), ""),
             ("server and client on one core", str(cpus[0]), str(cpus[0]))]
    if len(cpus) >= 2:
        cases.append(("server on two cores", f"{cpus[0]},{cpus[1]}", ""))
        cases.append(("server on one core, client on the next", str(cpus[0]), str(cpus[1])))
    rows = []
    for rnd in range(2):  # two rounds in alternation, so drift hits every case
        for name, s, c in cases:
            rows.append({**run_case(name, s, c, idle, args.n), "round": rnd + 1})
    doc = {"cpus": len(cpus), "grpcio": grpc.__version__, "python": sys.version.split()[0], "n": args.n, "rows": rows,
           "method": "p50/p90 of n sequential unary calls (12 KB reply) from grpc's sync stub to a grpc.aio "
                     "server in another process, each call after sleeping the idle time, on a channel warmed "
                     "by 50 calls per idle setting; affinity set with sched_setaffinity before gRPC starts its threads"}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
