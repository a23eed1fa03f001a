#!/usr/bin/env python
"""Whether the next batch's host work overlaps this batch's GPU work, as a single-GPU replica runs
frames (engine/replica.py: the compute thread launches a batch and moves on, a waiter collects).

Per case (SDXL with the tiny VAE by default: a 1-step text-to-image frame, and the stream's
image-to-image frame, 2 steps at strength 0.5, each at 1024 and 512), after warm-up:
- one by one: each frame launched and collected before the next (median wall ms);
- pipelined: up to `--window` frames in flight, the oldest collected when the window is full
  (wall ms per frame over the run);
- the synchronising CUDA calls one launch makes, counted by PyTorch's sync debug mode in separate
  launches after the timed ones (its warnings cost host time): each one holds the host until
  every batch still queued on the stream has finished, so the GPU then idles through the rest of
  the launch's host work.

--blocking-copies is the A/B: the scheduler's timesteps set on every batch's copy and the
image-to-image noise mixed by the scheduler's add_noise, each a blocking copy to the device, as
before Pipeline._scheduler was configured once per (sampler, steps, size) and _noised_input mixed
with coefficients found once.

    python benchmarks/launch_overlap.py [--blocking-copies] [--out-dir DIR]
    python benchmarks/launch_overlap.py --device cpu --sizes 64 --frames 4   # a dry run
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine_bench import add_model_args, load_engine, resolve_model_args, write_results  # noqa: E402

PROMPT = "a lighthouse at dusk"


def cases(size: int) -> list[tuple[str, int, float]]:
    """(name, steps, strength): what a frame of each kind runs."""
    return [(f"text-to-image 1 step, {size}", 1, 0.0), (f"image-to-image 2 steps at 0.5, {size}", 2, 0.5)]


def batch_for(size: int, steps: int, strength: float, seed: int, init: np.ndarray | None):
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec

    return BatchSpec(size, size, steps, 0.0, strength, [FrameSpec(PROMPT, seed=seed, init_image=init)])


def use_blocking_copies() -> None:
    """The pipeline as it was: each batch's scheduler configured on its copy, the noise mixed by the
    scheduler (both make blocking copies to the device)."""
    import copy

    from rtdiff_cluster.engine import pipeline

    templates: dict = {}  # per sampler, built once (as Pipeline._scheduler did before)

    def scheduler(self, sampler, steps, h, w):
        if sampler not in templates:
            templates[sampler] = pipeline.scheduler_for(sampler, self.model.scheduler_class, self.model.scheduler_config)
        out = copy.deepcopy(templates[sampler])
        self.family.set_timesteps(out, steps, h, w)
        return out

    pipeline.Pipeline._scheduler = scheduler
    pipeline.Pipeline._noised_input = lambda self, key, s, begin, noise, init, t0: self.family.initial_latents(
        s, noise, init, t0)


def count_syncs(launch, cuda: bool, launches: int = 5) -> float:
    """Median synchronising CUDA calls per launch(i), counted by PyTorch's sync debug mode in warn
    mode, apart from the timed runs (each warning costs host time). Each launched frame is
    collected after the count: collecting waits by design."""
    counts = []
    for i in range(launches):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                launched = launch(i)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message).lower() for w in caught))
        launched.result()
    return statistics.median(counts)


def measure(pipe, device, size: int, steps: int, strength: float, frames: int, window: int) -> dict:
    from rtdiff_cluster import clips

    init = clips.texture(size, size, seed=3) if strength > 0 else None
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for seed in range(3):  # warm-up: graphs, the scheduler's configuration, the prompt
        pipe.run(batch_for(size, steps, strength, seed, init), [PROMPT], [""])
    one_by_one = []
    for i in range(frames):
        sync()
        t = time.perf_counter()
        pipe.run(batch_for(size, steps, strength, i % 8, init), [PROMPT], [""])
        one_by_one.append((time.perf_counter() - t) * 1e3)

    in_flight: collections.deque = collections.deque()
    sync()
    t = time.perf_counter()
    for i in range(frames):
        in_flight.append(pipe.launch(batch_for(size, steps, strength, i % 8, init), [PROMPT], [""]))
        if len(in_flight) >= window:
            in_flight.popleft().result()
    while in_flight:
        in_flight.popleft().result()
    pipelined = (time.perf_counter() - t) * 1e3 / frames
    syncs = count_syncs(lambda i: pipe.launch(batch_for(size, steps, strength, i % 8, init), [PROMPT], [""]), cuda)
    return {"syncs_per_launch": syncs, "one_by_one_ms": statistics.median(one_by_one), "pipelined_ms": pipelined, "fps": 1e3 / pipelined}


def markdown(res: dict) -> str:
    lines = [f"# Host work overlapping GPU work: {res['gpu_name'] or res['cpu']} ({res['date']})", "",
             f"torch {res['torch']}, diffusers {res['diffusers']}; {res['source']}, VAE {res['vae'] or 'as loaded'}, "
             f"batch 1, fast paths on; {res['frames']} frames per case, pipelined with {res['window']} in flight; "
             f"launch: {res['launch']}", "",
             "| frame | one by one, ms (median) | pipelined, ms per frame | fps | synchronising calls per launch |",
             "|---|--:|--:|--:|--:|"]
    lines += [f"| {r['case']} | {r['one_by_one_ms']:.2f} | {r['pipelined_ms']:.2f} | {r['fps']:.1f} | "
              f"{r['syncs_per_launch']:g} |" for r in res["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, "cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="1024,512")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--window", type=int, default=2, help="frames in flight when pipelined (the replica's waiter)")
    ap.add_argument("--blocking-copies", action="store_true",
                    help="configure each batch's scheduler and mix its noise with blocking copies, as before (an A/B)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    resolve_model_args(args)
    if args.blocking_copies:
        use_blocking_copies()
    from rtdiff_cluster.engine.pipeline import Pipeline

    model, fp = load_engine(args)
    device = torch.device(args.device)
    pipe = Pipeline(model, 4, fp.graphs)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for name, steps, strength in cases(size):
            r = {"case": name, **measure(pipe, device, size, steps, strength, args.frames, args.window)}
            rows.append(r)
            print(f"{name}: one by one {r['one_by_one_ms']:.2f} ms, pipelined {r['pipelined_ms']:.2f} ms, "
                  f"{r['syncs_per_launch']:g} syncs per launch", file=sys.stderr, flush=True)
    write_results("launch_overlap", args.device,
                  {"source": args.source, "vae": args.vae, "frames": args.frames, "window": args.window, "rows": rows,
                   "launch": "blocking copies per batch (as before)" if args.blocking_copies
                   else "no blocking copy once a configuration has run"},
                  args.out_dir, markdown, tag="blocking-copies" if args.blocking_copies else "")


if __name__ == "__main__":
    main()
