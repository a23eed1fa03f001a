#!/usr/bin/env python
"""The gRPC side of benchmarks/gateway_overhead.py, in its own process as a real client would be.

Reads one JSON command per line on stdin and answers one JSON line on stdout:

  {"op": "unary", "n": 10, "seed": 1, "case": {...}}     -> {"samples": [[client_s, server_s, work_s, replica_s], ...]}
  {"op": "stream_open", "case": {...}}                    -> {}
  {"op": "stream", "n": 10, "seed": 1}                    -> {"samples": [[client_s, server_s, work_s, replica_s], ...]}
  {"op": "stream_close"}                                  -> {}
  {"op": "throughput", "seconds": 4, "callers": 4, "case": {...}} -> {"frames": N, "seconds": S, "latency_s": [...]}
  {"op": "quit"}

case: {"width", "height", "steps", "format": "raw"|"png", "prompt"}. client_s is what the caller
saw, server_s the server's own Timing.total_ms (the difference is the gRPC round trip and client),
work_s the replica's own compute (text encode + denoise + decode + encode, from Timing), replica_s
the replica's wall time for the batch (Timing.replica_ms).
Usage: python benchmarks/grpc_caller.py HOST:PORT
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rtdiff_cluster.client.client import FORMATS, RtdiffClient  # noqa: E402
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb  # noqa: E402


def work_s(t: pb.Timing) -> float:
    return (t.text_encode_ms + t.denoise_ms + t.decode_ms + t.encode_ms) / 1e3


def unary(client: RtdiffClient, case: dict, seed: int) -> tuple[float, float, float, float]:
    t0 = time.perf_counter()
    resp = client.generate(case["prompt"], width=case["width"], height=case["height"], steps=case["steps"], seed=seed,
                           output_format=case["format"], timeout_s=60)
    dt_s = time.perf_counter() - t0
    if len(resp.images) != 1 or not resp.images[0].data:
        raise RuntimeError("gateway returned no image")
    return dt_s, resp.timing.total_ms / 1e3, work_s(resp.timing), resp.timing.replica_ms / 1e3


class WindowOneStream:
    """One StreamGenerate call whose next frame is sent only after the previous answer came back
    (window 1), so each frame's latency is pure service time."""

    def __init__(self, client: RtdiffClient, case: dict):
        self.case = case
        self._q: queue.Queue = queue.Queue()
        self._responses = client.stream(iter(self._q.get, None), timeout_s=3600)
        self._next_id = 0

    def frame(self, seed: int) -> tuple[float, float, float, float]:
        c = self.case
        req = pb.FrameRequest(frame_id=self._next_id, width=c["width"], height=c["height"], steps=c["steps"], seed=seed,
                              output_format=FORMATS[c["format"]])
        if self._next_id == 0:
            req.prompt = c["prompt"]  # later frames keep the stream's prompt
        self._next_id += 1
        t0 = time.perf_counter()
        self._q.put(req)
        resp = next(self._responses)
        dt_s = time.perf_counter() - t0
        if resp.frame_id != req.frame_id or not resp.image.data:
            raise RuntimeError(f"stream answered frame {resp.frame_id}, expected {req.frame_id}")
        return dt_s, resp.timing.total_ms / 1e3, work_s(resp.timing), resp.timing.replica_ms / 1e3

    def close(self) -> None:
        self._q.put(None)
        for _ in self._responses:  # drain to the stream's OK end
            pass


def back_to_back(calls: list, seconds: float) -> dict:
    """One thread per callable in `calls`, each calling its own back to back with seeds until
    `seconds` have passed; every call started in the window is let finish and counted, over the
    time until the last one did. (Counting only the calls that ended inside the window gave 0 frames
    where a call takes longer than the window, as a short dry run's on a loaded 2-core machine.)
    Shared with gateway_overhead.py."""
    stop = threading.Event()
    lat: list[list[float]] = [[] for _ in calls]
    errors: list[str] = []
    barrier = threading.Barrier(len(calls) + 1)

    def worker(i: int) -> None:
        seed = (i + 1) * 1_000_000
        barrier.wait()
        while not stop.is_set():
            seed += 1
            t0 = time.perf_counter()
            try:
                calls[i](seed)
            except Exception as e:  # noqa: BLE001 - reported to the caller
                errors.append(f"{type(e).__name__}: {e}")
                return
            lat[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    flat = [x for xs in lat for x in xs]
    return {"frames": len(flat), "seconds": elapsed, "latency_s": flat}


def throughput(target: str, case: dict, seconds: float, callers: int) -> dict:
    """`callers` threads, each with its own channel."""
    clients = [RtdiffClient(target) for _ in range(callers)]
    try:
        return back_to_back([lambda seed, c=c: unary(c, case, seed) for c in clients], seconds)
    finally:
        for c in clients:
            c.close()


def main() -> int:
    target = sys.argv[1]
    client = RtdiffClient(target)
    stream: WindowOneStream | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "quit":
                break
            if op == "unary":
                out = {"samples": [unary(client, cmd["case"], cmd["seed"] + i) for i in range(cmd["n"])]}
            elif op == "stream_open":
                stream = WindowOneStream(client, cmd["case"])
                out = {}
            elif op == "stream":
                out = {"samples": [stream.frame(cmd["seed"] + i) for i in range(cmd["n"])]}
            elif op == "stream_close":
                stream.close()
                stream = None
                out = {}
            elif op == "throughput":
                out = throughput(target, cmd["case"], cmd["seconds"], cmd["callers"])
            else:
                out = {"error": f"unknown op {op!r}"}
        except Exception as e:  # noqa: BLE001 - the parent reports it and stops
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
