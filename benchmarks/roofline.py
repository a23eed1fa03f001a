#!/usr/bin/env python
"""Our fast paths against diffusers eager and diffusers + torch.compile, on one GPU, in one run:
the SDXL UNet step at 512 and 1024, the full and tiny VAE decode at 1024, a whole 1024 frame
with the tiny VAE at 1, 4 and 8 steps, and the Flux-dev transformer step at 1024.

Variants per row, same weights (synthetic presets, seeded), same inputs (random normal), batch 1:
  eager      diffusers' modules as loaded (what `fast_paths.kernels=false, cuda_graphs=false` serves)
  compiled   the same modules under torch.compile (default mode; its compile time is reported)
  ours       engine/fastpaths.py as a replica applies it: fused kernels, attention registry,
             channels-last, CUDA graph per bucket (the whole frame: the loop-and-decode graph)
  ours fp8   the same plus the FP8 linears (quant/fp8.py)

Reported per row: median ms (CUDA events per call, after warm-up, calls repeated for at least 2 s),
TFLOP/s (FLOPs counted once with torch's FlopCounterMode on the eager call), the floor (FLOPs at
the bf16 or fp8 matmul peak measured in this run) and the fraction of it reached, watts and joules
per call (NVML energy counter over the same >= 2 s), ratios to eager and compiled, and for each
variant the error of its output against a float32 reference next to eager bf16's own error.

    python benchmarks/roofline.py --parts sdxl,vae,frame,flux [--out-dir DIR]
    python benchmarks/roofline.py --parts sdxl,vae,frame --device cpu --tiny --no-compile   # a dry run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import statistics
import sys
import time
import traceback
from typing import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from sharding import _energy, _inputs, stamp  # noqa: E402

MIN_SECONDS = 2.0


@dataclasses.dataclass
class Ctx:
    device: torch.device
    dtype: torch.dtype
    compile: bool
    tiny: bool
    peaks: dict
    rows: list
    notes: list
    on_row: Callable[[], None] | None = None  # called after every row: the results so far are written


# ---- measuring ---------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, warmup: int = 3) -> dict:
    """Median ms per call (CUDA events around each call), watts and joules per call over >= 2 s."""
    for _ in range(warmup):
        fn()
    _sync(device)
    cuda = device.type == "cuda"
    times, t_end, calls = [], time.perf_counter() + MIN_SECONDS, 0
    e0, w0 = _energy(device), time.perf_counter()
    while time.perf_counter() < t_end or calls < 5:
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            times.append((a, b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        calls += 1
        if cuda and calls % 16 == 0:
            _sync(device)  # bounds the queue so the loop's clock tracks the GPU's
    _sync(device)
    wall = time.perf_counter() - w0
    e1 = _energy(device)
    ms = [a.elapsed_time(b) for a, b in times] if cuda else [t * 1e3 for t in times]
    out = {"ms": statistics.median(ms), "ms_p10": sorted(ms)[len(ms) // 10], "ms_p90": sorted(ms)[(9 * len(ms)) // 10],
           "calls": calls, "seconds": wall}
    if e0 is not None and e1 is not None:
        out["watts"] = (e1 - e0) / wall
        out["joules_per_call"] = (e1 - e0) / calls
    return out


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peaks(device) -> dict:
    """The bf16 and fp8 dense-matmul rates this GPU reaches here (8192^3, median): the floors' peaks."""
    if device.type != "cuda":
        return {"bf16_tflops": None, "fp8_tflops": None}
    import triton.testing

    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    peaks = {"bf16_tflops": 2 * n**3 / ms / 1e9}
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=device)
        ms8 = triton.testing.do_bench(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                                      warmup=100, rep=500, return_mode="median")
        peaks["fp8_tflops"] = 2 * n**3 / ms8 / 1e9
    except Exception as e:  # older GPUs have no fp8 matmul
        peaks["fp8_tflops"] = None
        peaks["fp8_error"] = f"{type(e).__name__}: {e}"
    return peaks


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().flatten(), ref.float().flatten()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def add_row(ctx: Ctx, work: str, variant: str, fn, flops: float, ref32: torch.Tensor | None = None, out=None,
            compile_s: float | None = None, fp8: bool = False) -> dict:
    print(f"  {work} / {variant}", file=sys.stderr, flush=True)
    row = {"work": work, "variant": variant, "flops": flops, **measure(fn, ctx.device)}
    peak = ctx.peaks.get("fp8_tflops" if fp8 else "bf16_tflops")
    row["tflops"] = flops / row["ms"] / 1e9
    if peak:
        row["floor_ms"] = flops / peak / 1e9
        row["fraction_of_floor"] = row["floor_ms"] / row["ms"]
    if compile_s is not None:
        row["compile_s"] = compile_s
    if ref32 is not None and out is not None:
        row["rel_error_vs_fp32"] = rel_error(out, ref32)
    ctx.rows.append(row)
    print(f"    {row['ms']:.2f} ms, {row['tflops']:.0f} TFLOP/s"
          + (f", {row['watts']:.0f} W, {row['joules_per_call']:.3f} J" if "joules_per_call" in row else ""),
          file=sys.stderr, flush=True)
    if ctx.on_row is not None:
        ctx.on_row()
    return row


def _graph(graphs, key, fn, *tensors):
    return lambda: graphs.call(key, fn, *tensors)


# ---- SDXL: UNet step, whole frame ---------------------------------------------------------------

def _load(source: str, ctx: Ctx, vae: str = "", dtype=None):
    from rtdiff_cluster.config import ModelConfig
    from rtdiff_cluster.models.registry import load_model

    dt = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype or ctx.dtype]
    return load_model(ModelConfig(source=source, device=ctx.device.type, dtype=dt, vae=vae))


def _fast(model, ctx: Ctx, **overrides):
    from rtdiff_cluster.config import FastPathConfig
    from rtdiff_cluster.engine import fastpaths

    # Timed after warm-ups: every graph captured on the spot, none landing aside mid-measurement.
    fp = fastpaths.apply(model, FastPathConfig(**{"graph_capture_aside": False, **overrides}), world=1)
    ctx.notes.append(f"{model.limits.name}: " + "; ".join(f"{k}: {v}" for k, v in fp.report.items()))
    return fp


def _to_fp8(model, fp, ctx: Ctx):
    """Ours bf16 -> ours fp8 in place: the graphs captured the bf16 weights, so they go first."""
    from rtdiff_cluster.config import FastPathConfig
    from rtdiff_cluster.engine.fastpaths import fp8_linears
    from rtdiff_cluster.engine.graphs import GraphCache

    if fp.graphs is not None:
        fp.graphs.clear()
        fp.graphs = GraphCache(ctx.device, 16, 1 << 40)
    q = fp8_linears(model.backbone, FastPathConfig(), fused_inputs=True)
    ctx.notes.append(f"{model.limits.name} fp8: {q}")
    return fp


def _unet_call(unet):
    def step(sample, timestep, ehs, text_embeds, time_ids):
        return unet(sample, timestep, encoder_hidden_states=ehs,
                    added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    return step


def _unet_tensors(source: str, size: int, ctx: Ctx) -> tuple:
    d = _inputs(source.removeprefix("synthetic:"), 1, size, ctx.device, ctx.dtype)
    return d["sample"], d["timestep"], d["encoder_hidden_states"], d["added_cond_kwargs"]["text_embeds"], d["added_cond_kwargs"]["time_ids"]


def part_sdxl(ctx: Ctx) -> None:
    source = "synthetic:tiny-sdxl" if ctx.tiny else "synthetic:sdxl"
    sizes = (128, 256) if ctx.tiny else (512, 1024)
    ref = _load(source, ctx, dtype=torch.float32)
    refs = {s: _unet_call(ref.backbone)(*(t.float() if t.is_floating_point() else t for t in _unet_tensors(source, s, ctx)))
            for s in sizes}
    del ref
    gc.collect()
    plain = _load(source, ctx)
    fast = _load(source, ctx)
    fp = _fast(fast, ctx)
    eager = _unet_call(plain.backbone)
    # The module itself is compiled so that the whole-frame peer reuses the same compiled code.
    compiled_unet = torch.compile(plain.backbone) if ctx.compile else None
    comp = _unet_call(compiled_unet) if ctx.compile else None
    ours = _unet_call(fast.backbone)
    flops = {}
    for size in sizes:
        x = _unet_tensors(source, size, ctx)
        work = f"SDXL UNet step {size}x{size}"
        flops[size] = count_flops(lambda: eager(*x))
        add_row(ctx, work, "diffusers eager", lambda: eager(*x), flops[size], refs[size], eager(*x))
        ctx.notes.append(f"{work}: {flops[size] / 1e12:.2f} TFLOP")
        if comp is not None:
            t0 = time.perf_counter()
            out = comp(*x)
            _sync(ctx.device)
            add_row(ctx, work, "diffusers + torch.compile", lambda: comp(*x), flops[size], refs[size], out,
                    time.perf_counter() - t0)
        run = _graph(fp.graphs, ("unet", size), ours, *x) if fp.graphs else (lambda: ours(*x))
        add_row(ctx, work, "ours bf16", run, flops[size], refs[size], run().clone())
    if ctx.device.type == "cuda":
        breakdown(ctx, f"ours bf16 SDXL UNet step {sizes[-1]}", lambda: ours(*_unet_tensors(source, sizes[-1], ctx)))
    part_frame(ctx, plain, fast, fp, source, compiled_unet, fp8=False)
    if ctx.device.type != "cuda" or not ctx.peaks.get("fp8_tflops"):
        ctx.notes.append("ours fp8: skipped (no fp8 matmul on this device)")
        return
    _to_fp8(fast, fp, ctx)
    ours = _unet_call(fast.backbone)
    for size in sizes:
        x = _unet_tensors(source, size, ctx)
        run = _graph(fp.graphs, ("unet8", size), ours, *x)
        add_row(ctx, f"SDXL UNet step {size}x{size}", "ours fp8", run, flops[size], refs[size], run().clone(), fp8=True)
    part_frame(ctx, plain, fast, fp, source, compiled_unet, fp8=True)


def breakdown(ctx: Ctx, what: str, fn) -> None:
    """Where the GPU time of one eager call goes, by kernel family (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(ctx.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(ctx.device)
    families = {"attention": ("flash", "fmha", "attention", "sdpa", "cudnn_generated"),
                "conv": ("conv", "implicit", "fprop", "dgrad", "xmma_fprop"),
                "gemm": ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90"),
                "layer norm (torch)": ("layer_norm",),
                "elementwise/other": ("",)}
    totals: dict[str, float] = {}
    events = [(getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) or 0, e.key) for e in prof.key_averages()]
    for t, key in events:
        if t:
            # Our Triton kernels are the only ones named with a leading underscore (PyTorch's start
            # with "void ..."): matching their names by substring also caught PyTorch's LayerNorm.
            fam = "fused (ours)" if key.startswith("_") else next(
                f for f, keys in families.items() if any(k in key.lower() for k in keys))
            totals[fam] = totals.get(fam, 0.0) + t / 1e3
    top = sorted(events)[-10:][::-1]
    ctx.notes.append(f"{what}, GPU ms by kernel family (eager, profiled): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])) +
                     "; top kernels: " + "; ".join(f"{n[:60]} {t / 1e3:.2f}" for t, n in top))


def part_frame(ctx: Ctx, plain, fast, fp, source: str, compiled_unet, fp8: bool) -> None:
    """A whole frame (prompt cached, noise, steps, tiny-VAE decode, image to host) at 1024, no CFG.
    The peers once (fp8=False): eager and compiled; ours in bf16 then, in a second call, fp8."""
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
    from rtdiff_cluster.models.synthetic import PRESETS
    from rtdiff_cluster.parallel import groups

    import diffusers

    size = 256 if ctx.tiny else 1024
    make_tiny = lambda: diffusers.AutoencoderTiny(  # noqa: E731
        latent_channels=PRESETS[source].vae["latent_channels"], scaling_factor=1.0,
        shift_factor=0.0).to(ctx.device, ctx.dtype).eval().requires_grad_(False)
    torch.manual_seed(7)
    tiny = make_tiny()
    fast_tiny = make_tiny()
    fast_tiny.load_state_dict(tiny.state_dict())
    if ctx.device.type == "cuda":  # as engine/fastpaths.py prepares a tiny VAE
        from rtdiff_cluster.ops.fused import install_fused

        install_fused(fast_tiny)
        fast_tiny.to(memory_format=torch.channels_last)
    groups.init_single(ctx.device)
    eager_pipe = Pipeline(dataclasses.replace(plain, vae=tiny), 4)
    pipes = {}
    if not fp8:
        pipes["diffusers eager"] = eager_pipe
        if ctx.compile:
            compiled_tiny = copy.deepcopy(tiny)
            compiled_tiny.decoder = torch.compile(compiled_tiny.decoder)
            pipes["diffusers + torch.compile"] = Pipeline(dataclasses.replace(plain, vae=compiled_tiny,
                                                                             backbone=compiled_unet), 4)
    pipes[f"ours {'fp8' if fp8 else 'bf16'}"] = Pipeline(dataclasses.replace(fast, vae=fast_tiny), 4, fp.graphs, 8)
    try:
        for steps in (1, 4, 8):
            batch = BatchSpec(size, size, steps, 0.0, 0.0, [FrameSpec("a lighthouse at dusk", seed=5)])
            work = f"frame {size}x{size}, {steps} step{'s' * (steps > 1)}, tiny VAE"
            flops = count_flops(lambda: eager_pipe.run(batch, ["a lighthouse at dusk"], [""]))
            ref, _ = eager_pipe.run(batch, ["a lighthouse at dusk"], [""])
            for variant, pipe in pipes.items():
                t0 = time.perf_counter()
                img, _ = pipe.run(batch, ["a lighthouse at dusk"], [""])
                first = time.perf_counter() - t0
                row = add_row(ctx, work, variant, lambda: pipe.run(batch, ["a lighthouse at dusk"], [""]), flops,
                              compile_s=first if "compile" in variant else None, fp8="fp8" in variant)
                row["fps"] = 1e3 / row["ms"]
                row["first_call_s"] = first
                row["mean_abs_levels_vs_eager"] = float(abs(img.astype(float) - ref.astype(float)).mean())
    finally:
        groups.destroy()


# ---- VAE decode ---------------------------------------------------------------------------------

def part_vae(ctx: Ctx) -> None:
    """Decode at 1024 for both VAEs; for the KL VAE also the encode (image-to-image's first
    call), and our fused modules in channels-last beside diffusers' modules as loaded, each
    in a CUDA graph, with the GPU time of both by kernel family."""
    import diffusers

    from rtdiff_cluster.engine.fastpaths import prepare_vae
    from rtdiff_cluster.engine.graphs import GraphCache
    from rtdiff_cluster.ops.attention import AttentionRegistry
    from rtdiff_cluster.models.synthetic import PRESETS
    source = "synthetic:tiny-sdxl" if ctx.tiny else "synthetic:sdxl"
    size = 256 if ctx.tiny else 1024
    cuda = ctx.device.type == "cuda"
    vaes = (("full VAE", lambda: diffusers.AutoencoderKL(**PRESETS[source].vae)),
            ("tiny VAE", lambda: diffusers.AutoencoderTiny(latent_channels=4, scaling_factor=1.0, shift_factor=0.0)))
    for name, make in vaes:
        torch.manual_seed(3)
        ref = make().to(ctx.device).eval().requires_grad_(False)

        def copy_of():
            m = make().to(ctx.device, ctx.dtype).eval().requires_grad_(False)
            m.load_state_dict(ref.state_dict())
            return m

        vae = copy_of()
        z = torch.randn(1, 4, size // 8, size // 8, device=ctx.device).to(ctx.dtype)
        # An image-like input: smooth enough that the encoder's statistics are not pure noise.
        img = torch.nn.functional.interpolate(torch.rand(1, 3, size // 16, size // 16, device=ctx.device),
                                              size=(size, size), mode="bilinear").mul(2).sub(1).to(ctx.dtype)
        calls = {"decode": (lambda m, x: m.decode(x).sample, z)}
        if name == "full VAE":
            calls["encode"] = (lambda m, x: m.encode(x).latent_dist.mean, img)
        # Ours as engine/fastpaths.py serves it (prepare_vae); for the KL VAE also diffusers'
        # modules as loaded in a graph (what the engine served before its VAE was fused).
        treatments = {"ours bf16": True}
        if name == "full VAE":
            treatments = {"ours bf16, as loaded": False, "ours bf16": True}
        ours = {}
        for variant, prepared in treatments.items():
            m = copy_of()
            if prepared and cuda:
                ctx.notes.append(f"{name} {variant}: {prepare_vae(m, AttentionRegistry(), kernels=True)}")
            ours[variant] = m
        for what, (call, x) in calls.items():
            ref_out = call(ref, x.float())
            work = f"{name} {what} {size}x{size}"
            eager = lambda: call(vae, x)  # noqa: E731
            flops = count_flops(eager)
            add_row(ctx, work, "diffusers eager", eager, flops, ref_out, eager())
            if ctx.compile:
                vae_c = copy_of()
                part = "decoder" if what == "decode" else "encoder"
                setattr(vae_c, part, torch.compile(getattr(vae_c, part)))
                t0 = time.perf_counter()
                out = call(vae_c, x)
                _sync(ctx.device)
                add_row(ctx, work, "diffusers + torch.compile", lambda: call(vae_c, x), flops, ref_out, out,
                        time.perf_counter() - t0)
                del vae_c
            if not cuda:
                continue
            for variant, m in ours.items():
                xin = x.contiguous(memory_format=torch.channels_last) if treatments[variant] else x
                graphs = GraphCache(ctx.device, 4, 1 << 40)
                run = _graph(graphs, (name, what), lambda t, m=m: call(m, t), xin)
                add_row(ctx, work, variant, run, flops, ref_out, run().clone())
                if len(ours) > 1:
                    breakdown(ctx, f"{work}, {variant}", lambda m=m, xin=xin: call(m, xin))
                graphs.clear()
        ref = vae = ours = None  # noqa: F841 - freed before the next VAE is built
        gc.collect()


# ---- Flux-dev step ------------------------------------------------------------------------------

def part_flux(ctx: Ctx) -> None:
    from sharding import _build

    name = "tiny-flux" if ctx.tiny else "flux-dev"
    size = 256 if ctx.tiny else 1024
    d = _inputs(name, 1, size, ctx.device, ctx.dtype)
    keys = sorted(d)

    def call(model):
        return lambda *t: model(**dict(zip(keys, t))).sample

    tensors = [d[k] for k in keys]
    ref = _build(name, 1, 0, ctx.device, torch.float32)
    ref_out = call(ref)(*(t.float() if t.is_floating_point() and t.dtype != torch.float32 else t for t in tensors))
    del ref
    gc.collect()
    torch.cuda.empty_cache() if ctx.device.type == "cuda" else None
    model = _build(name, 1, 0, ctx.device, ctx.dtype)
    work = f"Flux-dev transformer step {size}x{size}" if not ctx.tiny else f"tiny-flux step {size}x{size}"
    eager = call(model)
    flops = count_flops(lambda: eager(*tensors))
    ctx.notes.append(f"{work}: {flops / 1e12:.2f} TFLOP")
    add_row(ctx, work, "diffusers eager", lambda: eager(*tensors), flops, ref_out, eager(*tensors))
    if ctx.compile:
        comp = torch.compile(call(model))
        t0 = time.perf_counter()
        out = comp(*tensors)
        _sync(ctx.device)
        add_row(ctx, work, "diffusers + torch.compile", lambda: comp(*tensors), flops, ref_out, out, time.perf_counter() - t0)
        torch._dynamo.reset()
    if ctx.device.type != "cuda":
        return
    # Ours in place on the same weights (two copies of a 12B model would not leave room for the graphs).
    from rtdiff_cluster.engine.graphs import GraphCache
    from rtdiff_cluster.ops import fused, processors
    from rtdiff_cluster.ops.attention import AttentionRegistry

    registry = AttentionRegistry()
    processors.install(model, registry, fused=True)
    done = fused.install_fused(model)
    ctx.notes.append(f"{work} ours: fused {done}")
    graphs = GraphCache(ctx.device, 4, 1 << 40)
    run = _graph(graphs, "flux", call(model), *tensors)
    add_row(ctx, work, "ours bf16", run, flops, ref_out, run().clone())
    ctx.notes.append(f"{work} attention: {registry.choices()}")
    breakdown(ctx, f"ours bf16 {work}", lambda: call(model)(*tensors))
    if ctx.peaks.get("fp8_tflops"):
        graphs.clear()
        from rtdiff_cluster.config import FastPathConfig
        from rtdiff_cluster.engine.fastpaths import fp8_linears

        q = fp8_linears(model, FastPathConfig(), fused_inputs=True)
        ctx.notes.append(f"{work} fp8: {q}")
        graphs = GraphCache(ctx.device, 4, 1 << 40)
        run = _graph(graphs, "flux8", call(model), *tensors)
        add_row(ctx, work, "ours fp8", run, flops, ref_out, run().clone(), fp8=True)


# ---- report -------------------------------------------------------------------------------------

def finish(rows: list) -> None:
    for work in dict.fromkeys(r["work"] for r in rows):
        group = [r for r in rows if r["work"] == work]
        base = {r["variant"]: r["ms"] for r in group}
        for r in group:
            if "diffusers eager" in base:
                r["speedup_vs_eager"] = base["diffusers eager"] / r["ms"]
            if "diffusers + torch.compile" in base:
                r["speedup_vs_compiled"] = base["diffusers + torch.compile"] / r["ms"]


def markdown(result: dict) -> str:
    d = result["device"]
    lines = [f"# roofline: {d.get('gpu_name') or d['cpu']} ({result['date']})", "",
             f"torch {d['torch']}, diffusers {d['diffusers']}; measured matmul peaks: bf16 "
             f"{result['peaks'].get('bf16_tflops') or 0:.0f} TFLOP/s, fp8 {result['peaks'].get('fp8_tflops') or 0:.0f} TFLOP/s", "",
             "| work | variant | ms (p50) | TFLOP/s | floor ms | of floor | x eager | x compiled | W | J/call | err vs fp32 | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    for r in result["rows"]:
        lines.append(f"| {r['work']} | {r['variant']} | {r['ms']:.2f} | {r['tflops']:.0f} | {f(r.get('floor_ms'), '.2f')} | "
                     f"{f(r.get('fraction_of_floor'), '.0%')} | {f(r.get('speedup_vs_eager'), '.2f')} | "
                     f"{f(r.get('speedup_vs_compiled'), '.2f')} | {f(r.get('watts'), '.0f')} | "
                     f"{f(r.get('joules_per_call'), '.3f')} | {f(r.get('rel_error_vs_fp32'), '.2e')} | {f(r.get('compile_s'), '.0f')} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="sdxl,vae,flux", help="sdxl (UNet step and whole frame), vae, flux")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny presets at small sizes (a dry run of the script)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the result files (one per part when split over calls)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ctx = Ctx(device, dtype, not args.no_compile, args.tiny, matmul_peaks(device), [], [])
    print(f"peaks: {ctx.peaks}", file=sys.stderr, flush=True)
    st = stamp(args.device)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpu = (st["gpu_name"] or "cpu").lower().replace(" ", "-")
    stem = out / f"roofline-{st['date_utc'][:10]}-{args.device}-{gpu}{'-' + args.tag if args.tag else ''}"

    def write(partial: bool) -> dict:
        # After every row as well as at the end: a run cut short by its time limit keeps what it measured.
        finish(ctx.rows)
        notes = ctx.notes + (["partial: the run stopped before its last row (these are the rows measured)"]
                             if partial else [])
        result = {"benchmark": "roofline", "device": st, "date": st["date_utc"][:10], "peaks": ctx.peaks,
                  "rows": ctx.rows, "notes": notes}
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        stem.with_suffix(".md").write_text(markdown(result))
        return result

    ctx.on_row = lambda: write(partial=True)
    parts = {"sdxl": part_sdxl, "vae": part_vae, "flux": part_flux}
    with torch.inference_mode():
        for name in [p.strip() for p in args.parts.split(",") if p.strip()]:
            t0 = time.perf_counter()
            try:
                parts[name](ctx)
            except Exception as e:
                traceback.print_exc()
                ctx.notes.append(f"part {name} failed: {type(e).__name__}: {e}")
            ctx.notes.append(f"part {name}: {time.perf_counter() - t0:.0f} s")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(markdown(write(partial=False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
