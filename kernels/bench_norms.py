"""Micro-benchmark: group_norm_silu, layer_norm_modulate, gated_residual (alone and with the
LayerNorm-modulate) and add_layer_norm against eager PyTorch and torch.compile of the same
reference, at SDXL / Flux 1024x1024 shapes (bf16).

    python kernels/bench_norms.py --out norms.json [--no-compile]

GPU only. Times are per call inside a CUDA graph of 20 back-to-back calls (kernels/_bench.py
bench_us: median of do_bench over the replays), as our captured steps run them. The memory
floor uses the copy bandwidth measured in the same run (a 1 GiB tensor `.copy_`, 2 bytes moved
per byte copied):
  group_norm_silu       floor bytes = 3 * numel * itemsize (read x twice - statistics, then
                        normalise - and write y once; see the kernel's docstring); the same
                        with a per-channel offset added first (a resnet's time embedding)
  layer_norm_modulate   floor bytes = 2 * numel * itemsize + shift and scale (read x, write y)
  gated_residual        floor bytes = 3 * numel * itemsize (read x and y, write the sum); with
                        the LayerNorm-modulate 4 * numel * itemsize (and write its norm too)
  add_layer_norm        floor bytes = 4 * numel * itemsize (read x and the residual, write the
                        sum and its norm); also at a 384x384 chunk-cache region's shape, where
                        launch latency, not bytes, sets the time
`ours_over_eager` / `ours_over_compiled` are time ratios: below 1 means the kernel is faster.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import triton
from rtdiff_kernels._bench import bench_args, compile_per_shape, copy_bandwidth, max_err, time_peers

try:
    from rtdiff_kernels.ada_layer_norm import (gated_residual, gated_residual_layer_norm_modulate,
                                               gated_residual_layer_norm_modulate_reference, gated_residual_reference,
                                               layer_norm_modulate, layer_norm_modulate_reference)
    from rtdiff_kernels.add_layer_norm import add_layer_norm, add_layer_norm_reference
    from rtdiff_kernels.group_norm_silu import group_norm_silu, group_norm_silu_reference
except ImportError:  # run as a script from a checkout without the editable install: kernels/ is on sys.path
    from ada_layer_norm import (gated_residual, gated_residual_layer_norm_modulate,
                                gated_residual_layer_norm_modulate_reference, gated_residual_reference,
                                layer_norm_modulate, layer_norm_modulate_reference)
    from add_layer_norm import add_layer_norm, add_layer_norm_reference
    from group_norm_silu import group_norm_silu, group_norm_silu_reference

GN_SHAPES = [(2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32), (2, 640, 128, 128), (2, 2560, 32, 32)]
GN_OFFSET_SHAPES = [(1, 320, 128, 128), (1, 1280, 32, 32)]
GN_GROUPS, GN_EPS = 32, 1e-5
LN_SHAPES = [(1, 4096, 3072), (1, 512, 3072)]
LN_EPS = 1e-6
GATED_SHAPES = [(1, 4096, 3072), (1, 4608, 3072), (1, 512, 3072)]  # Flux 1024: image, joint, text tokens
ADD_LN_SHAPES = [(1, 4096, 640), (1, 1024, 1280), (1, 144, 1280)]  # SDXL at 1024 (two levels); a 384 region
DTYPE = torch.bfloat16


def row(kind, shape, layout, floor_bytes, peak, ours_us, eager_us, compiled_us, err) -> dict:
    floor_us = floor_bytes / peak * 1e6
    return {
        "kernel": kind, "shape": list(shape), "layout": layout, "dtype": str(DTYPE).replace("torch.", ""),
        "floor_bytes": floor_bytes, "floor_us": floor_us,
        "ours_us": ours_us, "eager_us": eager_us, "compiled_us": compiled_us,
        "ours_GBps": floor_bytes / (ours_us * 1e-6) / 1e9,
        "ours_frac_of_floor": floor_us / ours_us,
        "eager_frac_of_floor": floor_us / eager_us,
        "compiled_frac_of_floor": floor_us / compiled_us if compiled_us else None,
        "ours_over_eager": ours_us / eager_us,
        "ours_over_compiled": ours_us / compiled_us if compiled_us else None,
        "max_abs_err_vs_fp32": err,
    }


def main() -> int:
    args = bench_args(__doc__, "bench_norms")

    t_start = time.monotonic()
    torch.manual_seed(0)
    peak = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}  copy bandwidth {peak / 1e9:.0f} GB/s", flush=True)

    compiled_gn = compiled_ln = compiled_add_ln = compiled_gated = compiled_gated_ln = None
    if not args.no_compile:
        compiled_gn = compile_per_shape(group_norm_silu_reference)
        compiled_ln = compile_per_shape(layer_norm_modulate_reference)
        compiled_add_ln = compile_per_shape(add_layer_norm_reference)
        compiled_gated = compile_per_shape(gated_residual_reference)
        compiled_gated_ln = compile_per_shape(gated_residual_layer_norm_modulate_reference)

    rows = []
    for shape in GN_SHAPES:
        for layout in ("nchw", "channels_last"):
            t0 = time.monotonic()
            x = torch.randn(shape, device="cuda", dtype=DTYPE)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            w = torch.randn(shape[1], device="cuda", dtype=DTYPE)
            b = torch.randn(shape[1], device="cuda", dtype=DTYPE)
            call = (x, GN_GROUPS, w, b, GN_EPS)
            err = max_err(group_norm_silu(*call), group_norm_silu_reference(x.float(), GN_GROUPS, w.float(), b.float(), GN_EPS))
            ours, eager, comp = time_peers(lambda: group_norm_silu(*call), lambda: group_norm_silu_reference(*call),
                                           compiled_gn and (lambda: compiled_gn(*call)))
            rows.append(row("group_norm_silu", shape, layout, 3 * x.numel() * x.element_size(), peak,
                            ours, eager, comp, err))
            print(f"  gn {shape} {layout}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
            del x

    # A resnet's norm2 with its time-embedding add folded in (batch 1, channels-last, as served);
    # the peers run the reference, which adds first.
    for shape in GN_OFFSET_SHAPES:
        x = torch.randn(shape, device="cuda", dtype=DTYPE).to(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1], device="cuda", dtype=DTYPE), torch.randn(shape[1], device="cuda", dtype=DTYPE)
        t = torch.randn(shape[0], shape[1], device="cuda", dtype=DTYPE)
        call = (x, GN_GROUPS, w, b, GN_EPS, True, t)
        err = max_err(group_norm_silu(*call),
                      group_norm_silu_reference(x.float(), GN_GROUPS, w.float(), b.float(), GN_EPS, True, t.float()))
        ours, eager, comp = time_peers(lambda: group_norm_silu(*call), lambda: group_norm_silu_reference(*call),
                                       compiled_gn and (lambda: compiled_gn(*call)))
        rows.append(row("group_norm_silu+offset", shape, "channels_last", 3 * x.numel() * x.element_size(), peak,
                        ours, eager, comp, err))
        del x

    for shape in LN_SHAPES:
        t0 = time.monotonic()
        bsz, _, d = shape
        x = torch.randn(shape, device="cuda", dtype=DTYPE)
        emb = torch.randn(bsz, 6 * d, device="cuda", dtype=DTYPE)  # AdaLayerNormZero's projection
        shift, scale = emb.chunk(6, dim=1)[:2]
        call = (x, shift, scale, LN_EPS)
        err = max_err(layer_norm_modulate(*call), layer_norm_modulate_reference(x.float(), shift.float(), scale.float(), LN_EPS))
        ours, eager, comp = time_peers(lambda: layer_norm_modulate(*call), lambda: layer_norm_modulate_reference(*call),
                                       compiled_ln and (lambda: compiled_ln(*call)))
        floor_bytes = 2 * x.numel() * x.element_size() + 2 * bsz * d * x.element_size()
        rows.append(row("layer_norm_modulate", shape, "contiguous", floor_bytes, peak, ours, eager, comp, err))
        print(f"  ln {shape}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)

    for shape in GATED_SHAPES:
        t0 = time.monotonic()
        bsz, _, d = shape
        x, y = torch.randn(shape, device="cuda", dtype=DTYPE) * 4, torch.randn(shape, device="cuda", dtype=DTYPE)
        emb = torch.randn(bsz, 6 * d, device="cuda", dtype=DTYPE)  # AdaLayerNormZero's projection
        gate, shift, scale = emb.chunk(6, dim=1)[2:5]
        up = [t.float() for t in (x, y, gate, shift, scale)]
        err = max_err(gated_residual(x, y, gate), gated_residual_reference(*up[:3]))
        ours, eager, comp = time_peers(lambda: gated_residual(x, y, gate), lambda: gated_residual_reference(x, y, gate),
                                       compiled_gated and (lambda: compiled_gated(x, y, gate)))
        rows.append(row("gated_residual", shape, "contiguous", 3 * x.numel() * x.element_size(), peak,
                        ours, eager, comp, err))
        call = (x, y, gate, shift, scale, LN_EPS)
        err = max_err(gated_residual_layer_norm_modulate(*call)[1],
                      gated_residual_layer_norm_modulate_reference(*up, LN_EPS)[1])
        ours, eager, comp = time_peers(lambda: gated_residual_layer_norm_modulate(*call),
                                       lambda: gated_residual_layer_norm_modulate_reference(*call),
                                       compiled_gated_ln and (lambda: compiled_gated_ln(*call)))
        rows.append(row("gated_residual+ln_modulate", shape, "contiguous", 4 * x.numel() * x.element_size(), peak,
                        ours, eager, comp, err))
        print(f"  gated {shape}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)

    for shape in ADD_LN_SHAPES:
        t0 = time.monotonic()
        x, r = torch.randn(shape, device="cuda", dtype=DTYPE), torch.randn(shape, device="cuda", dtype=DTYPE)
        w, b = torch.randn(shape[-1], device="cuda", dtype=DTYPE), torch.randn(shape[-1], device="cuda", dtype=DTYPE)
        call = (x, r, w, b, 1e-5)
        err = max_err(add_layer_norm(*call)[1], add_layer_norm_reference(x.float(), r.float(), w.float(), b.float(), 1e-5)[1])
        ours, eager, comp = time_peers(lambda: add_layer_norm(*call), lambda: add_layer_norm_reference(*call),
                                       compiled_add_ln and (lambda: compiled_add_ln(*call)))
        rows.append(row("add_layer_norm", shape, "contiguous", 4 * x.numel() * x.element_size(), peak, ours, eager, comp, err))
        print(f"  add+ln {shape}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print("\n| kernel | shape | layout | ours us | eager us | compiled us | ours/eager | ours/compiled "
          "| ours GB/s | ours % of floor | eager % | compiled % | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['ours_us']:.1f} "
              f"| {r['eager_us']:.1f} | {fmt(r['compiled_us'], '.1f')} | {r['ours_over_eager']:.2f} "
              f"| {fmt(r['ours_over_compiled'], '.2f')} | {r['ours_GBps']:.0f} | {100 * r['ours_frac_of_floor']:.0f} "
              f"| {100 * r['eager_frac_of_floor']:.0f} | {fmt(r['compiled_frac_of_floor'] and 100 * r['compiled_frac_of_floor'], '.0f')} "
              f"| {r['max_abs_err_vs_fp32']:.2g} |")

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_GBps": peak / 1e9,
        "timing": "per call in a CUDA graph of 20 calls, do_bench median of replays (warmup 25 ms, rep 100 ms)",
        "compiled": compiled_gn is not None,
        "wall_s": time.monotonic() - t_start,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
