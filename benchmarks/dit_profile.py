#!/usr/bin/env python
"""Where one Flux transformer step's GPU time goes on our fast paths, kernel by kernel: the count
before a DiT fusion is chosen (METHOD.md), as unet_profile.py is for SDXL's UNet.

Per size (batch 1, random weights, synthetic preset, the transformer alone as the replica's
single-rank fast paths patch it: the attention registry, QK-norm + rotary, adaLN and GELU kernels,
fused block forwards): the step's wall time in one CUDA graph (median of CUDA-event timings after
warm-up), the kernels one eager step launches, the sum of their GPU times (torch.profiler), and the
kernels grouped by name, largest first.

    python benchmarks/dit_profile.py --sizes 1024 [--out-dir DIR]
    python benchmarks/dit_profile.py --device cpu --source synthetic:tiny-flux --sizes 128   # a dry run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from engine_bench import write_results  # noqa: E402
from sharding import _build, _inputs  # noqa: E402
from unet_profile import (_knobs_note, common_arguments, drop_backends, kernel_table, replay_ms,  # noqa: E402
                          set_knobs, step_sections)


def markdown(res: dict, top: int = 30) -> str:
    lines = [f"# {res['source']} transformer step, kernel by kernel: {res['gpu_name'] or res['cpu']} ({res['date']})", "",
             f"torch {res['torch']}, diffusers {res['diffusers']}; batch 1, quantization {res.get('quantization', 'none')}, "
             f"fast paths on "
             f"({res['fused']}); attention modules with fused q/k/v: {res.get('fused_qkv_modules', 0)}; "
             f"block forwards: {res['blocks']}; attention: {res['attention']}"
             + _knobs_note(res), ""]
    return "\n".join(lines + step_sections(res["sizes"], top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(ap, "synthetic:flux-dev", "1024")
    ap.add_argument("--unfused-blocks", action="store_true",
                    help="diffusers' own Flux block forwards (their gates, residual adds, norms and concatenations as "
                         "PyTorch ops), as before ops/flux_blocks.py (an A/B)")
    ap.add_argument("--unfused-qkv", action="store_true",
                    help="attention's q, k and v as three linears per stream, as before processors.fuse_projections "
                         "covered Flux (an A/B)")
    ap.add_argument("--fp8", action="store_true", help="FP8 linears (fast_paths.quantization=fp8, its default widths)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    knobs = set_knobs(ap, args.knob)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = args.source.removeprefix("synthetic:")

    from rtdiff_cluster.ops import fused, processors
    from rtdiff_cluster.ops.attention import AttentionRegistry

    if args.unfused_blocks:
        from rtdiff_cluster.ops import flux_blocks

        flux_blocks.install = lambda backbone: {}
    model = _build(name, 1, 0, device, dtype)
    quant = "none"
    # In the engine's order (engine/fastpaths.py apply): the fused projections, FP8, the fast paths.
    fused_qkv = 0 if args.unfused_qkv else processors.fuse_projections(model)
    if args.fp8:
        from rtdiff_cluster.config import FastPathConfig
        from rtdiff_cluster.engine.fastpaths import fp8_linears

        q = fp8_linears(model, FastPathConfig(), fused_inputs=device.type == "cuda")
        quant = f"fp8 ({q['replaced']} linears)"
    registry = AttentionRegistry()
    dropped = drop_backends(registry, args.no_backend)
    kernels = device.type == "cuda"
    processors.install(model, registry, fused=kernels)
    done = fused.install_fused(model) if kernels else {}
    graphs = None
    if device.type == "cuda":
        from rtdiff_cluster.engine.graphs import GraphCache

        graphs = GraphCache(device, 4, 1 << 40)
    sizes = []
    for size in (int(s) for s in args.sizes.split(",")):
        x = _inputs(name, 1, size, device, dtype)
        keys = sorted(x)
        tensors = [x[k] for k in keys]
        call = lambda *t: model(**dict(zip(keys, t))).sample  # noqa: E731
        with torch.inference_mode():
            ms = None if graphs is None else replay_ms(lambda: graphs.call(("profile", size), call, *tensors), 20)
            n, kms, table = kernel_table(lambda: call(*tensors), device)
        sizes.append({"size": size, "graph_ms": ms, "kernels": n, "kernel_ms": kms, "table": table})
        print(f"{size}: graph {ms} ms, {n} kernels, {kms:.2f} ms", file=sys.stderr, flush=True)
        if graphs is not None:
            graphs.clear()
    tag = "-".join(t for t, on in ((name, True), ("fp8", args.fp8), ("unfused-blocks", args.unfused_blocks),
                                   ("unfused-qkv", args.unfused_qkv),
                                   ("no-" + "-".join(sorted(n.replace(" ", "-") for n in args.no_backend)), args.no_backend),
                                   ("knobs", knobs), (args.tag, args.tag)) if on)
    write_results("dit_profile", args.device, {
        "source": args.source, "sizes": sizes, "knobs": knobs, "quantization": quant, "fused_qkv_modules": fused_qkv,
        "fused": ", ".join(f"{k} x{v}" for k, v in done.items()) or "none (CPU)",
        "blocks": "diffusers' own" if args.unfused_blocks else "ours where fusable",
        "attention": f"{registry.choices()}" + (f", without {', '.join(sorted(dropped))}" if dropped else "")},
        args.out_dir, markdown, tag=tag)


if __name__ == "__main__":
    main()
