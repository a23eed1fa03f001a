#!/usr/bin/env python
"""Chunk cache of image-to-image streams: speed and fidelity of each knob against the exact pipeline.

For each clip (rtdiff_cluster/clips.py: 10% of the frame moving, a static scene, a cut every frame)
and each setting (cache off; on with halo 32 or 64 px; a higher threshold; region sizes in 16ths of
the frame instead of quarters, with halo 32, 16 or 0; 32 px chunks; for a DiT on our attention
processor, halo 32 with the static tokens' recorded keys and values), the clip's frames run
through engine/stream_frames.run_cached, the code the replica serves them with. "off" computes every
frame whole: it is both the baseline for speed and the exact output the cached frames are compared
with (same weights, inputs, seed). Each setting runs the clip twice: a warm-up pass (CUDA graph
captures of the region shapes) and the measured pass, each with a fresh cache.

Reported per row: ms per frame (p50 over the frames after the first, which is always whole), fps
and its ratio to "off", frames answered from the cache, the fraction of chunks recomputed and of
the frame's area computed, PSNR against the exact frames overall, on the static region (pixels the
clip never changes) and on the recomputed chunks, SSIM overall, and on CUDA watts and joules per
frame (NVML energy over the pass).

    python benchmarks/stream_cache.py [--device cpu|cuda] [--source synthetic:tiny] [--size 512]
                                      [--frames 12] [--steps 2] [--strength 0.5] [--out-dir DIR]
                                      [--clips "10% moving"] [--settings "on, halo 0, 16 buckets"] [--tag T]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine_bench import add_model_args, load_engine, resolve_model_args, source_tag, write_results  # noqa: E402
from sharding import _energy  # noqa: E402

SETTINGS = {  # name -> StreamCacheConfig overrides; None: cache off
    "off": None,
    "on, halo 32": dict(halo_px=32),
    "on, halo 64": dict(halo_px=64),
    "on, halo 32, threshold 8": dict(halo_px=32, threshold=8.0),
    "on, halo 32, 16 buckets": dict(halo_px=32, region_buckets=16),  # smaller regions, more shapes
    # Tighter regions still: less context at the region's edge, 32 px chunks around the motion.
    "on, halo 16, 16 buckets": dict(halo_px=16, region_buckets=16),
    "on, halo 0, 16 buckets": dict(halo_px=0, region_buckets=16),
    "on, 32 px chunks, halo 16, 32 buckets": dict(chunk_px=32, halo_px=16, region_buckets=32),
}


def run_pass(compute, frames, size, steps, strength, settings, device, token_px=0):
    """One pass over the clip; returns outputs, per-frame ms, plans and joules."""
    from rtdiff_cluster.cache.chunk_cache import StreamFrameCache
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec
    from rtdiff_cluster.engine.stream_frames import run_cached

    cache = StreamFrameCache(device)
    outs, ms, plans = [], [], []
    e0, t0 = _energy(device), time.perf_counter()
    for img in frames:
        batch = BatchSpec(size, size, steps, 0.0, strength, [FrameSpec("a stream", seed=11, init_image=img)])
        t = time.perf_counter()
        if settings is None:
            out, plan = compute(batch)[0][0], None
        else:
            done = run_cached(compute, cache, batch, settings, token_px)
            out, plan = done.pixels, done.plan
        ms.append((time.perf_counter() - t) * 1e3)  # the pipeline synchronises before it returns pixels
        outs.append(out)
        plans.append(plan)
    e1, wall = _energy(device), time.perf_counter() - t0
    joules = (e1 - e0) if e0 is not None and e1 is not None else None
    return outs, ms, plans, joules, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, "cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--clips", default="", help="comma-separated clip names to run (default: all)")
    ap.add_argument("--settings", default="",
                    help="semicolon-separated settings to run besides 'off' (default: all); e.g. 'on, halo 32'")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    resolve_model_args(args, cpu_size=512)
    chosen = [name.strip() for name in args.settings.split(";") if name.strip()]
    unknown = [name for name in chosen if name not in SETTINGS]
    if unknown:
        ap.error(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    known_clips = ("10% moving", "static", "cut every frame")
    if args.clips and set(args.clips.split(",")) - set(known_clips):
        ap.error(f"--clips: unknown {sorted(set(args.clips.split(',')) - set(known_clips))}; known: {list(known_clips)}")

    from rtdiff_cluster import clips, fidelity
    from rtdiff_cluster.config import StreamCacheConfig
    from rtdiff_cluster.engine.pipeline import Pipeline
    from rtdiff_cluster.engine.stream_frames import cache_settings, dit_token_px
    from rtdiff_cluster.parallel import groups

    device = torch.device(args.device)
    source, vae, size = args.source, args.vae, args.size
    if device.type != "cuda":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    t_load = time.perf_counter()
    model, fp = load_engine(args)
    pipe = Pipeline(model, 4, fp.graphs, 8)
    print(f"# {source} on {device} ({time.perf_counter() - t_load:.0f} s to load); fast paths: {fp.report}", flush=True)
    compute = lambda b: pipe.run(b, ["a stream"] * len(b.frames), [""] * len(b.frames))  # noqa: E731

    clip_frames = {
        "10% moving": list(clips.moving(size, size, args.frames, area=0.1, step_px=max(4, size // 64))),
        "static": list(clips.static(size, size, args.frames)),
        "cut every frame": list(clips.cut(size, size, args.frames)),
    }
    if args.clips:
        clip_frames = {name: clip_frames[name] for name in args.clips.split(",")}
    settings_chosen = {name: o for name, o in SETTINGS.items() if name == "off" or not chosen or name in chosen}
    rows = []
    for clip, frames in clip_frames.items():
        changed_ever = np.zeros(frames[0].shape[:2], bool)
        for a, b in zip(frames, frames[1:]):
            changed_ever |= (a != b).any(axis=2)
        static_mask = ~changed_ever
        exact = None
        base_ms = None
        # A DiT on our attention processor also runs with its regions attending to the recorded
        # keys and values of the static tokens (stream_cache.dit_token_kv).
        token_px = dit_token_px(model)
        settings_run = list(settings_chosen.items()) + ([("on, halo 32, token K/V", dict(halo_px=32))] if token_px else [])
        for name, overrides in settings_run:
            settings = None if overrides is None else cache_settings(
                StreamCacheConfig(**overrides), model.limits.size_multiple)
            kv_px = token_px if name.endswith("token K/V") else 0
            run_pass(compute, frames, size, args.steps, args.strength, settings, device, kv_px)  # warm-up, captures
            outs, ms, plans, joules, wall = run_pass(compute, frames, size, args.steps, args.strength, settings, device,
                                                     kv_px)
            if exact is None:
                exact = outs
            p50 = statistics.median(ms[1:])
            base_ms = base_ms or p50
            row = {"clip": clip, "setting": name, "ms_p50": p50, "ms_p90": sorted(ms[1:])[(9 * (len(ms) - 1)) // 10],
                   "fps": 1e3 / p50, "x_off": base_ms / p50, "frames": len(frames)}
            if plans[0] is not None:
                later = plans[1:]
                row["from_cache"] = sum(p.kind == "cache" for p in later)
                row["recomputed_fraction"] = float(np.mean([p.recomputed_fraction for p in later]))
                row["computed_area"] = float(np.mean([0.0 if p.kind == "cache" else 1.0 if p.kind == "full"
                                                      else p.region.height * p.region.width / size ** 2 for p in later]))
                rec = [fidelity.psnr(o, e, np.kron(p.changed, np.ones((settings.chunk_px,) * 2, bool))[:size, :size])
                       for o, e, p in zip(outs[1:], exact[1:], later) if p.kind == "region"]
                row["psnr_recomputed_db"] = float(np.mean(rec)) if rec else None
            pairs = list(zip(outs[1:], exact[1:]))
            row["psnr_db"] = float(np.mean([min(fidelity.psnr(o, e), 99.0) for o, e in pairs]))
            row["psnr_static_db"] = (float(np.mean([min(fidelity.psnr(o, e, static_mask), 99.0) for o, e in pairs]))
                                     if static_mask.any() else None)
            row["ssim"] = float(np.mean([fidelity.ssim(o, e) for o, e in pairs[:4]]))
            if joules is not None:
                row["watts"] = joules / wall
                row["joules_per_frame"] = joules / len(frames)
            rows.append(row)
            print(json.dumps(row), flush=True)

    write_results("stream_cache", device.type, {"source": source, "vae": vae or "model's", "size": size,
                                                "steps": args.steps, "strength": args.strength, "rows": rows,
                                                "graphs": dataclasses.asdict(fp.graphs.stats()) if fp.graphs else None},
                  args.out_dir, markdown, tag="-".join(t for t in (source_tag(args), args.tag) if t))
    groups.destroy()
    return 0


def markdown(r: dict) -> str:
    f = lambda v, d=1: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# Stream chunk cache: {r['source']} {r['size']}x{r['size']}, {r['steps']} steps at strength "
             f"{r['strength']}, VAE {r['vae']}", "",
             f"Device: {r['gpu_name'] or r['cpu']} ({r['cpu_cores']} cores); torch {r['torch']}, diffusers {r['diffusers']}; "
             f"{r['date_utc']}", "",
             "| clip | setting | ms p50 | fps | x off | from cache | chunks recomputed | area computed | PSNR dB | "
             "PSNR static dB | PSNR recomputed dB | SSIM | W | J/frame |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for x in r["rows"]:
        lines.append(f"| {x['clip']} | {x['setting']} | {f(x['ms_p50'])} | {f(x['fps'])} | {f(x['x_off'], 2)} | "
                     f"{x.get('from_cache', '-')}/{x['frames'] - 1} | {f(x.get('recomputed_fraction'), 2)} | "
                     f"{f(x.get('computed_area'), 2)} | {f(x['psnr_db'])} | {f(x['psnr_static_db'])} | "
                     f"{f(x.get('psnr_recomputed_db'))} | {f(x['ssim'], 3)} | {f(x.get('watts'), 0)} | "
                     f"{f(x.get('joules_per_frame'), 2)} |")
    lines += ["", "PSNR is capped at 99 dB per frame (identical frames). `off` computes every frame whole: it is the "
              "speed baseline and the exact output. Static region: pixels the clip never changes."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
