"""Micro-benchmark: rms_norm_rope, geglu, linear_gelu_tanh and upsample_nearest against eager PyTorch and
torch.compile of the same reference, at Flux / SDXL 1024x1024 shapes (bf16).

    python kernels/bench_pointwise.py --out pointwise.json [--no-compile]

GPU only. Times are per call inside a CUDA graph of 20 back-to-back calls (kernels/_bench.py
bench_us), inputs random.
Floors, measured on the same device in the same run:
  memory-bound kernels: floor bytes / copy bandwidth (a 1 GiB `.copy_`, 2 bytes moved per byte)
    rms_norm_rope     read x + write out + cos/sin rows once + weight
    geglu             read h [.., 2N] + write out [.., N]
    upsample_nearest  read x once + write the S*S times larger output (tiny VAE decoder at 1024,
                      SDXL UNet's last upsampling; channels-last, as served)
  linear_gelu_tanh: 2*M*N*K FLOPs / the bf16 matmul rate of torch.mm at 8192^3 (reported in TFLOP/s)
`ours_over_eager` / `ours_over_compiled` are time ratios: below 1 means ours is faster.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import triton
from rtdiff_kernels._bench import bench_args, compile_per_shape, copy_bandwidth, matmul_rate, max_err, time_peers

try:
    from rtdiff_kernels.activations import geglu, geglu_reference, linear_gelu_tanh, linear_gelu_tanh_reference
    from rtdiff_kernels.rms_norm_rope import rms_norm_rope, rms_norm_rope_reference
    from rtdiff_kernels.upsample_nearest import upsample_nearest, upsample_nearest_reference
except ImportError:  # run as a script from a checkout without the editable install: kernels/ is on sys.path
    from activations import geglu, geglu_reference, linear_gelu_tanh, linear_gelu_tanh_reference
    from rms_norm_rope import rms_norm_rope, rms_norm_rope_reference
    from upsample_nearest import upsample_nearest, upsample_nearest_reference

DTYPE = torch.bfloat16
FLUX_QK = (1, 4608, 24, 128)  # 4096 image + 512 text tokens, 24 heads of 128
GEGLU_SHAPES = [(2, 4096, 10240), (2, 1024, 20480)]  # SDXL FF at 64x64 and 32x32 latents
FLUX_FF = (4096, 3072, 12288)  # M tokens, K, N
UPSAMPLE_SHAPES = [(1, 64, 512, 512), (1, 64, 256, 256), (1, 640, 64, 64)]  # tiny VAE's last two; SDXL's last


def measure(kernel, shape, unit, work, ceiling, ours, eager, compiled, ref32) -> dict:
    """work: bytes (unit GB/s) or FLOPs (unit TFLOP/s); ceiling: bytes/s or FLOP/s."""
    out_ours, out_eager = ours(), eager()
    err, eager_err = max_err(out_ours, ref32), max_err(out_eager, ref32)
    del out_ours, out_eager
    ours_us, eager_us, comp_us = time_peers(ours, eager, compiled)
    floor_us = work / ceiling * 1e6
    scale = 1e9 if unit == "GB/s" else 1e12
    return {
        "kernel": kernel, "shape": shape, "dtype": str(DTYPE).replace("torch.", ""), "unit": unit,
        "work": work, "floor_us": floor_us,
        "ours_us": ours_us, "eager_us": eager_us, "compiled_us": comp_us,
        "ours_rate": work / (ours_us * 1e-6) / scale,
        "eager_rate": work / (eager_us * 1e-6) / scale,
        "compiled_rate": work / (comp_us * 1e-6) / scale if comp_us else None,
        "ours_frac_of_floor": floor_us / ours_us,
        "eager_frac_of_floor": floor_us / eager_us,
        "compiled_frac_of_floor": floor_us / comp_us if comp_us else None,
        "ours_over_eager": ours_us / eager_us,
        "ours_over_compiled": ours_us / comp_us if comp_us else None,
        "max_abs_err_vs_fp32": err, "eager_max_abs_err_vs_fp32": eager_err,
    }


def main() -> int:
    args = bench_args(__doc__, "bench_pointwise")

    t_start = time.monotonic()
    torch.manual_seed(0)
    bandwidth, flops = copy_bandwidth(), matmul_rate()
    print(f"# {torch.cuda.get_device_name()}  copy {bandwidth / 1e9:.0f} GB/s  bf16 mm {flops / 1e12:.0f} TFLOP/s",
          flush=True)

    compiled = {}
    if not args.no_compile:
        compiled = {fn.__name__: compile_per_shape(fn)
                    for fn in (rms_norm_rope_reference, geglu_reference, linear_gelu_tanh_reference,
                               upsample_nearest_reference)}

    def comp(name, *a):
        return (lambda: compiled[name](*a)) if name in compiled else None

    rows = []
    with torch.inference_mode():
        b, l, h, d = FLUX_QK
        x = torch.randn(FLUX_QK, device="cuda", dtype=DTYPE)
        w = (1 + 0.1 * torch.randn(d, device="cuda")).to(DTYPE)
        ang = torch.rand(l, d, device="cuda") * 6.28
        cos, sin = ang.cos(), ang.sin()
        for rope in (True, False):
            t0 = time.monotonic()
            c, s = (cos, sin) if rope else (None, None)
            work = 2 * x.numel() * x.element_size() + w.numel() * w.element_size()
            work += 2 * cos.numel() * cos.element_size() if rope else 0
            ref32 = rms_norm_rope_reference(x.float(), w.float(), 1e-6, c, s)
            rows.append(measure("rms_norm_rope" + ("" if rope else " (no rope)"), list(FLUX_QK), "GB/s", work,
                                bandwidth, lambda: rms_norm_rope(x, w, 1e-6, c, s),
                                lambda: rms_norm_rope_reference(x, w, 1e-6, c, s),
                                comp("rms_norm_rope_reference", x, w, 1e-6, c, s), ref32))
            print(f"  rms_norm_rope rope={rope}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)

        for shape in GEGLU_SHAPES:
            t0 = time.monotonic()
            hh = torch.randn(shape, device="cuda", dtype=DTYPE)
            work = hh.numel() * hh.element_size() * 3 // 2
            ref32 = geglu_reference(hh.float())
            rows.append(measure("geglu", list(shape), "GB/s", work, bandwidth, lambda: geglu(hh),
                                lambda: geglu_reference(hh), comp("geglu_reference", hh), ref32))
            print(f"  geglu {shape}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)

        for shape in UPSAMPLE_SHAPES:
            xu = torch.randn(shape, device="cuda", dtype=DTYPE).to(memory_format=torch.channels_last)
            work = xu.numel() * xu.element_size() * 5  # read once, write 4x
            rows.append(measure("upsample_nearest x2", list(shape), "GB/s", work, bandwidth,
                                lambda: upsample_nearest(xu, 2), lambda: upsample_nearest_reference(xu, 2),
                                comp("upsample_nearest_reference", xu, 2), upsample_nearest_reference(xu.float(), 2)))

        t0 = time.monotonic()
        m, k, n = FLUX_FF
        xa = torch.randn(1, m, k, device="cuda", dtype=DTYPE)
        wa = (torch.randn(n, k, device="cuda") / k**0.5).to(DTYPE)
        ba = (0.1 * torch.randn(n, device="cuda")).to(DTYPE)
        ref32 = linear_gelu_tanh_reference(xa.float(), wa.float(), ba.float())
        rows.append(measure("linear_gelu_tanh", [1, m, k, n], "TFLOP/s", 2 * m * n * k, flops,
                            lambda: linear_gelu_tanh(xa, wa, ba), lambda: linear_gelu_tanh_reference(xa, wa, ba),
                            comp("linear_gelu_tanh_reference", xa, wa, ba), ref32))
        print(f"  linear_gelu_tanh: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)

    def fmt(v, spec, scale=1):
        return "-" if v is None else format(v * scale, spec)

    print("\n| kernel | shape | ours us | eager us | compiled us | ours/eager | ours/compiled | ours rate "
          "| ours % of floor | eager % | compiled % | max err (eager's) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {'x'.join(map(str, r['shape']))} | {r['ours_us']:.1f} | {r['eager_us']:.1f} "
              f"| {fmt(r['compiled_us'], '.1f')} | {r['ours_over_eager']:.2f} | {fmt(r['ours_over_compiled'], '.2f')} "
              f"| {r['ours_rate']:.0f} {r['unit']} | {100 * r['ours_frac_of_floor']:.0f} "
              f"| {100 * r['eager_frac_of_floor']:.0f} | {fmt(r['compiled_frac_of_floor'], '.0f', 100)} "
              f"| {r['max_abs_err_vs_fp32']:.2g} ({r['eager_max_abs_err_vs_fp32']:.2g}) |")

    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9, "bf16_matmul_TFLOPs": flops / 1e12,
        "timing": "per call in a CUDA graph of 20 calls, do_bench median of replays (warmup 25 ms, rep 100 ms)",
        "rows": rows, "wall_s": time.monotonic() - t_start,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
