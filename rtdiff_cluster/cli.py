"""`rtdiff`: serve, generate, stream, models, demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from rtdiff_cluster.config import ServerConfig

log = logging.getLogger("rtdiff")


# ---- serve ----------------------------------------------------------------------------------

def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the gateway and its engine replicas")
    p.add_argument("--config", help="TOML file with a ServerConfig (flags override it)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (-1 disables)")
    p.add_argument("--ray-address", help="'auto' or host:port of a Ray cluster; default: start a local Ray")
    p.add_argument("--model", help="first served model: a preset (synthetic:tiny, synthetic:sdxl, synthetic:flux-dev, ...) "
                   "or a local diffusers directory")
    p.add_argument("--replicas", type=int, help="replicas (data parallel) of the first served model")
    p.add_argument("--tp", type=int, help="tensor-parallel degree: GPUs holding one shard each of the backbone")
    p.add_argument("--cfg-parallel", type=int, choices=[1, 2],
                   help="2: the unconditional and conditional passes of classifier-free guidance on two GPU groups")
    p.add_argument("--vae", help="'tiny' (presets: a seeded AutoencoderTiny) or a diffusers VAE folder to decode with")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue-delay-ms", type=float)
    p.add_argument("--max-queue-size", type=int)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--auth-token-file", help="accepted bearer tokens, one per line")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def config_from_args(args) -> ServerConfig:
    cfg = ServerConfig.from_file(args.config) if args.config else ServerConfig()
    top = {k: v for k, v in {
        "host": args.host, "port": args.port, "metrics_port": args.metrics_port,
        "ray_address": args.ray_address, "log_level": args.log_level}.items() if v is not None}
    model = {k: v for k, v in {"source": args.model, "replicas": args.replicas, "device": args.device, "tp": args.tp,
                               "cfg_parallel": args.cfg_parallel, "vae": args.vae}.items() if v is not None}
    batching = {k: v for k, v in {"max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
                                  "max_queue_size": args.max_queue_size}.items() if v is not None}
    tls = {k: v for k, v in {"cert_file": args.tls_cert, "key_file": args.tls_key,
                             "client_ca_file": args.tls_client_ca}.items() if v is not None}
    models = list(cfg.models)
    if model:
        models[0] = dataclasses.replace(models[0], **model)
    return dataclasses.replace(
        cfg, **top,
        models=models,
        batching=dataclasses.replace(cfg.batching, **batching),
        tls=dataclasses.replace(cfg.tls, **tls),
        auth=dataclasses.replace(cfg.auth, token_file=args.auth_token_file) if args.auth_token_file else cfg.auth,
    )


async def _serve(cfg: ServerConfig) -> None:
    from rtdiff_cluster.engine.group import connect_ray
    from rtdiff_cluster.gateway.server import Gateway

    for m in cfg.models:
        if m.source.startswith("synthetic:"):
            log.warning("model %s has seeded random weights: its images are noise", m.served_name)
    t0 = time.perf_counter()
    connect_ray(cfg.ray_address, sum(m.num_cpus * m.replicas * m.ranks for m in cfg.models))
    log.info("Ray %s in %.1f s", f"joined at {cfg.ray_address}" if cfg.ray_address else "started locally", time.perf_counter() - t0)
    gateway = Gateway(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(gateway.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception():
        await gateway.stop(grace_s=0)
        raise starting.exception()
    await stopping
    log.info("signal received: draining")
    await gateway.drain()
    await gateway.stop()
    starting.cancel()
    import ray

    ray.shutdown()
    log.info("stopped")


def cmd_serve(args) -> int:
    from rtdiff_cluster.models.registry import check_source

    try:
        cfg = config_from_args(args)
        for i, m in enumerate(cfg.models):
            check_source(m, f"models[{i}]")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(cfg))
    except Exception as e:
        log.error("server failed: %s: %s", type(e).__name__, e)
        return 1
    return 0


# ---- client commands ------------------------------------------------------------------------

def _client_args(p) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the gateway")
    p.add_argument("--tls", action="store_true", help="use TLS (implied by the other --tls-* flags)")
    p.add_argument("--tls-ca", default="", help="CA bundle that signed the server's certificate")
    p.add_argument("--tls-cert", default="", help="client certificate for mutual TLS")
    p.add_argument("--tls-key", default="", help="client key for mutual TLS")
    p.add_argument("--tls-server-name", default="", help="name to check in the server's certificate")
    p.add_argument("--token-file", default="", help="file whose first line is the bearer token")
    p.add_argument("--timeout", type=float, default=None, help="per-call deadline in seconds")


def _request_args(p) -> None:
    p.add_argument("--model", default="")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["png", "jpeg", "raw"], default="png")
    p.add_argument("--input-image", help="PNG or JPEG file for image-to-image")
    p.add_argument("--strength", type=float, default=0.0)
    p.add_argument("--sampler", default="", help="a sampler `rtdiff models` lists (default: the checkpoint's own)")
    p.add_argument("--target-psnr", type=float, default=0.0,
                   help="adaptive steps: the fewest steps, at most --steps (default 8), within this PSNR in dB of 8 steps")
    p.add_argument("--step-cache", type=float, default=0.0,
                   help="UNet step cache: reuse the last prediction while the first block changed less than this "
                        "fraction (e.g. 0.1; 0: off)")


def _client(args):
    from rtdiff_cluster.client.client import ClientTLS, RtdiffClient

    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    token = Path(args.token_file).read_text().splitlines()[0].strip() if args.token_file else ""
    return RtdiffClient(args.server, tls=tls, token=token, timeout_s=args.timeout)


def _input_image(path: str | None):
    if not path:
        return None
    from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

    data = Path(path).read_bytes()
    fmt = pb.IMAGE_FORMAT_JPEG if data[:3] == b"\xff\xd8\xff" else pb.IMAGE_FORMAT_PNG
    return pb.Image(format=fmt, data=data)


def _rpc_error(e: grpc.RpcError) -> int:
    print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
    return 1


def cmd_generate(args) -> int:
    from rtdiff_cluster.client.client import save_image

    try:
        with _client(args) as c:
            resp = c.generate(args.prompt, model=args.model, width=args.width, height=args.height, steps=args.steps,
                              guidance_scale=args.guidance_scale, seed=args.seed, num_images=args.num_images,
                              output_format=args.format, negative_prompt=args.negative_prompt,
                              input_image=_input_image(args.input_image), strength=args.strength,
                              sampler=args.sampler, target_psnr_db=args.target_psnr,
                              step_cache_threshold=args.step_cache)
    except grpc.RpcError as e:
        return _rpc_error(e)
    out = Path(args.output)
    for i, img in enumerate(resp.images):
        path = out if len(resp.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        save_image(img, path)
        print(f"wrote {path} ({img.width}x{img.height}, seed {img.seed})")
    a = resp.applied
    adaptive = f", {a.psnr_db_vs_reference:.1f} dB vs 8 steps" if args.target_psnr else ""
    reused = f", {a.steps_reused} reused by the step cache" if args.step_cache else ""
    print(f"{a.steps} steps, sampler {a.sampler}{adaptive}{reused}")
    t = resp.timing
    print(f"total {t.total_ms:.1f} ms (queue {t.queue_ms:.1f}, batch wait {t.batch_wait_ms:.1f}, text {t.text_encode_ms:.1f}, "
          f"denoise {t.denoise_ms:.1f}, decode {t.decode_ms:.1f}, encode {t.encode_ms:.1f})")
    if resp.synthetic:
        print(f"note: {resp.model} has seeded random weights, so its images are noise")
    return 0


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


TIMING_FIELDS = ("queue_ms", "batch_wait_ms", "text_encode_ms", "denoise_ms", "decode_ms", "encode_ms", "replica_ms",
                 "total_ms")


def _clip_frames(args):
    """Frames of a test clip (rtdiff_cluster/clips.py) at the request's size, as long as asked."""
    from rtdiff_cluster import clips

    if not (args.width and args.height):
        raise SystemExit("error: --clip needs --width and --height")
    make = {"moving": lambda: clips.moving(args.height, args.width, args.frames, area=0.1,
                                           step_px=max(4, args.width // 64)),
            "static": lambda: clips.static(args.height, args.width, args.frames),
            "cut": lambda: clips.cut(args.height, args.width, args.frames)}[args.clip]
    return iter(make())


def run_stream(client, args, out_dir: Path | None, live: bool) -> dict:
    """Streams args.frames frames, keeping args.window in flight; returns latency and FPS figures."""
    from rtdiff_cluster.client.client import FrameWindow, save_image
    from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb
    from rtdiff_cluster.client.client import FORMATS

    image = _input_image(getattr(args, "input_image", None))
    clip = _clip_frames(args) if getattr(args, "clip", "") else None
    if clip is not None and getattr(args, "clip_format", "raw") == "jpeg":
        from rtdiff_cluster import imaging

        # Encoded up front, so the client's encoding is not in the stream's timing.
        clip = iter([pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=imaging.encode(next(clip), imaging.JPEG, 90))
                     for _ in range(args.frames)])

    def frames():
        for i in range(args.frames):
            frame_image = image
            if clip is not None:
                pixels = next(clip)
                frame_image = pixels if isinstance(pixels, pb.Image) else pb.Image(
                    format=pb.IMAGE_FORMAT_RAW_RGB8, data=pixels.tobytes(), width=args.width, height=args.height)
            # A test clip is one live scene: its frames keep one seed (one noise), so what did not
            # change stays as it was; otherwise each frame gets the next seed.
            seed = args.seed if clip is not None else args.seed + i
            f = pb.FrameRequest(frame_id=i, prompt=args.prompt if i == 0 else "", model=args.model if i == 0 else "",
                                negative_prompt=args.negative_prompt, width=args.width, height=args.height, steps=args.steps,
                                guidance_scale=args.guidance_scale, seed=seed, output_format=FORMATS[args.format],
                                strength=args.strength, sampler=getattr(args, "sampler", ""),
                                target_psnr_db=getattr(args, "target_psnr", 0.0),
                                target_fps=getattr(args, "target_fps", 0.0), min_steps=getattr(args, "min_steps", 0),
                                max_cache_threshold=getattr(args, "max_cache_threshold", 0.0),
                                min_scale=getattr(args, "min_scale", 0.0),
                                cache_threshold=getattr(args, "cache_threshold", 0.0),
                                step_cache_threshold=getattr(args, "step_cache", 0.0))
            if frame_image is not None:
                f.input_image.CopyFrom(frame_image)
            yield f

    window = FrameWindow(frames(), args.window)
    latencies: list[float] = []
    t_start = time.perf_counter()
    first_at = None
    replica = ""
    steps: list[int] = []
    widths: list[int] = []  # the size each frame was computed at (the governor may shrink it)
    governed = 0
    stages: dict[str, list[float]] = {k: [] for k in TIMING_FIELDS}
    try:
        for resp in client.stream(window.requests()):
            now = time.perf_counter()
            latencies.append((now - window.done()) * 1000)
            first_at = first_at or now
            replica = resp.replica
            steps.append(resp.applied.steps)
            widths.append(resp.applied.width)
            for k in TIMING_FIELDS:
                stages[k].append(getattr(resp.timing, k))
            governed += resp.applied.governed
            if out_dir is not None:
                save_image(resp.image, out_dir / f"frame-{resp.frame_id:05d}.png")
            if live:
                fps = len(latencies) / (now - t_start)
                sys.stderr.write(f"\rframes {len(latencies)}/{args.frames}  {fps:6.1f} fps  p95 {percentile(latencies, 95):7.1f} ms"
                                 f"  steps {resp.applied.steps} ")
                sys.stderr.flush()
    finally:
        window.stop()
        if live:
            sys.stderr.write("\n")
    elapsed = time.perf_counter() - t_start
    # Sustained FPS excludes the first frame's latency (pipeline fill).
    steady = (len(latencies) - 1) / (time.perf_counter() - first_at) if first_at and len(latencies) > 1 else float("nan")
    return {"frames": len(latencies), "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99), "max_ms": max(latencies, default=float("nan")), "fps": steady, "elapsed_s": elapsed, "replica": replica,
            "steps_min": min(steps, default=0), "steps_max": max(steps, default=0), "governed_frames": governed,
            "computed_width_min": min(widths, default=0),
            # the server's own breakdown, p50 per field; client p50 minus total_ms is gRPC and the client
            "server_p50_ms": {k: percentile(v, 50) for k, v in stages.items()}}


def _print_stream_summary(r: dict) -> None:
    print(f"frames {r['frames']}  latency p50 {r['p50_ms']:.1f} ms  p95 {r['p95_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
          f"sustained {r['fps']:.2f} fps  ({r['elapsed_s']:.2f} s, replica {r['replica']})")
    if r.get("governed_frames"):
        print(f"governor: {r['governed_frames']} frames below the asked settings; steps {r['steps_min']}..{r['steps_max']}")


def cmd_stream(args) -> int:
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _client(args) as c:
            r = run_stream(c, args, out_dir, live=sys.stderr.isatty())
    except grpc.RpcError as e:
        return _rpc_error(e)
    if getattr(args, "json", False):
        print(json.dumps(r))
    else:
        _print_stream_summary(r)
    return 0


def cmd_models(args) -> int:
    try:
        with _client(args) as c:
            models = c.list_models()
    except grpc.RpcError as e:
        return _rpc_error(e)
    for m in models:
        note = "  (synthetic: seeded random weights, images are noise)" if m.synthetic else ""
        print(f"{m.name}  family {m.family}  size {m.min_size}..{m.max_size} step {m.size_multiple} "
              f"(default {m.default_width}x{m.default_height})  steps {m.min_steps}..{m.max_steps} (default {m.default_steps})  "
              f"max images {m.max_images_per_request}  replicas {m.replicas_ready}/{m.replicas}  "
              f"samplers {', '.join(m.samplers)}{note}")
    return 0


# ---- demo -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM (a server drains), then SIGKILL if it has not exited in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_serving(target: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} while starting")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{target} was not SERVING after {timeout_s:.0f} s")


def cmd_demo(args) -> int:
    """Starts `rtdiff serve` (local Ray, embedded model), generates frames through the client, stops it."""
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "rtdiff_cluster.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(metrics_port), "--model", args.model]
    print(f"$ {' '.join(cmd[2:])}", flush=True)
    server = subprocess.Popen(cmd)
    try:
        wait_serving(target, args.startup_timeout, server)
        print(f"server SERVING on {target}; metrics on http://127.0.0.1:{metrics_port}/metrics", flush=True)
        args.server, args.tls, args.tls_ca, args.tls_cert, args.tls_key = target, False, "", "", ""
        args.tls_server_name, args.token_file, args.timeout = "", "", 120.0
        with _client(args) as c:
            models = c.list_models()
            for m in models:
                print(f"model {m.name} ({m.family}, {'synthetic: its images are noise' if m.synthetic else 'real weights'})")
            resp = c.generate(args.prompt, width=args.width, height=args.height, steps=args.steps, seed=args.seed,
                              num_images=4)
            from rtdiff_cluster.client.client import save_image

            for img in resp.images:
                save_image(img, out_dir / f"generate-seed{img.seed}.png")
            print(f"Generate: 4 images of {args.width}x{args.height} in {resp.timing.total_ms:.0f} ms -> {out_dir}/generate-*.png")
            args.model, args.negative_prompt, args.guidance_scale, args.format, args.strength = "", "", 0.0, "png", 0.0
            r = run_stream(c, args, out_dir, live=sys.stderr.isatty())
        print(f"StreamGenerate -> {out_dir}/frame-*.png")
        _print_stream_summary(r)
    except (grpc.RpcError, RuntimeError, TimeoutError) as e:
        print(f"error: {e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stop_process(server, 60)
    return 0


# ---- entry ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtdiff", description="Real-time diffusion serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)

    p = sub.add_parser("generate", help="generate images with one request")
    _client_args(p)
    _request_args(p)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("-o", "--output", default="out.png", help="output path; several images get -0, -1, ... suffixes")

    p = sub.add_parser("stream", help="run a continuous stream and report latency and FPS")
    _client_args(p)
    _request_args(p)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--window", type=int, default=2, help="frames in flight")
    p.add_argument("--out-dir", default="", help="write each frame here")
    p.add_argument("--target-fps", type=float, default=0.0,
                   help="governor: hold each frame under 1/FPS by lowering steps, then raising the cache threshold")
    p.add_argument("--min-steps", type=int, default=0, help="governor: lowest steps allowed")
    p.add_argument("--max-cache-threshold", type=float, default=0.0, help="governor: highest chunk cache threshold allowed")
    p.add_argument("--min-scale", type=float, default=0.0,
                   help="governor: smallest fraction of the size it may compute frames at (0.5 or 0.75; 0: never)")
    p.add_argument("--clip", choices=["moving", "static", "cut"], default="",
                   help="image-to-image from a generated test clip (10%% of the frame moving, nothing moving, a new "
                        "scene every frame) at --width x --height, one seed for all frames")
    p.add_argument("--clip-format", choices=["raw", "jpeg"], default="raw",
                   help="how --clip frames travel: raw RGB, or JPEG at quality 90 (encoded before the stream starts)")
    p.add_argument("--cache-threshold", type=float, default=0.0,
                   help="chunk cache threshold in 0-255 levels (0: the model's; negative: compute every frame whole)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    p = sub.add_parser("models", help="list the served models and their limits")
    _client_args(p)

    p = sub.add_parser("demo", help="start a local server on the embedded model, generate and stream frames, stop")
    p.add_argument("--model", default="synthetic:tiny")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dusk")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--out-dir", default="frames")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"serve": cmd_serve, "generate": cmd_generate, "stream": cmd_stream, "models": cmd_models,
               "demo": cmd_demo}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
