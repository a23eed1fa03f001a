"""Micro-benchmark of FP8 linears at SDXL's and Flux-dev's real 1024x1024 shapes (GPU only).

For each (M tokens, K, N): the per-token quantisation kernel against its eager and compiled
PyTorch reference (GB/s, fraction of the measured copy bandwidth), and the linear itself: bf16
F.linear (cuBLAS), Fp8Linear end to end (quantise + torch._scaled_mm), torch._scaled_mm alone
(with and without fast accumulation), and torch.compile of the reference end to end (PyTorch
quantisation + _scaled_mm). Plus the fidelity of the fp8 and bf16 outputs against an fp32 linear.

Then the producers that write an FP8 linear's input already quantised (geglu_fp8,
add_layer_norm_fp8 at SDXL's 1024 batch-1 shapes; gelu_tanh_fp8 at Flux-dev's), timed inside CUDA
graphs (kernels/_bench.py bench_us) against the unfused passes they replace (the bf16 kernel or
PyTorch op, the concatenation, quantize_per_token), eager PyTorch and torch.compile of the
reference; floor: bytes read and written / copy bandwidth. gelu_tanh_fp8 also times its two-pass
kernel, which rows too wide for the registers take.

    python kernels/bench_fp8.py --out fp8.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from rtdiff_kernels._bench import copy_bandwidth

SHAPES = [  # name, M tokens, K, N
    ("sdxl ff up (geglu)", 8192, 1280, 10240),
    ("sdxl ff down", 8192, 5120, 1280),
    ("sdxl attn proj", 8192, 1280, 1280),
    ("flux ff up", 4608, 3072, 12288),
    ("flux ff down", 4608, 12288, 3072),
    ("flux qkv", 4608, 3072, 9216),
    ("flux single proj_out", 4608, 15360, 3072),
]
# Dense datasheet peaks (TFLOP/s) of the SXM parts, for the "fraction of peak" column only.
NOMINAL_PEAK = {"H100": {"bf16": 989.4, "fp8": 1978.9}, "H200": {"bf16": 989.4, "fp8": 1978.9}}


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms




def _measure(name, m, k, n, copy_gbps, peak, quant_compiled, e2e_compiled) -> dict:
    from rtdiff_cluster.quant.fp8 import Fp8Linear, fidelity
    from rtdiff_kernels.fp8_quant import quantize_per_token, quantize_per_token_reference

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    lin.weight.copy_(w)
    lin.bias.copy_(b)
    f = Fp8Linear.from_linear(lin)
    q, s = quantize_per_token(x)
    sw = f.weight_scale.view(1, -1)

    def scaled_mm(fast=False):
        return torch._scaled_mm(q, f.weight.t(), scale_a=s, scale_b=sw, bias=b, out_dtype=torch.bfloat16,
                                use_fast_accum=fast)

    qt = {"ours": _bench(lambda: quantize_per_token(x)),
          "eager": _bench(lambda: quantize_per_token_reference(x)),
          "compiled": _bench(lambda: quant_compiled(x))}
    qbytes = m * k * x.element_size() + m * k + 4 * m  # read x, write fp8 x, write the scales
    lt = {"bf16": _bench(lambda: F.linear(x, w, b)),
          "fp8_e2e": _bench(lambda: f(x)),
          "scaled_mm": _bench(scaled_mm),
          "scaled_mm_fast_accum": _bench(lambda: scaled_mm(True)),
          "fp8_compiled_e2e": _bench(lambda: e2e_compiled(x, f.weight, sw, b))}
    flops = 2 * m * n * k

    exact = F.linear(x.float(), w.float(), b.float())
    y_bf16, y_fp8, y_fast = F.linear(x, w, b), f(x), scaled_mm(True)
    fid = {"fp8_vs_fp32": fidelity(exact, y_fp8), "bf16_vs_fp32": fidelity(exact, y_bf16),
           "fp8_vs_bf16": fidelity(y_bf16, y_fp8), "fp8_fast_accum_vs_fp32": fidelity(exact, y_fast)}

    row = {"name": name, "M": m, "K": k, "N": n,
           "quant": {"bytes": qbytes, **{f"{key}_ms": v for key, v in qt.items()},
                     **{f"{key}_gbps": qbytes / v / 1e6 for key, v in qt.items()},
                     "ours_frac_of_copy": qbytes / qt["ours"] / 1e6 / copy_gbps,
                     "speedup_vs_eager": qt["eager"] / qt["ours"],
                     "speedup_vs_compiled": qt["compiled"] / qt["ours"]},
           "linear": {"flops": flops, **{f"{key}_ms": v for key, v in lt.items()},
                      **{f"{key}_tflops": flops / v / 1e9 for key, v in lt.items()},
                      "speedup_e2e_vs_bf16": lt["bf16"] / lt["fp8_e2e"],
                      "speedup_scaled_mm_vs_bf16": lt["bf16"] / lt["scaled_mm"],
                      "speedup_e2e_vs_compiled_e2e": lt["fp8_compiled_e2e"] / lt["fp8_e2e"],
                      "quant_share_of_e2e": qt["ours"] / lt["fp8_e2e"]},
           "fidelity": fid}
    if peak:
        row["linear"]["bf16_frac_of_nominal_peak"] = flops / lt["bf16"] / 1e9 / peak["bf16"]
        row["linear"]["scaled_mm_frac_of_nominal_peak"] = flops / lt["scaled_mm"] / 1e9 / peak["fp8"]
    return row


PRODUCER_SHAPES = [  # name, M tokens, row width (GEGLU: N of [M, 2N]; LayerNorm: D)
    ("geglu_fp8", "sdxl 1280-ch ff", 1024, 5120),
    ("geglu_fp8", "sdxl 640-ch ff", 4096, 2560),
    ("add_layer_norm_fp8", "sdxl 1280-ch norm3", 1024, 1280),
    ("add_layer_norm_fp8", "sdxl 640-ch norm3", 4096, 640),
    ("gelu_tanh_fp8", "flux single block proj_out input", 4608, 12288),
    ("gelu_tanh_fp8", "flux image ff down input", 4096, 12288),
]
FLUX_ATTENTION_WIDTH = 3072  # a Flux single block's prefix: its attention output, ahead of the MLP's GELU


def _measure_producer(kernel, name, m, n, copy_gbps) -> dict:
    from rtdiff_kernels._bench import bench_us, compile_per_shape
    from rtdiff_kernels import activations
    from rtdiff_kernels.activations import geglu, geglu_fp8, geglu_fp8_reference, gelu_tanh_fp8, gelu_tanh_fp8_reference
    from rtdiff_kernels.add_layer_norm import add_layer_norm, add_layer_norm_fp8, add_layer_norm_fp8_reference
    from rtdiff_kernels.fp8_quant import quantize_per_token

    if kernel == "geglu_fp8":
        h = torch.randn(m, 2 * n, device="cuda", dtype=torch.bfloat16)
        ours, unfused = (lambda: geglu_fp8(h)), (lambda: quantize_per_token(geglu(h)))
        ref = geglu_fp8_reference
        eager, compiled_fn, args = (lambda: ref(h)), compile_per_shape(ref), (h,)
        floor_bytes = m * 2 * n * 2 + m * n + 4 * m
    elif kernel == "gelu_tanh_fp8":
        p = FLUX_ATTENTION_WIDTH if "single" in name else 0
        h = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        prefix = torch.randn(m, p, device="cuda", dtype=torch.bfloat16) if p else None
        ours = lambda: gelu_tanh_fp8(h, prefix)  # noqa: E731

        def unfused():
            g = F.gelu(h, approximate="tanh")
            return quantize_per_token(torch.cat([prefix, g], dim=-1) if prefix is not None else g)

        def two_pass():
            saved = activations._GELU_FP8_ONE_PASS_LANES
            activations._GELU_FP8_ONE_PASS_LANES = 0
            try:
                return gelu_tanh_fp8(h, prefix)
            finally:
                activations._GELU_FP8_ONE_PASS_LANES = saved
        ref = gelu_tanh_fp8_reference
        eager, compiled_fn, args = (lambda: ref(h, prefix)), compile_per_shape(ref), (h, prefix)
        floor_bytes = m * (p + n) * 2 + m * (p + n) + 4 * m
        n += p
    else:
        x, r = torch.randn(m, n, device="cuda", dtype=torch.bfloat16), torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w, b = torch.ones(n, device="cuda", dtype=torch.bfloat16), torch.zeros(n, device="cuda", dtype=torch.bfloat16)

        def unfused():
            h, y = add_layer_norm(x, r, w, b, 1e-5)
            return h, *quantize_per_token(y)
        ours = lambda: add_layer_norm_fp8(x, r, w, b, 1e-5)  # noqa: E731
        ref = add_layer_norm_fp8_reference
        eager, compiled_fn, args = (lambda: ref(x, r, w, b, 1e-5)), compile_per_shape(ref), (x, r, w, b, 1e-5)
        floor_bytes = 3 * m * n * 2 + m * n + 4 * m  # read x, r; write h (bf16), y (fp8), scales
    compiled_fn(*args)
    t = {"ours": bench_us(ours), "unfused": bench_us(unfused), "eager": bench_us(eager),
         "compiled": bench_us(lambda: compiled_fn(*args))}
    if kernel == "gelu_tanh_fp8":
        t["two_pass"] = bench_us(two_pass)
    floor_us = floor_bytes / (copy_gbps * 1e3)
    return {"kernel": kernel, "name": name, "M": m, "width": n, "floor_bytes": floor_bytes, "floor_us": floor_us,
            **{f"{k}_us": v for k, v in t.items()}, "ours_frac_of_floor": floor_us / t["ours"],
            "unfused_over_ours": t["unfused"] / t["ours"], "compiled_over_ours": t["compiled"] / t["ours"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fp8: needs a CUDA GPU (FP8 tensor cores, compute capability >= 8.9); none found")
    if torch.cuda.get_device_capability() < (8, 9):
        sys.exit(f"bench_fp8: {torch.cuda.get_device_name()} has no FP8 tensor cores (needs compute capability >= 8.9)")

    import triton

    from rtdiff_kernels.fp8_quant import quantize_per_token_reference

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    device_name = torch.cuda.get_device_name()
    peak = next((v for k, v in NOMINAL_PEAK.items() if k in device_name), None)
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth() / 1e9
    torch.cuda.empty_cache()

    quant_compiled = torch.compile(quantize_per_token_reference, dynamic=False)

    def fp8_reference_e2e(x, w_fp8, scale_w, bias):
        q, s = quantize_per_token_reference(x)
        return torch._scaled_mm(q, w_fp8.t(), scale_a=s, scale_b=scale_w, bias=bias, out_dtype=x.dtype)

    e2e_compiled = torch.compile(fp8_reference_e2e, dynamic=False)

    with torch.inference_mode():
        rows = []
        for shape in SHAPES:
            rows.append(_measure(*shape, copy_gbps, peak, quant_compiled, e2e_compiled))
            torch.cuda.empty_cache()
        producers = [_measure_producer(*shape, copy_gbps) for shape in PRODUCER_SHAPES]

    print(f"\n{device_name}, torch {torch.__version__}, triton {triton.__version__}, copy {copy_gbps:.0f} GB/s\n")
    print("| quantize_per_token | M x K | ours us | eager us | compiled us | ours GB/s | of copy | vs eager | vs compiled |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        qr = r["quant"]
        print(f"| {r['name']} | {r['M']}x{r['K']} | {qr['ours_ms'] * 1e3:.1f} | {qr['eager_ms'] * 1e3:.1f} | "
              f"{qr['compiled_ms'] * 1e3:.1f} | {qr['ours_gbps']:.0f} | {qr['ours_frac_of_copy']:.2f} | "
              f"{qr['speedup_vs_eager']:.1f}x | {qr['speedup_vs_compiled']:.2f}x |")
    print("\n| linear | M, K -> N | bf16 TFLOP/s | fp8 e2e | scaled_mm | scaled_mm fast | compiled e2e | "
          "e2e vs bf16 | mm vs bf16 | e2e vs compiled | quant share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lr = r["linear"]
        print(f"| {r['name']} | {r['M']}, {r['K']} -> {r['N']} | {lr['bf16_tflops']:.0f} | {lr['fp8_e2e_tflops']:.0f} | "
              f"{lr['scaled_mm_tflops']:.0f} | {lr['scaled_mm_fast_accum_tflops']:.0f} | {lr['fp8_compiled_e2e_tflops']:.0f} | "
              f"{lr['speedup_e2e_vs_bf16']:.2f}x | {lr['speedup_scaled_mm_vs_bf16']:.2f}x | "
              f"{lr['speedup_e2e_vs_compiled_e2e']:.2f}x | {lr['quant_share_of_e2e']:.0%} |")
    print("\n| fidelity vs fp32 linear | fp8 rel L2 | fp8 PSNR dB | fp8 cosine | fp8 fast-accum rel L2 | bf16 rel L2 | "
          "fp8 vs bf16 rel L2 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fd = r["fidelity"]
        print(f"| {r['name']} | {fd['fp8_vs_fp32']['rel_l2']:.4f} | {fd['fp8_vs_fp32']['psnr_db']:.1f} | "
              f"{fd['fp8_vs_fp32']['cosine']:.5f} | {fd['fp8_fast_accum_vs_fp32']['rel_l2']:.4f} | "
              f"{fd['bf16_vs_fp32']['rel_l2']:.4f} | {fd['fp8_vs_bf16']['rel_l2']:.4f} |")

    print("\n| fused producer (graph-timed) | M x width | ours us | two-pass us | unfused us | eager us | compiled us | "
          "floor us | of floor | unfused / ours | compiled / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in producers:
        two_pass = f"{p['two_pass_us']:.1f}" if "two_pass_us" in p else "-"
        print(f"| {p['kernel']} ({p['name']}) | {p['M']}x{p['width']} | {p['ours_us']:.1f} | {two_pass} | "
              f"{p['unfused_us']:.1f} | {p['eager_us']:.1f} | {p['compiled_us']:.1f} | {p['floor_us']:.1f} | "
              f"{p['ours_frac_of_floor']:.2f} | {p['unfused_over_ours']:.2f}x | {p['compiled_over_ours']:.2f}x |")

    result = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
              "copy_gbps": copy_gbps, "nominal_peak_tflops": peak, "shapes": rows, "producers": producers}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
