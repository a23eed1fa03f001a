"""What a batch of chunk-cache regions costs the GPU: k regions of one shape, cut from k frames of
a stream, computed in one launch (1-step image-to-image, the replica's captured loop with the
encode and decode), against one region per launch and against the whole frame. A design count for
stream_cache.region_batch: diffusers has no chunk cache to compare with (roofline.py times the
peers on whole frames, stream_serving.py the served streams).

Question it answers (issue 5's 4x): at SDXL's region sizes the UNet is launch- and
occupancy-bound (a 512 step takes 45% of a 1024 step for 25% of the FLOPs), so a batch of a
stream's consecutive regions may cost little more than one. Timed with CUDA events around
back-to-back launches after warm-up (captures), median of --reps, on real pixels (a textured clip).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import add_model_args, load_engine, resolve_model_args, source_tag, write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, "cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--regions", default="256,384,512,640", help="region sides in pixels")
    ap.add_argument("--batches", default="1,2,3,4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--lanes", type=int, default=1,
                    help="also time launches on this many CUDA streams at once, each lane its own graphs and pool: "
                         "frames per second over --reps launches per lane, wall clock, against one lane the same way")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    resolve_model_args(args, cpu_size=256)

    from rtdiff_cluster import clips
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
    from rtdiff_cluster.parallel import groups

    device = torch.device(args.device)
    model, fp = load_engine(args)
    pipe = Pipeline(model, 4, fp.graphs, 8)
    lanes = []
    if args.lanes > 1 and device.type == "cuda":
        from rtdiff_cluster.engine.graphs import GraphCache
        # Each lane's graphs in a pool of their own: one shared pool assumes one replay at a time.
        # Timing only: the lanes' GEMMs share the cuBLAS workspace of torch.cuda.graph's one
        # capture stream, so concurrent replays may race in it (no effect on their speed).
        lanes = [(Pipeline(model, 4, GraphCache(device, 64, 64 << 30), 8), torch.cuda.Stream(device))
                 for _ in range(args.lanes)]
    size = args.size
    frames = [torch.from_numpy(f).to(device) for f in clips.moving(size, size, 4, area=0.1)]

    def spec(side: int, k: int) -> BatchSpec:
        top = left = (size - side) // 2 // 64 * 64
        crop = None if side == size else (size, size, top, left)
        fs = [FrameSpec("a stream", seed=7, init_image=frames[i % len(frames)][top:top + side, left:left + side].contiguous())
              for i in range(k)]
        return BatchSpec(width=side, height=side, steps=args.steps, guidance_scale=0.0, strength=args.strength,
                         frames=fs, crop=crop)

    def timed(b: BatchSpec) -> float:
        prompts, negs = ["a stream"] * len(b.frames), [""] * len(b.frames)
        for _ in range(3):  # captures, then warm replays
            pipe.launch(b, prompts, negs, copy_out=False)
        ms = []
        for _ in range(args.reps):
            if device.type != "cuda":  # a CPU launch returns finished
                t = time.perf_counter()
                pipe.launch(b, prompts, negs, copy_out=False)
                ms.append((time.perf_counter() - t) * 1e3)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            pipe.launch(b, prompts, negs, copy_out=False)
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        return statistics.median(ms)

    def throughput(b: BatchSpec, lane_list) -> float:
        """Frames per second with every lane launching back to back, wall clock over --reps launches each."""
        prompts, negs = ["a stream"] * len(b.frames), [""] * len(b.frames)
        for p, s in lane_list:
            with torch.cuda.stream(s):
                for _ in range(3):
                    p.launch(b, prompts, negs, copy_out=False)
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(args.reps):
            for p, s in lane_list:
                with torch.cuda.stream(s):
                    p.launch(b, prompts, negs, copy_out=False)
        torch.cuda.synchronize(device)
        return args.reps * len(lane_list) * len(b.frames) / (time.perf_counter() - t)

    whole = timed(spec(size, 1))
    rows = [{"side": size, "batch": 1, "ms": whole, "ms_per_frame": whole, "x_whole": 1.0}]
    print(rows[-1], flush=True)
    for side in [int(s) for s in args.regions.split(",")]:
        one = None
        for k in [int(s) for s in args.batches.split(",")]:
            ms = timed(spec(side, k))
            one = one or ms
            rows.append({"side": side, "batch": k, "ms": ms, "ms_per_frame": ms / k, "x_whole": whole / (ms / k),
                         "x_one_by_one": one * k / ms})
            if lanes:
                rows[-1]["fps_one_lane"] = throughput(spec(side, k), lanes[:1])
                rows[-1]["fps_lanes"] = throughput(spec(side, k), lanes)
            print(rows[-1], flush=True)
    write_results("region_batch", device.type, {"source": args.source, "vae": args.vae, "size": size,
                                                "steps": args.steps, "strength": args.strength, "lanes": args.lanes, "rows": rows},
                  args.out_dir, markdown, tag="-".join(t for t in (source_tag(args), args.tag) if t))
    groups.destroy()
    return 0


def markdown(r: dict) -> str:
    lanes = r.get("lanes", 1) > 1
    lines = [f"# A batch of chunk-cache regions in one launch: {r['source']} at {r['size']}, VAE {r['vae']}", "",
             f"Device: {r.get('gpu_name') or r.get('cpu')}; {r['date_utc']}. 1-step image-to-image ({r['steps']} steps "
             f"at strength {r['strength']}), the pipeline's captured loop with encode and decode; CUDA events around "
             "each launch, median.", "",
             "| region side | batch | ms per launch | ms per frame | frames/s | x whole frame | x one by one |"
             + (f" fps, 1 stream back to back | fps, {r['lanes']} streams at once | ratio |" if lanes else ""),
             "|--:|--:|--:|--:|--:|--:|--:|" + ("--:|--:|--:|" if lanes else "")]
    for row in r["rows"]:
        line = (f"| {row['side']} | {row['batch']} | {row['ms']:.2f} | {row['ms_per_frame']:.2f} | "
                f"{1e3 / row['ms_per_frame']:.0f} | {row['x_whole']:.2f} | {row.get('x_one_by_one', 1.0):.2f} |")
        if "fps_lanes" in row:
            line += f" {row['fps_one_lane']:.0f} | {row['fps_lanes']:.0f} | {row['fps_lanes'] / row['fps_one_lane']:.2f} |"
        elif lanes:
            line += " | | |"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
