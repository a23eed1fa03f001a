#!/usr/bin/env python
"""What the gateway itself costs: latency and throughput through gRPC vs calling the replica directly.

One process holds a local Ray, one engine replica (a Ray actor) and a Gateway serving that same
actor from a background thread's event loop. Every case measures both paths in the same run,
interleaved in blocks, so drift in CPU speed (turbo, neighbours, thermal) hits both alike:

  direct   ray.get(actor.run_batch.remote(BatchSpec)) from this process, one frame per batch
  gateway  RtdiffClient.generate (unary) or one StreamGenerate stream with window 1, sequential,
           so nothing is batched (max_queue_delay_ms=0)

Cases: 64x64, 1 step, RAW (tiny, so the overhead is visible; unary and stream) and 256x256,
4 steps, PNG (realistic; unary). overhead = gateway - direct, at p50 and p99, with a bootstrap 95%
interval of the p50 difference (the target: under 1 ms at p50). Throughput runs 4 concurrent
callers per path (the gateway may batch up to 8 frames). Each gateway sample also carries the
server's own total_ms, which splits the overhead into "gRPC + client" (client latency minus server
total) and "inside the gateway" (server total minus direct).

Supplementary `stub` rows put the same gateway code in front of a replica that answers at once
(StubReplica): what is left is Ray's round trip (direct) versus Ray plus the gateway, so the
overhead is measured to a few microseconds instead of within the model's run-to-run noise.

Results: benchmarks/results/gateway_overhead-<UTC date>-<device slug>.{json,md}, stamped with the
CPU, GPU, library versions and date.

    .venv/bin/python benchmarks/gateway_overhead.py [--samples 300] [--device cpu|cuda] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import queue
import random
import re
import socket
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rtdiff_cluster.cli import percentile  # noqa: E402
from rtdiff_cluster.config import BatchingConfig, ModelConfig, ServerConfig  # noqa: E402
from rtdiff_cluster.gateway.background import BackgroundGateway  # noqa: E402
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb  # noqa: E402

MODEL = "synthetic:tiny"
PROMPT = "a red fox in the snow, benchmark"
TARGET_P50_MS = 1.0
BLOCK = 10  # calls per path before switching to the other


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    height: int
    steps: int
    fmt: str  # client format name: raw | png
    samples: int  # unary samples per path
    stream_frames: int  # stream frames per path (0: no streaming row)

    @property
    def pb_format(self) -> int:
        return {"raw": pb.IMAGE_FORMAT_RAW_RGB8, "png": pb.IMAGE_FORMAT_PNG}[self.fmt]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- device stamp ------------------------------------------------------------------------------

def device_stamp(device: str) -> dict:
    import grpc
    import ray
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    return {
        "cpu_model": cpu or platform.processor() or "unknown",
        "cpu_cores": os.cpu_count(),
        "cuda_available": cuda,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "device": device,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def device_slug(stamp: dict) -> str:
    name = stamp["gpu_name"] if stamp["device"] == "cuda" and stamp["gpu_name"] else stamp["cpu_model"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "unknown"
    return f"{stamp['device']}-{slug}-{stamp['cpu_cores']}c"


# ---- the gateway, in a background thread's event loop -------------------------------------------

def batch_size_totals(gwt: BackgroundGateway) -> tuple[float, float]:
    """(sum, count) of the gateway's batch-size histogram so far."""
    total = count = 0.0
    for metric in gwt.gateway.metrics.batch_size.collect():
        for s in metric.samples:
            if s.name.endswith("_sum"):
                total += s.value
            elif s.name.endswith("_count"):
                count += s.value
    return total, count


# ---- a replica without compute ------------------------------------------------------------------

class StubReplica:
    """EngineReplica's interface, answering at once with a blank frame of the right size.

    Behind the same gateway code it leaves nothing but the serving path: Ray's actor round trip
    (direct) and Ray plus the gateway (gateway), so the difference is resolved to a few
    microseconds instead of drowning in the model's run-to-run noise. A supplementary row; the
    headline rows use the real model."""

    def __init__(self, info):
        self._info = info

    async def info(self):
        return self._info

    async def warmup(self) -> float:
        return 0.0

    async def run_batch(self, batch):
        from rtdiff_cluster.engine.replica import BatchResult, FrameResult

        frames = [FrameResult(bytes(batch.width * batch.height * 3), batch.width, batch.height, fr.output_format,
                              fr.seed, 0.0) for fr in batch.frames]
        return BatchResult(frames, 0.0, 0.0, 0.0, None)

    async def close_stream(self, stream_id: str) -> bool:
        return True

    async def stats(self):
        from rtdiff_cluster.engine.replica import ReplicaStats

        return ReplicaStats(0, 0, 0, 0, 0, 0)


def stub_actor_class():
    import ray

    if StubReplica.__module__ != "__main__":  # imported (benchmarks/ is no package): ship the class by value
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[StubReplica.__module__])
    return ray.remote(StubReplica).options(num_cpus=0, max_restarts=0)


# ---- the two paths ------------------------------------------------------------------------------

def batch_spec(case: Case, seed: int, prompt: str | None = PROMPT, stream_id: str | None = None):
    """What the gateway builds from the same request (validation.check_settings + frame_specs)."""
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec

    return BatchSpec(case.width, case.height, case.steps, 0.0, 0.0,
                     [FrameSpec(prompt, seed=seed, output_format=case.pb_format, jpeg_quality=90, stream_id=stream_id)])


def direct_once(actor, case: Case, seed: int, prompt: str | None = PROMPT, stream_id: str | None = None) -> float:
    import ray

    spec = batch_spec(case, seed, prompt, stream_id)
    t0 = time.perf_counter()
    result = ray.get(actor.run_batch.remote(spec))
    dt_s = time.perf_counter() - t0
    fr = result.frames[0]
    if fr.error or not fr.data:
        raise RuntimeError(f"direct call failed: {fr.error or 'empty frame'}")
    return dt_s


def gateway_once(client, case: Case, seed: int) -> tuple[float, float]:
    """Returns (client-observed seconds, server total seconds)."""
    t0 = time.perf_counter()
    resp = client.generate(PROMPT, width=case.width, height=case.height, steps=case.steps, seed=seed,
                           output_format=case.fmt, timeout_s=60)
    dt_s = time.perf_counter() - t0
    if len(resp.images) != 1 or not resp.images[0].data:
        raise RuntimeError("gateway returned no image")
    return dt_s, resp.timing.total_ms / 1e3


class WindowOneStream:
    """One StreamGenerate call fed from a queue: the next frame is sent only after the previous
    response came back (window 1), so each frame's latency is pure service time."""

    def __init__(self, client, case: Case):
        self.case = case
        self._q: queue.Queue = queue.Queue()
        self._responses = client.stream(self._requests(), timeout_s=600)
        self._next_id = 0

    def _requests(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            yield item

    def frame(self, seed: int) -> tuple[float, float]:
        c = self.case
        req = pb.FrameRequest(frame_id=self._next_id, width=c.width, height=c.height, steps=c.steps, seed=seed,
                              output_format=c.pb_format)
        if self._next_id == 0:
            req.prompt = PROMPT  # later frames keep the stream's prompt
        self._next_id += 1
        t0 = time.perf_counter()
        self._q.put(req)
        resp = next(self._responses)
        dt_s = time.perf_counter() - t0
        if resp.frame_id != req.frame_id or not resp.image.data:
            raise RuntimeError(f"stream answered frame {resp.frame_id}, expected {req.frame_id}")
        return dt_s, resp.timing.total_ms / 1e3

    def close(self) -> None:
        self._q.put(None)
        for _ in self._responses:  # drain to the stream's OK end
            pass


# ---- measurement --------------------------------------------------------------------------------

def interleaved(n: int, run_direct, run_gateway) -> tuple[list[float], list[tuple[float, float]]]:
    """n calls per path in alternating blocks of BLOCK; the path that goes first alternates too."""
    direct: list[float] = []
    gateway: list[tuple[float, float]] = []
    seed = 0
    block = 0
    while len(direct) < n or len(gateway) < n:
        order = ("d", "g") if block % 2 == 0 else ("g", "d")
        for path in order:
            for _ in range(min(BLOCK, n - (len(direct) if path == "d" else len(gateway)))):
                seed += 1
                if path == "d":
                    direct.append(run_direct(seed))
                else:
                    gateway.append(run_gateway(seed))
        block += 1
    return direct, gateway


def stats_ms(values_s: list[float]) -> dict:
    ms = [v * 1e3 for v in values_s]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms), "stdev_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0,
            "min_ms": min(ms), "max_ms": max(ms)}


def bootstrap_p50_diff_ci(direct_s: list[float], gateway_s: list[float], iters: int = 2000, seed: int = 1) -> list[float]:
    """95% bootstrap interval of p50(gateway) - p50(direct), in ms."""
    rng = random.Random(seed)
    diffs = []
    for _ in range(iters):
        d = rng.choices(direct_s, k=len(direct_s))
        g = rng.choices(gateway_s, k=len(gateway_s))
        diffs.append((percentile(g, 50) - percentile(d, 50)) * 1e3)
    return [percentile(diffs, 2.5), percentile(diffs, 97.5)]


def compare(kind: str, case: Case, direct_s: list[float], gateway: list[tuple[float, float]], engine: str) -> dict:
    gw_client = [g for g, _ in gateway]
    gw_server = [s for _, s in gateway]
    d, g = stats_ms(direct_s), stats_ms(gw_client)
    server = stats_ms(gw_server)
    return {
        "engine": engine,  # model: the real replica; stub: a replica that does no work
        "kind": kind,
        "case": case.name,
        "width": case.width, "height": case.height, "steps": case.steps, "format": case.fmt.upper(),
        "direct": d,
        "gateway": g,
        "gateway_server_total": server,
        "overhead_p50_ms": g["p50_ms"] - d["p50_ms"],
        "overhead_p99_ms": g["p99_ms"] - d["p99_ms"],
        "overhead_mean_ms": g["mean_ms"] - d["mean_ms"],
        "overhead_p50_ci95_ms": bootstrap_p50_diff_ci(direct_s, gw_client),
        # Where the p50 overhead sits: on the wire/client, or inside the gateway process.
        "grpc_and_client_p50_ms": percentile([(a - b) * 1e3 for a, b in gateway], 50),
        "in_gateway_p50_ms": server["p50_ms"] - d["p50_ms"],
    }


def target_status(row: dict) -> str:
    """PASS/FAIL when the p50 overhead's 95% interval lies on one side of the target; else the estimate's side, marked '?'."""
    lo, hi = row["overhead_p50_ci95_ms"]
    if hi < TARGET_P50_MS:
        return "PASS"
    if lo >= TARGET_P50_MS:
        return "FAIL"
    return ("pass?" if row["overhead_p50_ms"] < TARGET_P50_MS else "fail?")


def throughput(case: Case, seconds: float, callers: int, run_one_factory, label: str) -> dict:
    """`callers` threads each calling run_one() back to back for `seconds`; counts finished frames."""
    stop = threading.Event()
    lat: list[list[float]] = [[] for _ in range(callers)]
    errors: list[str] = []
    start_barrier = threading.Barrier(callers + 1)

    def worker(i: int) -> None:
        run_one = run_one_factory(i)
        seed = i * 1_000_000
        start_barrier.wait()
        while not stop.is_set():
            seed += 1
            t0 = time.perf_counter()
            try:
                run_one(seed)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"{type(e).__name__}: {e}")
                return
            if not stop.is_set():  # count only frames finished inside the window
                lat[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,), name=f"{label}-{i}") for i in range(callers)]
    for t in threads:
        t.start()
    start_barrier.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - t0
    for t in threads:
        t.join(120)
    if errors:
        raise RuntimeError(f"{label} throughput: {errors[0]}")
    flat = [x for lst in lat for x in lst]
    return {"frames": len(flat), "seconds": elapsed, "latency": stats_ms(flat) if flat else None}


def measure_throughput(case: Case, seconds: float, callers: int, actor, target: str, gwt: BackgroundGateway) -> dict:
    """Alternates halves (direct, gateway, direct, gateway) so both see the same machine."""
    from rtdiff_cluster.client.client import RtdiffClient

    clients = [RtdiffClient(target) for _ in range(callers)]
    try:
        def direct_factory(i):
            return lambda seed: direct_once(actor, case, seed)

        def gateway_factory(i):
            return lambda seed: gateway_once(clients[i], case, seed)

        parts = {"direct": [], "gateway": []}
        bsum0, bcount0 = batch_size_totals(gwt)
        for _ in range(2):
            parts["direct"].append(throughput(case, seconds / 2, callers, direct_factory, "direct"))
            parts["gateway"].append(throughput(case, seconds / 2, callers, gateway_factory, "gateway"))
        bsum1, bcount1 = batch_size_totals(gwt)
    finally:
        for c in clients:
            c.close()
    out = {"case": case.name, "callers": callers, "seconds_per_path": seconds}
    for path, halves in parts.items():
        frames = sum(h["frames"] for h in halves)
        secs = sum(h["seconds"] for h in halves)
        out[path] = {"frames": frames, "seconds": secs, "fps": frames / secs,
                     "halves_fps": [h["frames"] / h["seconds"] for h in halves]}
    out["gateway_mean_batch_size"] = (bsum1 - bsum0) / (bcount1 - bcount0) if bcount1 > bcount0 else None
    out["gateway_vs_direct_fps_ratio"] = out["gateway"]["fps"] / out["direct"]["fps"] if out["direct"]["fps"] else None
    return out


# ---- report -------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    st = result["device"]
    gpu = f", GPU {st['gpu_name']}" if st["gpu_name"] else ", no CUDA"
    lines = [
        f"# Gateway overhead — {st['date_utc']}",
        "",
        f"Device: {st['device']} — {st['cpu_model']} ({st['cpu_cores']} cores){gpu}; torch {st['torch']}, "
        f"ray {st['ray']}, grpcio {st['grpcio']}, Python {st['python']}.",
        "",
        f"Model {MODEL}, 1 replica; sequential calls (no batching, max_queue_delay_ms=0), direct "
        f"(`ray.get(actor.run_batch.remote(...))`) and gateway (gRPC) interleaved in blocks of {BLOCK}; "
        f"stream = one StreamGenerate with window 1. Target: the gateway adds < {TARGET_P50_MS:g} ms at p50.",
        "",
        "| engine | case | path | n | direct p50 | gateway p50 | overhead p50 (95% CI) | direct p99 | gateway p99 "
        f"| overhead p99 | direct mean | gateway mean | gRPC+client p50 | in-gateway p50 | < {TARGET_P50_MS:g} ms |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|",
    ]
    for r in result["latency"]:
        d, g = r["direct"], r["gateway"]
        lo, hi = r["overhead_p50_ci95_ms"]
        lines.append(
            f"| {r['engine']} | {r['width']}x{r['height']} {r['steps']} step{'s' if r['steps'] > 1 else ''} {r['format']} "
            f"| {r['kind']} | {d['n']} | {d['p50_ms']:.2f} | {g['p50_ms']:.2f} "
            f"| **{r['overhead_p50_ms']:+.2f}** ({lo:+.2f}..{hi:+.2f}) "
            f"| {d['p99_ms']:.2f} | {g['p99_ms']:.2f} | {r['overhead_p99_ms']:+.2f} "
            f"| {d['mean_ms']:.2f} | {g['mean_ms']:.2f} | {r['grpc_and_client_p50_ms']:.2f} | {r['in_gateway_p50_ms']:+.2f} "
            f"| {target_status(r)} |")
    lines += ["", "Latencies in ms. engine `model`: the real replica (headline rows); `stub`: the same gateway in front "
              "of a replica that answers at once, so the overhead is not hidden in the model's run-to-run noise. "
              "gRPC+client = client latency − the server's own total_ms; in-gateway = server total_ms p50 − direct p50. "
              "Last column: PASS/FAIL when the 95% bootstrap interval of the p50 overhead lies on one side of the "
              "target, pass?/fail? when it straddles it.", ""]
    if result["throughput"]:
        lines += [f"Throughput: {result['config']['callers']} concurrent callers per path, alternating halves "
                  "(gateway: max_batch_size 8, max_queue_delay_ms 0).", "",
                  "| case | direct frames/s | gateway frames/s | gateway/direct | gateway mean batch |",
                  "|---|--:|--:|--:|--:|"]
        for t in result["throughput"]:
            mb = t["gateway_mean_batch_size"]
            lines.append(f"| {t['case']} | {t['direct']['fps']:.1f} | {t['gateway']['fps']:.1f} "
                         f"| {t['gateway_vs_direct_fps_ratio']:.2f} | {'-' if mb is None else f'{mb:.2f}'} |")
        lines.append("")
    v = result["verdict"]
    judged = "; ".join(f"{x['engine']} {x['kind']} {x['overhead_p50_ms']:+.2f} ms ({x['status']})" for x in v["rows"])
    lines.append(f"Verdict (64x64 rows, where the overhead is visible): {judged} — target "
                 f"{'met' if v['pass'] else 'NOT met'} (p50 overhead < {TARGET_P50_MS:g} ms).")
    return "\n".join(lines) + "\n"


# ---- main ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(config: ServerConfig, actor, client_class):
    """A Gateway in front of `actor` in a background event loop, and a client of it; stopped on exit."""
    gwt = BackgroundGateway(config, {config.models[0].served_name: [actor]})  # waits until the replica is ready
    client = None
    try:
        client = client_class(gwt.target)
        yield gwt, client
    finally:
        if client is not None:
            client.close()
        gwt.stop()



def measure_case(case: Case, engine: str, actor, gwt: BackgroundGateway, client, args, result: dict) -> None:
    """Warm-up, interleaved unary, optional window-1 stream, optional throughput, for one case."""
    import ray

    tag = f"{engine}/{case.name}"
    log(f"[{tag}] warm-up: {args.warmup} calls per path")
    interleaved(args.warmup, lambda s: direct_once(actor, case, s), lambda s: gateway_once(client, case, s))
    log(f"[{tag}] unary: {case.samples} samples per path, interleaved")
    d, g = interleaved(case.samples, lambda s: direct_once(actor, case, s), lambda s: gateway_once(client, case, s))
    row = compare("unary", case, d, g, engine)
    result["latency"].append(row)
    log(f"[{tag}] unary p50 direct {row['direct']['p50_ms']:.2f} gateway {row['gateway']['p50_ms']:.2f} "
        f"overhead {row['overhead_p50_ms']:+.2f} ms")

    if case.stream_frames:
        log(f"[{tag}] stream: {case.stream_frames} frames per path, window 1, interleaved")
        stream = WindowOneStream(client, case)
        sid = f"bench-direct-{uuid.uuid4().hex}"
        first = [True]

        def direct_stream(seed: int) -> float:
            prompt = PROMPT if first[0] else None  # later frames use the replica's per-stream prompt, as the gateway's do
            first[0] = False
            return direct_once(actor, case, seed, prompt=prompt, stream_id=sid)

        try:
            for _ in range(max(5, args.warmup // 4)):  # the stream's own warm-up (pinning, first-frame prompt)
                stream.frame(0)
                direct_stream(0)
            d, g = interleaved(case.stream_frames, direct_stream, stream.frame)
        finally:
            stream.close()
            ray.get(actor.close_stream.remote(sid))
        row = compare("stream", case, d, g, engine)
        result["latency"].append(row)
        log(f"[{tag}] stream p50 direct {row['direct']['p50_ms']:.2f} gateway {row['gateway']['p50_ms']:.2f} "
            f"overhead {row['overhead_p50_ms']:+.2f} ms")

    if args.throughput_seconds > 0 and engine == "model":
        log(f"[{tag}] throughput: {args.callers} callers, {args.throughput_seconds:g} s per path")
        tp = measure_throughput(case, args.throughput_seconds, args.callers, actor, gwt.target, gwt)
        tp["engine"] = engine
        result["throughput"].append(tp)
        log(f"[{tag}] throughput direct {tp['direct']['fps']:.1f} fps, gateway {tp['gateway']['fps']:.1f} fps")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--samples", type=int, default=300, help="unary samples per path, 64x64 case (>= 200 advised)")
    ap.add_argument("--large-samples", type=int, default=0,
                    help="unary samples per path, 256x256 PNG case (default: samples/5, at least 40)")
    ap.add_argument("--stream-frames", type=int, default=200, help="stream frames per path, 64x64 case")
    ap.add_argument("--stub-samples", type=int, default=1000,
                    help="samples per path of the supplementary stub-engine rows (0 skips them)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up calls per path and case (>= 20)")
    ap.add_argument("--throughput-seconds", type=float, default=10.0, help="per path and case")
    ap.add_argument("--callers", type=int, default=4)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    if args.warmup < 20:
        ap.error("--warmup must be at least 20")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: CUDA is not available here")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray

    from rtdiff_cluster.client.client import RtdiffClient
    from rtdiff_cluster.engine.group import connect_ray, spawn_replicas

    small = Case("64x64-1step-raw", 64, 64, 1, "raw", args.samples, args.stream_frames)
    large = Case("256x256-4step-png", 256, 256, 4, "png", args.large_samples or max(40, args.samples // 5), 0)
    stub = Case("64x64-1step-raw", 64, 64, 1, "raw", args.stub_samples, args.stub_samples // 2)
    model_config = ModelConfig(source=MODEL, replicas=1, device=args.device)
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, models=[model_config],
                          batching=BatchingConfig(max_batch_size=8, max_queue_delay_ms=0.0))

    t_start = time.perf_counter()
    stamp = device_stamp(args.device)
    log(f"device: {stamp['cpu_model']} x{stamp['cpu_cores']}, cuda={stamp['cuda_available']} {stamp['gpu_name'] or ''}")
    connect_ray("", model_config.num_cpus * model_config.replicas)
    result: dict = {"benchmark": "gateway_overhead", "device": stamp, "model": MODEL,
                    "config": {"max_batch_size": config.batching.max_batch_size,
                               "max_queue_delay_ms": config.batching.max_queue_delay_ms,
                               "stats_interval_s": config.stats_interval_s, "torch_threads": model_config.torch_threads
                               or max(1, (os.cpu_count() or 1) // model_config.replicas),
                               "block": BLOCK, "callers": args.callers, "warmup_calls": args.warmup},
                    "latency": [], "throughput": []}
    try:
        # The model: the headline rows.
        actor = spawn_replicas(model_config, config.stats_interval_s)[0]
        with serving(config, actor, RtdiffClient) as (gwt, client):
            log(f"gateway on {gwt.target}, replica ready after {time.perf_counter() - t_start:.1f} s")
            for case in (small, large):
                measure_case(case, "model", actor, gwt, client, args, result)
            info = ray.get(actor.info.remote())
        ray.kill(actor, no_restart=True)

        # The same gateway code in front of a replica that does no work: overhead to the microsecond.
        if args.stub_samples > 0:
            stub_actor = stub_actor_class().remote(info)
            with serving(config, stub_actor, RtdiffClient) as (gwt, client):
                measure_case(stub, "stub", stub_actor, gwt, client, args, result)
            ray.kill(stub_actor, no_restart=True)
    finally:
        ray.shutdown()

    # Judged on the tiny case, where the overhead is visible; the 256x256 row's model noise is tens of ms.
    judged = [r for r in result["latency"] if r["width"] == small.width and r["steps"] == small.steps]
    result["verdict"] = {
        "target_p50_ms": TARGET_P50_MS,
        "rows": [{"engine": r["engine"], "kind": r["kind"], "case": r["case"], "overhead_p50_ms": r["overhead_p50_ms"],
                  "overhead_p50_ci95_ms": r["overhead_p50_ci95_ms"], "status": target_status(r)} for r in judged],
        "pass": all(r["overhead_p50_ms"] < TARGET_P50_MS for r in judged),
    }
    result["runtime_s"] = time.perf_counter() - t_start

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gateway_overhead-{stamp['date_utc'][:10]}-{device_slug(stamp)}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out_dir / f"{stem}.md").write_text(md)
    log(f"wrote {out_dir / stem}.json and .md in {result['runtime_s']:.0f} s")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
