#!/usr/bin/env python
"""Launch geometry of our memory-bound kernels against the calls an SDXL UNet step really makes.

group_norm_silu, geglu and add_layer_norm each read their launch geometry from module-level knobs
(elements per program, warps, ...). Their micro-benchmarks (kernels/bench_*.py) time a few shapes
one at a time; a step calls them 46, 70 and 199 times on a handful of shapes, most of them small
(32x32 and 64x64 latents, 1024-4096 tokens), where a program's fixed cost and the grid's tail set
the time, not the bytes. For each kernel this script

  1. records every call of one eager step of the fast-path UNet at each size (the arguments:
     tensors by shape, strides and dtype, the rest by value),
  2. for each knob set, times all of the step's calls back to back inside one CUDA graph, as a
     captured step runs them (kernels/_bench.py bench_us), and checks every call against the
     kernel's fp32 reference,
  3. writes a table: GPU microseconds of that kernel per step at each size, per knob set.

    python benchmarks/tune_pointwise.py --kernels geglu,add_layer_norm --sizes 1024,512 --out-dir DIR
    python benchmarks/tune_pointwise.py --kernels group_norm_silu_large --model vae --sizes 1024

--model vae records the calls of one decode of SDXL's KL VAE (fused, channels-last, as the
engine serves it) instead of a UNet step: the large problems' knobs of group_norm_silu are tuned
on those.

GPU only. A knob set's first pass compiles its kernel variants; --budget-s stops a kernel's sweep
(its later knob sets are reported as not run). A knob set passes if its worst error is at most
twice the shipped knobs' (bf16 output rounding differs between geometries only by summation order).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from engine_bench import load_engine, write_results  # noqa: E402
from sharding import _inputs  # noqa: E402


@dataclass(frozen=True)
class Target:
    module: str  # the kernel's module, whose knobs are set and whose function is recorded
    function: str
    reference: str  # the fp32 reference in the same module
    knobs: tuple[str, ...]
    grid: tuple[tuple, ...]  # knob values to sweep, in knobs' order
    hypothesis: str
    clear: str = ""  # a cached function of the module to clear when knobs change

    def knob_sets(self, default: tuple) -> list[tuple]:
        return [default] + [k for k in itertools.product(*self.grid) if k != default]


TARGETS = {
    "group_norm_silu": Target(
        "rtdiff_kernels.group_norm_silu", "group_norm_silu", "group_norm_silu_reference",
        ("_TILE_ELEMS", "_NUM_WARPS", "_PROGRAMS_PER_SM", "_MAX_BLOCK_C_CL"),
        ((4096, 8192, 16384), (4, 8), (1, 2, 4), (256, 512)),
        "fewer, fatter programs: a 32x32 latent's GroupNorm was cut into ~350 one-tile programs at 4 per SM",
        clear="_plan"),
    "group_norm_silu_large": Target(
        "rtdiff_kernels.group_norm_silu", "group_norm_silu", "group_norm_silu_reference",
        ("_LARGE_TILE_ELEMS", "_LARGE_NUM_WARPS", "_LARGE_PROGRAMS_PER_SM"),
        ((4096, 8192, 16384), (4, 8), (2, 4, 8, 16)),
        "more programs and warps in flight: a KL VAE decoder's 128-512 channels at 256^2-1024^2 ran "
        "at 0.7-0.9 TB/s with 64-264 programs of 4 warps",
        clear="_plan"),
    "geglu": Target(
        "rtdiff_kernels.activations", "geglu", "geglu_reference",
        ("_MAX_BLOCK_N", "_TILE_ELEMS", "_NUM_WARPS"),
        ((512, 1024, 2048), (1024, 2048, 4096, 8192), (2, 4, 8)),
        "several rows per program: one 1024-lane row block per program makes 5,120 programs for a "
        "1024-token call, each too short to hide its loads"),
    "add_layer_norm": Target(
        "rtdiff_kernels.add_layer_norm", "add_layer_norm", "add_layer_norm_reference",
        ("_TILE_ELEMS", "_MIN_PROGRAMS_PER_SM", "_ELEMS_PER_WARP"),
        ((2048, 4096, 8192), (1, 2, 4), (256, 512, 1024)),
        "the rows per program and the warps per row, at 1024-4096 rows of 640-1280"),
}


def describe(v):
    """A recorded argument: tensors by layout (materialised later as random data), the rest as is."""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), tuple(v.stride()), v.dtype)
    return ("value", v)


def unet_step(model, size: int, device) -> None:
    x = _inputs("sdxl", 1, size, device, model.dtype)
    model.backbone(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                   added_cond_kwargs=x["added_cond_kwargs"])


def vae_decode(vae, size: int, device) -> None:
    z = torch.randn(1, vae.config.latent_channels, size // 8, size // 8, device=device, dtype=vae.dtype)
    vae.decode(z.contiguous(memory_format=torch.channels_last))


def kl_vae(device):
    """SDXL's KL VAE in bf16 as engine/fastpaths.py serves it (prepare_vae)."""
    import diffusers

    from rtdiff_cluster.engine.fastpaths import prepare_vae
    from rtdiff_cluster.models.synthetic import PRESETS
    from rtdiff_cluster.ops.attention import AttentionRegistry

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**PRESETS["synthetic:sdxl"].vae).to(device, torch.bfloat16).eval()
    prepare_vae(vae, AttentionRegistry(), kernels=True)
    return vae.requires_grad_(False)


def record_calls(run: Callable, target: Target, size: int, device) -> list[tuple[list, dict]]:
    """Every call of target's function in one eager run(size, device) (a UNet step or a VAE
    decode). The fast paths import the kernels inside the patched forwards, so replacing the
    module attribute catches them."""
    mod = importlib.import_module(target.module)
    calls, original = [], getattr(mod, target.function)

    def recording(*args, **kwargs):
        calls.append(([describe(a) for a in args], {k: describe(v) for k, v in kwargs.items()}))
        return original(*args, **kwargs)

    setattr(mod, target.function, recording)
    try:
        with torch.no_grad():
            run(size, device)
        torch.cuda.synchronize(device)
    finally:
        setattr(mod, target.function, original)
    return calls


def materialise(calls, device) -> list[tuple[list, dict]]:
    """Random data in each recorded layout (values around 0.5 with spread 2, as activations)."""
    g = torch.Generator(device).manual_seed(0)

    def make(d):
        if d[0] == "value":
            return d[1]
        _, shape, stride, dtype = d
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride) if n > 0)
        data = torch.randn(extent, device=device, dtype=torch.float32, generator=g) * 2 + 0.5
        return data.to(dtype).as_strided(shape, stride)

    return [([make(a) for a in args], {k: make(v) for k, v in kwargs.items()}) for args, kwargs in calls]


def as_fp32(v):
    return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def outputs(r) -> tuple[torch.Tensor, ...]:
    return (r,) if isinstance(r, torch.Tensor) else tuple(r)


def worst_error(fn: Callable, ref: Callable, calls) -> float:
    err = 0.0
    for args, kwargs in calls:
        got = outputs(fn(*args, **kwargs))
        want = outputs(ref(*map(as_fp32, args), **{k: as_fp32(v) for k, v in kwargs.items()}))
        err = max(err, max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want)))
    return err


def sweep(target: Target, run: Callable, sizes: list[int], device, budget_s: float) -> dict:
    from rtdiff_kernels._bench import bench_us

    mod = importlib.import_module(target.module)
    fn, ref = getattr(mod, target.function), getattr(mod, target.reference)
    recorded = {s: record_calls(run, target, s, device) for s in sizes}
    inputs = {s: materialise(recorded[s], device) for s in sizes}
    default = tuple(getattr(mod, k) for k in target.knobs)
    t_start, rows, base_err = time.monotonic(), [], {}
    try:
        for knobs in target.knob_sets(default):
            row = {"knobs": dict(zip(target.knobs, knobs)), "default": knobs == default}
            if time.monotonic() - t_start > budget_s:
                rows.append({**row, "skipped": "over the budget"})
                continue
            for k, v in zip(target.knobs, knobs):
                setattr(mod, k, v)
            if target.clear:
                getattr(mod, target.clear).cache_clear()
            t0 = time.monotonic()
            try:
                for s in sizes:
                    err = worst_error(fn, ref, inputs[s])
                    base_err.setdefault(s, err)
                    row[f"err_{s}"] = err
                    row[f"ok_{s}"] = err <= 2 * base_err[s] + 1e-6
                    calls = inputs[s]
                    row[f"us_{s}"] = bench_us(lambda: [fn(*a, **kw) for a, kw in calls])
            except Exception as e:  # noqa: BLE001 - a knob set the kernel cannot compile is a result, not a crash
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row["seconds"] = time.monotonic() - t0
            rows.append(row)
            print(target.function, " ".join(f"{k}={v}" for k, v in row["knobs"].items()),
                  " ".join(f"{s}: {row.get(f'us_{s}', float('nan')):.1f} us" for s in sizes),
                  f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        for k, v in zip(target.knobs, default):
            setattr(mod, k, v)
        if target.clear:
            getattr(mod, target.clear).cache_clear()
    shapes = {str(s): sorted({tuple(str(a[1:3]) for a in args if a[0] == "tensor") for args, _ in recorded[s]})
              for s in sizes}
    return {"knobs": list(target.knobs), "hypothesis": target.hypothesis,
            "calls_per_step": {str(s): len(recorded[s]) for s in sizes}, "shapes": shapes, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="geglu,add_layer_norm", help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--sizes", default="1024,512")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop a kernel's sweep after this long")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--model", choices=["unet", "vae"], default="unet",
                    help="whose calls: an SDXL UNet step's, or an SDXL KL VAE decode's")
    args = ap.parse_args()
    names = [k for k in args.kernels.split(",") if k]
    bad = [k for k in names if k not in TARGETS]
    if bad or not names:
        ap.error(f"--kernels: unknown {bad or 'none given'}; choose from {', '.join(TARGETS)}")
    if not torch.cuda.is_available():
        print("tune_pointwise: needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda")
    if args.model == "vae":
        vae = kl_vae(device)
        run = lambda size, dev: vae_decode(vae, size, dev)  # noqa: E731
    else:
        args.device, args.source, args.vae = "cuda", "synthetic:sdxl", ""
        model, _ = load_engine(args)  # the fast paths patch the backbone in place
        run = lambda size, dev: unet_step(model, size, dev)  # noqa: E731
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {k: sweep(TARGETS[k], run, sizes, device, args.budget_s) for k in names}
    write_results("tune_pointwise", "cuda", {"sizes": sizes, "model": args.model, "kernels": results}, args.out_dir,
                  markdown, tag=args.tag)


def markdown(r: dict) -> str:
    sizes = r["sizes"]
    whose = "an SDXL KL VAE decode's" if r.get("model") == "vae" else "an SDXL step's"
    lines = [f"# Launch geometry on {whose} own calls: {r.get('gpu_name')} ({r['date']})", "",
             f"torch {r.get('torch')}. Per knob set: GPU time of all of the calls of the kernel back to back in "
             "a CUDA graph (median), and the worst error against the fp32 reference.", ""]
    for name, k in r["kernels"].items():
        lines += [f"## {name}", "", "Calls recorded per size: " + ", ".join(f"{s}: {k['calls_per_step'][str(s)]}" for s in sizes)
                  + f". Hypothesis: {k['hypothesis']}.", "",
                  "| " + " | ".join(k["knobs"]) + " | " + " | ".join(f"{s} us" for s in sizes) + " | "
                  + " | ".join(f"{s} max err" for s in sizes) + " | note |",
                  "|" + "--:|" * (len(k["knobs"]) + 2 * len(sizes)) + "---|"]
        done = [x for x in k["rows"] if all(f"us_{s}" in x and x[f"ok_{s}"] for s in sizes)]
        best = min(done, key=lambda x: sum(x[f"us_{s}"] for s in sizes)) if done else None
        for x in k["rows"]:
            cells = [str(x["knobs"][n]) for n in k["knobs"]]
            cells += [f"{x[f'us_{s}']:.1f}" if f"us_{s}" in x else "-" for s in sizes]
            cells += [f"{x[f'err_{s}']:.3g}" + ("" if x.get(f"ok_{s}", True) else " (over)") if f"err_{s}" in x
                      else "-" for s in sizes]
            note = "shipped" if x.get("default") else ""
            if x is best:
                note = (note + ", " if note else "") + "fastest"
            note = x.get("error") or x.get("skipped") or note
            lines.append("| " + " | ".join(cells + [note]) + " |")
        lines += ["", "Tensor arguments per size (shape, strides):", ""]
        lines += [f"- {s}: " + "; ".join(" ".join(t) for t in k["shapes"][str(s)]) for s in sizes]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
