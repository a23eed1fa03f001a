#!/usr/bin/env python
"""Speed and fidelity of each quality knob against the exact pipeline: samplers and step counts,
the step cache, FP8 linears, and adaptive steps, on the same weights, prompt and seed.

Every row runs the engine's Pipeline (with its fast paths and CUDA graphs, as a replica serves it)
on one text-to-image frame, plus one image-to-image row (1 step of a 2-step schedule at strength
0.5, the real-time stream setting). Per row: ms per frame (median of --runs after a warm-up that
captures the graphs), speedup against the reference, PSNR and SSIM of the frame against the
reference, and on CUDA watts and joules per frame (NVML energy over the timed runs).

References: for samplers and steps, 8 steps of the same sampler (the adaptive-steps reference);
for the step cache, the same steps uncached; for FP8, the same sampler and steps in bf16. Adaptive
rows run engine/adaptive_steps.py's calibration for several targets and report the steps it chose
and what measuring cost.

Synthetic presets have seeded random weights: their images are structured noise, so the PSNR
figures say how far a knob moves the output of this network, not how a trained model's images
look. The fidelity method is the same for real checkpoints (--source DIR).

    python benchmarks/knobs.py [--device cuda|cpu] [--source synthetic:sdxl] [--vae tiny] [--size 1024]
                               [--runs 5] [--out-dir DIR]
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

PROMPT = "a lighthouse on a cliff at dusk"
# Spread over what 1-8 steps measure on the presets (tiny: 32-41 dB, SDXL with random weights: 45-54)
TARGETS_DB = (30.0, 35.0, 40.0, 45.0, 48.0, 52.0, 60.0)
STEP_CACHE_THRESHOLDS = (0.05, 0.1, 0.2, 0.4)
SEED = 21


def timed(compute, batch, runs: int, device) -> tuple[np.ndarray, float, float | None]:
    """(image, ms p50, joules per frame or None) after one warm-up run."""
    compute(batch)
    ms = []
    e0 = _energy(device)
    for _ in range(runs):
        t = time.perf_counter()
        image = compute(batch)
        ms.append((time.perf_counter() - t) * 1e3)  # the pipeline synchronises before returning pixels
    e1 = _energy(device)
    joules = (e1 - e0) / runs if e0 is not None and e1 is not None else None
    return image, statistics.median(ms), joules


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, "cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    resolve_model_args(args)

    from rtdiff_cluster import clips, fidelity
    from rtdiff_cluster.config import FastPathConfig
    from rtdiff_cluster.engine import fastpaths
    from rtdiff_cluster.engine.adaptive_steps import StepCalibrator
    from rtdiff_cluster.engine.graphs import GraphCache
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
    from rtdiff_cluster.engine.samplers import REFERENCE_STEPS, offered
    from rtdiff_cluster.parallel import groups

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    source, vae, size = args.source, args.vae, args.size
    t_load = time.perf_counter()
    model, fp = load_engine(args)
    cfg = FastPathConfig()
    print(f"# {source} on {device} ({time.perf_counter() - t_load:.0f} s to load); fast paths: {fp.report}", flush=True)

    last_times = {}  # the latest run's StageTimes (the step cache's reuse count)

    def pipeline(graphs) -> callable:
        pipe = Pipeline(model, 4, graphs, cfg.loop_graph_max_steps)

        def run(b):
            images, last_times["t"] = pipe.run(b, [PROMPT] * len(b.frames), [""] * len(b.frames))
            return images[0]
        return run

    compute = pipeline(fp.graphs)

    def batch(steps: int, sampler: str = "", strength: float = 0.0, init=None) -> BatchSpec:
        return BatchSpec(size, size, steps, 0.0, strength, [FrameSpec(PROMPT, seed=SEED, init_image=init)],
                         sampler=sampler)

    rows: list[dict] = []

    def row(knob: str, setting: str, image, ms, joules, ref_image, ref_ms, ref_name: str, **extra) -> None:
        r = {"knob": knob, "setting": setting, "ms": ms, "fps": 1e3 / ms, "reference": ref_name,
             "x_reference": ref_ms / ms if ref_ms else None,
             "psnr_db": min(fidelity.psnr(image, ref_image), 99.0), "ssim": fidelity.ssim(image, ref_image),
             "joules_per_frame": joules, "watts": joules * 1e3 / ms if joules is not None else None, **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)

    samplers = [s for s in offered(model.limits.family) if s != "default"]
    bf16: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
    for sampler in samplers:
        ref, ref_ms, ref_j = timed(compute, batch(REFERENCE_STEPS, sampler), args.runs, device)
        bf16[sampler, REFERENCE_STEPS] = ref, ref_ms
        for steps in (1, 2, 4):
            image, ms, joules = timed(compute, batch(steps, sampler), args.runs, device)
            bf16[sampler, steps] = image, ms
            row("sampler x steps", f"{sampler}, {steps} steps", image, ms, joules, ref, ref_ms,
                f"{sampler}, {REFERENCE_STEPS} steps")
        row("sampler x steps", f"{sampler}, {REFERENCE_STEPS} steps", ref, ref_ms, ref_j, ref, ref_ms, "itself")

    init = clips.texture(size, size, seed=5)
    i2i_ref, i2i_ref_ms, _ = timed(compute, batch(REFERENCE_STEPS, samplers[0], 0.5, init), args.runs, device)
    image, ms, joules = timed(compute, batch(2, samplers[0], 0.5, init), args.runs, device)
    row("image-to-image", f"{samplers[0]}, 1 step (2 at strength 0.5)", image, ms, joules, i2i_ref, i2i_ref_ms,
        f"{samplers[0]}, 4 steps (8 at strength 0.5)")

    for steps in (4, REFERENCE_STEPS):
        ref, ref_ms = bf16[samplers[0], steps]
        for threshold in STEP_CACHE_THRESHOLDS:
            b = dataclasses.replace(batch(steps, samplers[0]), step_cache=threshold)
            image, ms, joules = timed(compute, b, args.runs, device)
            row("step cache", f"{samplers[0]}, {steps} steps, threshold {threshold:g}", image, ms, joules, ref, ref_ms,
                f"{samplers[0]}, {steps} steps, uncached", steps_reused=last_times["t"].steps_reused)

    adaptive = []
    for target in TARGETS_DB:
        cal = StepCalibrator(audit_every=0)
        t = time.perf_counter()
        chosen, c = cal.choose(dataclasses.replace(batch(REFERENCE_STEPS, samplers[0]), target_psnr_db=target), compute)
        a = {"target_db": target, "steps": chosen.steps, "psnr_db": c.psnr_db if np.isfinite(c.psnr_db) else None,
             "calibration_s": time.perf_counter() - t,
             "measured_db": {str(k): (v if np.isfinite(v) else None) for k, v in c.measured.items()},
             "ms_per_frame": bf16.get((samplers[0], chosen.steps), (None, None))[1]}
        adaptive.append(a)
        print(json.dumps(a), flush=True)

    fp8_report = "not run: needs CUDA compute capability 8.9+"
    if cuda and torch.cuda.get_device_capability(device) >= (8, 9):
        q = fastpaths.fp8_linears(model.backbone, cfg, fused_inputs=cfg.kernels)
        fp8_report = f"{q['replaced']} linears in float8, {q['skipped']} left in bf16"
        compute = pipeline(GraphCache(device, cfg.max_graphs, cfg.graph_memory_mb << 20))  # graphs of the new weights
        sampler = samplers[0]
        for steps in (1, 2, 4, REFERENCE_STEPS):
            image, ms, joules = timed(compute, batch(steps, sampler), args.runs, device)
            ref, ref_ms = bf16[sampler, steps]
            row("fp8", f"{sampler}, {steps} steps, fp8", image, ms, joules, ref, ref_ms, f"{sampler}, {steps} steps, bf16",
                psnr_vs_8_bf16_db=min(fidelity.psnr(image, bf16[sampler, REFERENCE_STEPS][0]), 99.0))

    write_results("knobs", device.type, {"source": source, "vae": vae or "model's", "size": size, "runs": args.runs,
                                         "fast_paths": fp.report, "fp8": fp8_report, "rows": rows,
                                         "adaptive": adaptive}, args.out_dir, markdown, tag=source_tag(args))
    groups.destroy()
    return 0


def markdown(r: dict) -> str:
    f = lambda v, d=1: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# Quality knobs: {r['source']} {r['size']}x{r['size']}, VAE {r['vae']}", "",
             f"Device: {r['gpu_name'] or r['cpu']} ({r['cpu_cores']} cores); torch {r['torch']}, diffusers {r['diffusers']}; "
             f"{r['date_utc']}. FP8: {r['fp8']}.", "",
             "| knob | setting | ms/frame | fps | reference | x reference | PSNR dB | SSIM | W | J/frame |",
             "|---|---|--:|--:|---|--:|--:|--:|--:|--:|"]
    for x in r["rows"]:
        lines.append(f"| {x['knob']} | {x['setting']} | {f(x['ms'])} | {f(x['fps'])} | {x['reference']} | "
                     f"{f(x['x_reference'], 2)} | {f(x['psnr_db'])} | {f(x['ssim'], 3)} | {f(x['watts'], 0)} | "
                     f"{f(x['joules_per_frame'], 2)} |")
    lines += ["", "Step cache rows: steps reused (the backbone skipped) "
              + ", ".join(f"{x['setting']}: {x['steps_reused']}" for x in r["rows"] if x["knob"] == "step cache") + "."]
    lines += ["", "## Adaptive steps (calibrated on this frame, first sampler)", "",
              "| target dB | steps chosen | its PSNR dB vs 8 steps | calibration s | ms/frame at those steps |",
              "|--:|--:|--:|--:|--:|"]
    for a in r["adaptive"]:
        lines.append(f"| {f(a['target_db'])} | {a['steps']} | {f(a['psnr_db'])} | {f(a['calibration_s'], 2)} | "
                     f"{f(a['ms_per_frame'])} |")
    lines += ["", "PSNR is capped at 99 dB (identical frames). Synthetic weights: the figures measure how far each knob "
              "moves this network's output, not the look of a trained model's images. W and J/frame come from NVML "
              "energy over a few runs (well under 2 s): indicative only."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
