"""What a chunk-cache frame costs the replica's compute thread on the host: the plan (upload and
change measure), the input taken into the cache as the frame joins its region batch, and the
batch's flush (the launch and each region's paste and copy out), per frame, with k streams'
regions per launch. A design count for issue 5's 4x: a single Python thread plans and launches
every frame of a GPU, so its milliseconds per frame bound the frames per second whatever the GPU
does. Both parts also run under cProfile, and their heaviest functions are listed.

Same path as the replica (engine/stream_frames.run_cached with a RegionBatch, the pipeline's
launch with its captured graphs), one process, no gateway. Host times are perf_counter spans of
the calls (the GPU is kept busy, not idle, as in serving: each round's work is collected only
after the next round is queued).

    python benchmarks/region_host.py [--source synthetic:sdxl] [--vae tiny] [--size 1024]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
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
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    resolve_model_args(args, cpu_size=256)

    from rtdiff_cluster import clips
    from rtdiff_cluster.cache.chunk_cache import StreamFrameCache
    from rtdiff_cluster.config import StreamCacheConfig
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
    from rtdiff_cluster.engine.stream_frames import RegionBatch, cache_settings, run_cached
    from rtdiff_cluster.parallel import groups

    device = torch.device(args.device)
    model, fp = load_engine(args)
    pipe = Pipeline(model, 4, fp.graphs, 8)
    size = args.size
    settings = cache_settings(StreamCacheConfig(), model.limits.size_multiple)
    clip = list(clips.moving(size, size, 8, area=0.1))

    def launch(b: BatchSpec, defer_capture: bool = False):
        n = len(b.frames)
        return pipe.launch(b, ["a stream"] * n, [""] * n, copy_out=False, defer_capture=defer_capture)

    def frame(i: int) -> BatchSpec:
        return BatchSpec(size, size, 2, 0.0, 0.5, [FrameSpec("a stream", seed=7, init_image=clip[i % len(clip)])])

    rows, profiles = [], {}
    for k in [int(s) for s in args.batches.split(",")]:
        caches = [StreamFrameCache(device) for _ in range(k)]
        for c in caches:
            run_cached(None, c, frame(0), settings, launch=launch).result()
        regions = RegionBatch(lambda b, tags: launch(b, defer_capture=True), k)
        spans = {"plan+join": [], "flush": []}
        profiler, planning = cProfile.Profile(), cProfile.Profile()
        pending = []
        for r in range(args.rounds + 3):
            i = 1 + r % (len(clip) - 2)  # the clip's square moves right each frame; never its wrap-around
            t = time.perf_counter()
            if r >= 3:
                planning.enable()
            done = [run_cached(None, c, frame(i), settings, launch=launch, regions=regions) for c in caches]
            if r >= 3:
                planning.disable()
            t1 = time.perf_counter()
            if r >= 3:
                profiler.enable()
            regions.flush()
            if r >= 3:
                profiler.disable()
            t2 = time.perf_counter()
            for d in pending:  # the last round's frames, collected once this round is queued
                d.result()
            pending = done
            if r >= 3:  # the first rounds capture the batch's graphs
                spans["plan+join"].append((t1 - t) * 1e3 / k)
                spans["flush"].append((t2 - t1) * 1e3 / k)
        for d in pending:
            d.result()
        row = {"batch": k, "plans": sorted({d.plan.kind for d in done}),
               **{f"{name}_ms_per_frame": statistics.median(v) for name, v in spans.items()}}
        row["host_ms_per_frame"] = row["plan+join_ms_per_frame"] + row["flush_ms_per_frame"]
        rows.append(row)
        for name, prof in (("plan + join", planning), ("flush", profiler)):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
            profiles[f"{name} at {k} regions per launch"] = out.getvalue()
        print(row, flush=True)
    write_results("region_host", device.type, {"source": args.source, "vae": args.vae, "size": size, "rows": rows,
                                               "profiles": profiles},
                  args.out_dir, markdown, tag="-".join(t for t in (source_tag(args), args.tag) if t))
    groups.destroy()
    return 0


def markdown(r: dict) -> str:
    lines = [f"# A chunk-cache frame's host time on the replica's compute thread: {r['source']} at {r['size']}, "
             f"VAE {r['vae']}", "",
             f"Device: {r.get('gpu_name') or r.get('cpu')}; {r['date_utc']}. 10%-moving clip, 1-step image-to-image, "
             "default stream_cache settings; k streams' regions per launch; medians of perf_counter spans.", "",
             "| regions per launch | plans | plan + join ms/frame | flush ms/frame | host ms/frame | frames/s the thread allows |",
             "|--:|---|--:|--:|--:|--:|"]
    for row in r["rows"]:
        lines.append(f"| {row['batch']} | {', '.join(row['plans'])} | {row['plan+join_ms_per_frame']:.2f} | "
                     f"{row['flush_ms_per_frame']:.2f} | "
                     f"{row['host_ms_per_frame']:.2f} | {1e3 / row['host_ms_per_frame']:.0f} |")
    for what, text in r["profiles"].items():
        body = text[text.find("ncalls"):] if "ncalls" in text else text
        lines += ["", f"{what[0].upper() + what[1:]}, cProfile by own time:", "", "```", body.rstrip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
