#!/usr/bin/env python
"""What a shape bucket the replica has not seen costs the frames that bring it.

A serving replica replays one CUDA graph per (batch, height, width, schedule) bucket. The frames
of a new bucket pay every first-time cost on the serving path: the backends' per-shape set-up
(cuDNN builds an execution plan; Triton compiles and autotunes), and the graph's capture. A live
stream whose frames the gateway batched two at a time met such a bucket mid-stream and stalled for
seconds (results/stream_serving-...-batched-kv.md, window 3). This measures, for one model on its
fast paths, after the default frame is warm (as the replica's warm-up leaves it), the serving path's
calls of each new bucket, one after the other:

  first call    everything cold: by default (fast_paths.graph_capture_at_call = 1) warm-up runs,
                the capture and a replay; with --eager-first (= 2) it runs eagerly
  second call   with --eager-first the capture (no warm-up runs) and a replay
  replay        the best of 3 calls after those

for new buckets: batch 2 at the default size (replays of the captured batch of one:
pipeline.py), a new resolution, a chunk-cache-sized region and a batch of 3. As a replica does,
attention is sealed after the warm-up frame (ops/attention.py: cuDNN then takes only the shapes it
built); --compile-attention-for-new-shapes lets cuDNN build kernels for the new shapes too,
--attention picks one backend.

    python benchmarks/new_bucket.py [--device cuda] [--eager-first] [--attention auto|cudnn|torch flash]
                                    [--compile-attention-for-new-shapes] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from engine_bench import add_model_args, load_engine, resolve_model_args, write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, "cuda")
    ap.add_argument("--attention", default="auto", help="fast_paths.attention for this run")
    ap.add_argument("--compile-attention-for-new-shapes", action="store_true",
                    help="fast_paths.compile_attention_for_new_shapes: cuDNN builds kernels for new shapes too")
    ap.add_argument("--eager-first", action="store_true",
                    help="fast_paths.graph_capture_at_call = 2: a bucket's first call runs eagerly, its second captures "
                         "(an A/B)")
    ap.add_argument("--steps", type=int, default=2, help="schedule length (at strength 0.5 half of it runs)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    resolve_model_args(args)

    # A Triton cache of its own, empty: every kernel this process compiles leaves an entry in it,
    # so each row can say which kernels a new bucket compiled (a warm cache from an earlier run
    # would hide them, as it does for a replica restarted on the same machine).
    triton_cache = Path(tempfile.mkdtemp(prefix="new-bucket-triton-"))
    os.environ["TRITON_CACHE_DIR"] = str(triton_cache)

    import numpy as np
    import torch

    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline

    device = torch.device(args.device)
    model, fp = load_engine(args)
    if fp.graphs is not None:
        fp.graphs.eager_first = args.eager_first
    graphed = Pipeline(model, 4, fp.graphs, 8)
    m = model.limits.size_multiple

    def batch(n: int, w: int, h: int) -> BatchSpec:
        rng = np.random.default_rng(w * h + n)
        frames = [FrameSpec("a stream", seed=3 + i, init_image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                  for i in range(n)]
        return BatchSpec(w, h, args.steps, 0.0, 0.5, frames)

    def compiled() -> set[Path]:
        return {p for p in triton_cache.glob("*/*.json") if not p.name.startswith("__grp__")}

    def compiled_by(fn) -> tuple[float, list[str]]:
        """(fn's ms, the Triton kernels it compiled)."""
        before = compiled()
        ms = fn()
        return ms, sorted(p.stem for p in compiled() - before)

    def captures() -> int:
        return fp.graphs.captures if fp.graphs is not None else 0

    def timed(pipe: Pipeline, b: BatchSpec) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        pipe.run(b, ["a stream"] * len(b.frames), [""] * len(b.frames))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t) * 1e3

    s = args.size
    first_ms, warmup_compiled = compiled_by(lambda: timed(graphed, batch(1, s, s)))  # the warm-up frame: all cold
    # As a replica warms up: once, or twice where the first call runs eagerly.
    warmup_ms = [first_ms] + ([timed(graphed, batch(1, s, s))] if args.eager_first else [])
    fp.seal_attention()
    warm_ms = min(timed(graphed, batch(1, s, s)) for _ in range(5))
    region = max(m, (s // 2) // m * m)
    narrower = s - max(m, (s // 4) // m * m)
    rows = []
    for name, b in ((f"batch 2 at {s}", batch(2, s, s)),
                    (f"batch 1 at {narrower}x{s}", batch(1, narrower, s)),
                    (f"region {region}x{region}", batch(1, region, region)),
                    (f"batch 3 at {s}", batch(3, s, s))):
        row = {"bucket": name}
        before = captures()
        row["first_ms"], row["triton_compiled"] = compiled_by(lambda: timed(graphed, b))
        row["first_captures"] = captures() - before
        before = captures()
        row["second_ms"] = timed(graphed, b)
        row["second_captures"] = captures() - before
        row["replay_ms"] = min(timed(graphed, b) for _ in range(3))
        rows.append(row)
        print(row, flush=True)
    fields = {"source": args.source, "vae": args.vae, "size": s, "steps": args.steps, "attention": args.attention,
              "compile_attention_for_new_shapes": args.compile_attention_for_new_shapes,
              "attention_choices": fp.attention_choices(), "warm_up_frame_ms": first_ms, "warm_up_ms": warmup_ms,
              "eager_first": args.eager_first,
              "warm_up_triton_compiled": len(warmup_compiled), "default_frame_ms": warm_ms,
              "rows": rows}
    tag = "-".join(t for t in (args.attention.replace(" ", "-") if args.attention != "auto" else "",
                               "cudnn-every-shape" if args.compile_attention_for_new_shapes else "",
                               "eager-first" if args.eager_first else "") if t)
    write_results("new_bucket", args.device, fields, args.out_dir, markdown, tag)
    return 0


def markdown(r: dict) -> str:
    f = lambda v: f"{v:.0f}" if v is not None and v >= 100 else (f"{v:.1f}" if v is not None else "-")  # noqa: E731
    sealing = ("kernels built for new shapes too" if r.get("compile_attention_for_new_shapes", True)
               else "sealed after the warm-up frame")
    # Files of this stop's first A/B name the old order "capture_at_first_call"; older ones neither.
    eager = r.get("eager_first", "capture_at_first_call" in r and not r["capture_at_first_call"])
    order = ("run eagerly at its first call, captured at its second" if eager
             else "captured at its first call (warm-up runs, capture, replay)")
    warm = r.get("warm_up_ms") or [r["warm_up_frame_ms"]]
    lines = [f"# A new shape bucket on the serving path: {r['source']} ({r['gpu_name'] or r['cpu']}, {r['date']})", "",
             f"{r['steps']}-step schedule at strength 0.5, image-to-image, VAE {r['vae'] or 'own'}; attention "
             f"{r['attention']}, {sealing} ({r['attention_choices']}). A new bucket is {order}. The replica's "
             f"warm-up frame (all cold, then again): {' then '.join(f(v) for v in warm)} ms; the default frame "
             f"warm: {f(r['default_frame_ms'])} ms.", "",
             "| new bucket | first call | graphs captured | second call | graphs captured | replay | slowest call / replay |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for row in r["rows"]:
        if "first_ms" not in row:  # a file from before the first/second-call rows
            continue
        worst = max(row["first_ms"], row["second_ms"])
        lines.append(f"| {row['bucket']} | {f(row['first_ms'])} | {row['first_captures']} | {f(row['second_ms'])} | "
                     f"{row['second_captures']} | {f(row['replay_ms'])} | {worst / row['replay_ms']:.1f}x |")
    lines += ["", "Milliseconds for one call (the frame's whole pipeline, synchronised), replay the best of 3. A call "
                  "that captured nothing and was not eager ran as replays of captured batch sizes (pipeline.py)."]
    if "warm_up_triton_compiled" in r:
        lines += ["", f"Triton kernels compiled (an empty cache at the start): {r['warm_up_triton_compiled']} by the "
                      "warm-up frame; then, by each new bucket's first call:"]
        lines += [f"- {row['bucket']}: {', '.join(row['triton_compiled']) or 'none'}" for row in r["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
