#!/usr/bin/env python
"""The floor under the gateway-to-replica hop, without any gateway code: what a call to a no-op
actor costs through Ray and through the replica link (engine/link.py), blocking from a script and
awaited inside a grpc.aio handler, with the gRPC client in another process, all in one run.

The no-op actor returns a 12 KB frame (64x64 RGB) either way. See benchmarks/NOTES.md ("The
replica link"). Usage: python benchmarks/hop_floor.py [--n 600] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import ray  # noqa: E402

from rtdiff_cluster.engine.group import connect_ray  # noqa: E402
from rtdiff_cluster.engine.link import BlockingLink, LinkServer, ReplicaLink, new_key, node_host  # noqa: E402
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb  # noqa: E402
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2_grpc as pb_grpc  # noqa: E402

FRAME_BYTES = 64 * 64 * 3
BLOCK = 20


class Echo:
    """A replica that answers at once, reachable through Ray and through a link."""

    def __init__(self):
        self.frame = bytes(FRAME_BYTES)
        self.server = LinkServer({"echo": self.echo}, new_key())

    async def address(self):
        return await self.server.start(node_host())

    async def echo(self, x):
        return self.frame


# The client process: sequential unary calls, paths interleaved in blocks, p50 per path.
CLIENT = textwrap.dedent("""
    import statistics, sys, time, grpc
    sys.path.insert(0, sys.argv[3])
    from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb, diffusion_pb2_grpc as g
    stub = g.DiffusionStub(grpc.insecure_channel(sys.argv[1])); n = int(sys.argv[2])
    res = {p: [] for p in ("trivial", "ray", "link")}
    for rep in range(n // BLOCK + 3):
        for prompt in res:
            for i in range(BLOCK):
                t = time.perf_counter(); stub.Generate(pb.GenerateRequest(prompt=prompt)); res[prompt].append(time.perf_counter() - t)
    for p, xs in res.items(): print(p, statistics.median(xs[3 * BLOCK:]) * 1e3)
""").replace("BLOCK", str(BLOCK))


class _Servicer(pb_grpc.DiffusionServicer):
    def __init__(self, actor, link: ReplicaLink):
        self.actor, self.link = actor, link
        self.frame = bytes(FRAME_BYTES)

    async def Generate(self, request, context):
        if request.prompt == "trivial":
            data = self.frame
        elif request.prompt == "ray":
            data = await self.actor.echo.remote(0)
        else:
            data = await self.link.call("echo", 0)
        return pb.GenerateResponse(images=[pb.Image(format=pb.IMAGE_FORMAT_RAW_RGB8, data=data, width=64, height=64)])


def p50_ms(n: int, fn) -> float:
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t)
    return statistics.median(xs[n // 10:]) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    connect_ray("", 2)
    actor = ray.remote(Echo).options(num_cpus=0).remote()
    address = ray.get(actor.address.remote())
    rows: dict[str, float] = {}
    with BlockingLink(address) as link:
        for _ in range(3):  # interleaved in thirds so drift hits both
            rows.setdefault("blocking: ray.get(actor.echo.remote())", []).append(
                p50_ms(args.n // 3, lambda: ray.get(actor.echo.remote(0))))
            rows.setdefault("blocking: BlockingLink.call('echo')", []).append(p50_ms(args.n // 3, lambda: link.call("echo", 0)))
    rows = {k: statistics.median(v) for k, v in rows.items()}

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start_server():
        link = await ReplicaLink.connect(address)
        xs = []
        for _ in range(args.n):
            t = time.perf_counter()
            await link.call("echo", 0)
            xs.append(time.perf_counter() - t)
        server = grpc.aio.server()
        pb_grpc.add_DiffusionServicer_to_server(_Servicer(actor, link), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port, statistics.median(xs[args.n // 10:]) * 1e3

    server, port, awaited = asyncio.run_coroutine_threadsafe(start_server(), loop).result(60)
    rows["awaited on an event loop: ReplicaLink.call('echo')"] = awaited
    out = subprocess.run([sys.executable, "-c", CLIENT, f"127.0.0.1:{port}", str(args.n), str(REPO)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return 1
    names = {"trivial": "grpc.aio handler, no call (client in another process)",
             "ray": "grpc.aio handler awaiting the Ray call", "link": "grpc.aio handler awaiting the link call"}
    for line in out.stdout.splitlines():
        name, value = line.split()
        rows[names[name]] = float(value)
    width = max(map(len, rows))
    for name, v in rows.items():
        print(f"{name:<{width}}  p50 {v:.3f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "hop_floor", "n": args.n, "p50_ms": rows}, indent=2) + "\n")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
