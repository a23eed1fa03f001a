#!/usr/bin/env python
"""Where one SDXL UNet step's GPU time goes on our fast paths, kernel by kernel, at each size asked:
the measure before a fusion is chosen (METHOD.md: count before optimising).

Per size (batch 1, random weights, synthetic preset): the step's wall time as the replica runs it
(one CUDA graph, median of CUDA-event timings after warm-up), the number of kernels one step
launches, the sum of their GPU times (eager, torch.profiler), and the kernels grouped by name with
count and total time, largest first. The gap between the graph's wall time and the kernels' sum is
time the GPU spends between kernels.

    python benchmarks/unet_profile.py --sizes 1024,512 [--out-dir DIR]
    python benchmarks/unet_profile.py --device cpu --source synthetic:tiny-sdxl --sizes 128   # a dry run
    python benchmarks/unet_profile.py --frame 1 --sizes 1024   # a whole frame instead of a step

--frame N profiles what a replica runs for one text-to-image frame of an N-step schedule with the
tiny VAE (the pipeline's captured loop-and-decode, the copy to the host, the host's own work): its
wall time (median of synchronised calls) against the GPU time of its kernels shows what the frame
spends beyond the UNet steps and the decode.

On a CPU the rows are PyTorch's operators, nested ones included (aten::conv2d and the
aten::convolution inside it), so counts and times overlap: the dry run checks the script, not a
step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from engine_bench import load_engine, write_results  # noqa: E402
from rtdiff_cluster.config import FastPathConfig  # noqa: E402
from rtdiff_cluster.ops.attention import SMALL_ATTENTION_SCORES  # noqa: E402
from sharding import _inputs  # noqa: E402


def _step(unet, x: dict):
    return lambda: unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                        added_cond_kwargs=x["added_cond_kwargs"]).sample


def replay_ms(run, calls: int = 50) -> float:
    """Median ms of run() on the current CUDA device, by CUDA events, after three warm-up calls."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in times)


def graphed_ms(fp, key, fn, device, calls: int = 50) -> float | None:
    if device.type != "cuda" or fp.graphs is None:
        return None
    return replay_ms(lambda: fp.graphs.call(key, lambda *_: fn()), calls)


def kernel_table(fn, device) -> tuple[int, float, list[dict]]:
    """(kernels launched, their summed GPU ms, [{name, count, ms}] largest first) of one eager call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=[activity]) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = {}
    for e in prof.events():
        if device.type == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = (getattr(e, "device_time", None) or getattr(e, "cuda_time", 0) or 0) if device.type == "cuda" else e.cpu_time
        r = rows.setdefault(e.name, {"name": e.name, "count": 0, "ms": 0.0})
        r["count"] += 1
        r["ms"] += t / 1e3
    table = sorted(rows.values(), key=lambda r: -r["ms"])
    return sum(r["count"] for r in table), sum(r["ms"] for r in table), table


def frame_wall_ms(fn, device, calls: int = 30) -> float:
    """A whole frame's median wall time, host work included (it is part of what a frame costs)."""
    import time

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for _ in range(calls + 3):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[3:])


def _kernel_table(table: list[dict], top: int) -> list[str]:
    rows = ["| kernel | count | ms | us each |", "|---|--:|--:|--:|"]
    for r in table[:top]:
        name = r["name"].replace("|", "/")
        rows.append(f"| `{name[:140]}` | {r['count']} | {r['ms']:.3f} | {1e3 * r['ms'] / r['count']:.1f} |")
    return rows


def common_arguments(ap, source: str, sizes: str) -> None:
    """The options a step profile shares with benchmarks/dit_profile.py."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--source", default=source)
    ap.add_argument("--sizes", default=sizes)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--no-backend", action="append", default=[], metavar="NAME",
                    help="leave this attention backend out of the registry, e.g. flash-attn-4 (a hyphen may stand for "
                         "a space; repeatable; an A/B)")
    ap.add_argument("--knob", action="append", default=[], metavar="MODULE.NAME=INT",
                    help="a kernel's launch knob instead of the shipped value, e.g. activations._TILE_ELEMS=1024 "
                         "(rtdiff_kernels.MODULE, or a module named in full under rtdiff_cluster., e.g. "
                         "rtdiff_cluster.ops.fused.FP8_QKV_FROM_NORM=0; repeatable; an A/B: group_norm_silu's _TILE_ELEMS=4096, "
                         "_NUM_WARPS=8, _PROGRAMS_PER_SM=4 were its knobs before benchmarks/tune_pointwise.py)")


def drop_backends(registry, names) -> set[str]:
    """Leaves the named attention backends (a hyphen standing for a space) out of registry (when
    there is one); returns the names as the registry spells them."""
    dropped = {n.replace("-", " ") for n in names}
    if registry is not None:
        registry.backends = [b for b in registry.backends if b.name.replace("-", " ") not in dropped]
    return dropped


def set_knobs(ap, settings: list[str]) -> dict:
    """--knob MODULE.NAME=INT: sets rtdiff_kernels.MODULE.NAME (or, for a MODULE under
    rtdiff_cluster., that module's NAME; it must exist) and returns what was set."""
    import importlib

    done = {}
    for item in settings:
        path, _, value = item.partition("=")
        module, _, name = path.rpartition(".")
        try:
            mod = importlib.import_module(module if module.startswith("rtdiff_cluster.") else f"rtdiff_kernels.{module}")
            getattr(mod, name)
            setattr(mod, name, int(value))
        except (ImportError, AttributeError, ValueError) as e:
            ap.error(f"--knob {item!r}: {type(e).__name__}: {e}")
        done[path] = int(value)
    return done


def _knobs_note(res: dict) -> str:
    return ("; kernel knobs set: " + ", ".join(f"{k}={v}" for k, v in res["knobs"].items())) if res.get("knobs") else ""


def markdown(res: dict, top: int = 30) -> str:
    if res.get("frame_steps"):
        return _frame_markdown(res, top)
    lines = [f"# SDXL UNet step, kernel by kernel: {res['gpu_name'] or res['cpu']} ({res['date']})", "",
             f"torch {res['torch']}, diffusers {res['diffusers']}; {res['source']}, batch 1, fast paths on, "
             f"quantization {res.get('quantization', 'none')}, cross-attention K/V: {res.get('cross_kv', 'per module')}, "
             f"attention: {res.get('attention', 'cuDNN first')}; resnets' time-embedding projections: "
             f"{res.get('time_embeddings', 'per resnet')}"
             + ("; cuDNN benchmark mode (convolution engines timed per shape)" if res.get("cudnn_benchmark") else "")
             + (f"; GroupNorm tile, warps, programs per SM: {res['gn_knobs']}" if "gn_knobs" in res else "")
             + _knobs_note(res), ""]
    return "\n".join(lines + step_sections(res["sizes"], top))


def step_sections(sizes: list[dict], top: int) -> list[str]:
    """Per size: the graphed step's time, the eager step's kernels and their table."""
    lines = []
    for s in sizes:
        lines += [f"## {s['size']}x{s['size']}", "",
                  f"graphed step {s['graph_ms']:.2f} ms; eager: {s['kernels']} kernels, {s['kernel_ms']:.2f} ms of kernel time"
                  if s["graph_ms"] is not None else f"eager: {s['kernels']} kernels, {s['kernel_ms']:.2f} ms", "",
                  *_kernel_table(s["table"], top), ""]
    return lines


def _frame_markdown(res: dict, top: int) -> str:
    lines = [f"# A whole SDXL frame, kernel by kernel: {res['gpu_name'] or res['cpu']} ({res['date']})", "",
             f"torch {res['torch']}, diffusers {res['diffusers']}; {res['source']}, tiny VAE, text-to-image, "
             f"{res['frame_steps']}-step schedule, batch 1, fast paths on (CUDA graph of the loop and decode), "
             f"prompt cached; scheduler: {res.get('scheduler', 'built from its config per batch')}; "
             f"attention: {res.get('attention', 'cuDNN first')}; cross-attention K/V: "
             f"{res.get('cross_kv', 'one matmul, every step')}"
             + (f"; graphs: {res['graph_segments']}" if "graph_segments" in res else "")
             + ("; cuDNN benchmark mode (convolution engines timed per shape)" if res.get("cudnn_benchmark") else "")
             + (f"; GroupNorm tile, warps, programs per SM: {res['gn_knobs']}" if "gn_knobs" in res else "")
             + _knobs_note(res), ""]
    for s in res["sizes"]:
        lines += [f"## {s['size']}x{s['size']}", "",
                  f"frame wall time {s['wall_ms']:.2f} ms (median, synchronised); its kernels: {s['kernels']}, "
                  f"{s['kernel_ms']:.2f} ms of GPU time; the rest, {s['wall_ms'] - s['kernel_ms']:.2f} ms, is host "
                  "work and GPU idle between kernels", "", *_kernel_table(s["table"], top)]
        if "host_before_replay_ms" in s:
            lines += ["", f"The host's work before the graph's replay (the GPU waits for it): "
                          f"{s['host_before_replay_ms']:.2f} ms per frame (median). Where the host's time goes "
                          "(cProfile, per frame, cumulative; waits for the GPU included):", "",
                      "| function | ms | self ms |", "|---|--:|--:|"]
            lines += [f"| `{r['function']}` | {r['ms']:.3f} | {r['self_ms']:.3f} |" for r in s["host_profile"]]
        lines.append("")
    return "\n".join(lines)


def host_profile(fn, runs: int = 30, top: int = 25) -> tuple[float, list[dict]]:
    """The host's own work per frame: (ms from the call's start until the graph cache is asked to
    replay, i.e. while the GPU waits for the host; [{function, ms per frame}] by cumulative time)."""
    import cProfile
    import pstats
    import time

    from rtdiff_cluster.engine.graphs import GraphCache

    starts, entries = [], []
    original = GraphCache.call

    def timed_call(self, *a, **kw):
        entries.append(time.perf_counter())
        return original(self, *a, **kw)

    GraphCache.call = timed_call
    try:
        prof = cProfile.Profile()
        for _ in range(runs):
            starts.append(time.perf_counter())
            prof.enable()
            fn()
            prof.disable()
    finally:
        GraphCache.call = original
    before = statistics.median(e - s for s, e in zip(starts, entries)) * 1e3 if len(entries) == runs else float("nan")
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    rows = sorted(({"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "ms": v[3] * 1e3 / runs, "self_ms": v[2] * 1e3 / runs}
                   for k, v in stats.items()), key=lambda r: -r["ms"])
    return before, rows[:top]


def profile_frames(args, model, fp, device) -> list[dict]:
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline

    pipe = Pipeline(model, 4, fp.graphs, 8)
    out = []
    for size in (int(s) for s in args.sizes.split(",")):
        batch = BatchSpec(size, size, args.frame, 0.0, 0.0, [FrameSpec("a lighthouse at dusk", seed=5)])
        fn = lambda: pipe.run(batch, ["a lighthouse at dusk"], [""])  # noqa: E731
        wall = frame_wall_ms(fn, device)
        n, kms, table = kernel_table(fn, device)
        before, host = host_profile(fn)
        out.append({"size": size, "wall_ms": wall, "graph_ms": wall, "kernels": n, "kernel_ms": kms, "table": table,
                    "host_before_replay_ms": before, "host_profile": host})
        print(f"{size}: frame {wall:.2f} ms, {n} kernels, {kms:.2f} ms", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(ap, "synthetic:sdxl", "1024,512")
    ap.add_argument("--fp8", action="store_true", help="FP8 linears (fast_paths.quantization=fp8)")
    ap.add_argument("--fp8-min-features", type=int, default=None,
                    help="fast_paths.fp8_min_features (default: the config's)")
    ap.add_argument("--per-module-kv", action="store_true",
                    help="each cross-attention's own K/V matmul, as before ops/processors.batch_cross_kv (an A/B)")
    ap.add_argument("--per-resnet-temb", action="store_true",
                    help="each resnet's own time-embedding matmul, as before ops/fused.batch_time_embeddings (an A/B)")
    ap.add_argument("--scheduler-from-config", action="store_true",
                    help="with --frame: build each batch's scheduler from its config, as before Pipeline._scheduler (an A/B)")
    ap.add_argument("--no-small-triton", action="store_true",
                    help="attention without the registry's Triton entry for small calls: cuDNN first, as before (an A/B)")
    ap.add_argument("--kv-per-step", action="store_true",
                    help="with --frame: the cross-attention K/V projected at every step of a captured loop, as "
                         "before ops/processors.held_across_forwards (an A/B)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark on: cuDNN times its convolution engines per shape and keeps "
                         "the fastest, instead of taking its heuristic's first choice (an A/B)")
    ap.add_argument("--frame", type=int, default=0, metavar="STEPS",
                    help="profile a whole text-to-image frame of this many steps (tiny VAE) instead of a step")
    args = ap.parse_args()
    args.vae = "tiny" if args.frame else ""
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    import rtdiff_kernels.group_norm_silu as gn

    knobs = set_knobs(ap, args.knob)
    gn_knobs = f"{gn._TILE_ELEMS},{gn._NUM_WARPS},{gn._PROGRAMS_PER_SM}"
    if args.scheduler_from_config:
        from rtdiff_cluster.engine import samplers
        from rtdiff_cluster.engine.pipeline import Pipeline

        def from_config(self, sampler, steps, h, w):  # text-to-image frames only: no noise mix needs it kept
            scheduler = samplers.scheduler_for(sampler, self.model.scheduler_class, self.model.scheduler_config)
            self.family.set_timesteps(scheduler, steps, h, w)
            return scheduler

        Pipeline._scheduler = from_config
    if args.kv_per_step:
        import contextlib

        from rtdiff_cluster.engine import pipeline

        pipeline.held_across_forwards = lambda backbone: contextlib.nullcontext()
    if args.per_resnet_temb:
        from rtdiff_cluster.ops import fused

        fused.batch_time_embeddings = lambda backbone: 0
    if args.per_module_kv:
        from rtdiff_cluster.ops import processors

        processors.batch_cross_kv = lambda backbone: 0
    model, fp = load_engine(args)
    dropped = drop_backends(fp.registry, args.no_backend + (["triton (small)"] if args.no_small_triton else []))
    attention = ("the registry's order" + (f", without {', '.join(sorted(dropped))}" if dropped else "")
                 + f" (Triton for calls up to {SMALL_ATTENTION_SCORES} scores that no installed flash-attn takes)")
    device = torch.device(args.device)
    name = args.source.removeprefix("synthetic:")
    sizes = profile_frames(args, model, fp, device) if args.frame else []
    for size in (int(s) for s in args.sizes.split(",") if not args.frame):
        x = _inputs(name, 1, size, device, model.dtype)
        fn = _step(model.backbone, x)
        ms = graphed_ms(fp, ("profile", size), fn, device)
        n, kms, table = kernel_table(fn, device)
        sizes.append({"size": size, "graph_ms": ms, "kernels": n, "kernel_ms": kms, "table": table})
        print(f"{size}: graph {ms} ms, {n} kernels, {kms:.2f} ms", file=sys.stderr, flush=True)
    quant = (f"fp8 (linears with >= {args.fp8_min_features or FastPathConfig().fp8_min_features} output features)"
             if args.fp8 else "none")
    tag = "-".join(t for t, on in (("fp8", args.fp8), ("per-module-kv", args.per_module_kv),
                                   ("per-resnet-temb", args.per_resnet_temb),
                                   (f"frame-{args.frame}-step", args.frame),
                                   ("scheduler-from-config", args.scheduler_from_config),
                                   ("no-small-triton", args.no_small_triton),
                                   ("no-" + "-".join(sorted(n.replace(" ", "-") for n in args.no_backend)), args.no_backend),
                                   ("kv-per-step", args.kv_per_step),
                                   ("cudnn-benchmark", args.cudnn_benchmark),
                                   ("knobs", knobs)) if on)
    write_results("unet_profile", args.device, {"source": args.source, "quantization": quant, "sizes": sizes,
                                                "frame_steps": args.frame,
                                                "scheduler": "built from its config per batch" if args.scheduler_from_config
                                                else "a copy of one built once",
                                                "cross_kv": ("per module" if args.per_module_kv else "one matmul")
                                                + (", every step" if args.kv_per_step or not args.frame
                                                   else ", once per captured loop"),
                                                "attention": attention,
                                                "attention_backends": fp.registry.choices() if fp.registry is not None else {},
                                                "attention_left_out": sorted(dropped),
                                                "time_embeddings": "per resnet" if args.per_resnet_temb else "one matmul",
                                                "cudnn_benchmark": args.cudnn_benchmark,
                                                "gn_knobs": gn_knobs, "knobs": knobs},
                  args.out_dir, markdown, tag=tag)


if __name__ == "__main__":
    main()
