"""Micro-benchmark: our Triton FlashAttention forward (kernels/attention.py) against PyTorch's SDPA
with each backend forced (flash, cuDNN, memory-efficient), PyTorch's default choice and the
flash-attn packages installed (FA2, FA3 or FA4), at the attention shapes of SDXL and Flux at
1024x1024, bf16: at batch 2 (classifier-free guidance) and, for SDXL, at batch 1 as a 1-step frame
runs them (10 self-attentions over 4096 tokens, 60 over 1024, and 70 cross-attentions over 77 text
tokens).

Each call is timed inside a CUDA graph, as the replica runs it (kernels/_bench.py bench_us): timed
one by one, a 10-20 us kernel measures its launch, not itself.

    python kernels/bench_attention.py --out attention.json

GPU only. Inputs are [B, L, H, D] tensors viewed as [B, H, L, D], as the attention processors
pass them. Attention is compute-bound at these lengths, so the floor is the tensor cores: the run
measures the device's dense bf16 matmul rate (an 8192^3 torch.matmul) and reports each kernel's
fraction of it (4 * B * H * Lq * Lk * D flops); the memory floor (q, k, v, o once, at the measured
copy bandwidth) is reported too and matters only for the 77-token cross-attention.

No torch.compile peer: compiling the reference formula (or SDPA) lowers to the same SDPA kernels
measured here (Inductor pattern-matches softmax(q k^T) v back to SDPA), so it would time one of
the rows below again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton
import triton.testing

SHAPES = {  # name: (B, H, Lq, Lk, D)
    "sdxl-self-4096": (2, 10, 4096, 4096, 64),
    "sdxl-self-1024": (2, 20, 1024, 1024, 64),
    "sdxl-cross-77": (2, 10, 4096, 77, 64),
    "flux-joint-4608": (1, 24, 4608, 4608, 128),
    "sdxl-self-4096-b1": (1, 10, 4096, 4096, 64),
    "sdxl-self-1024-b1": (1, 20, 1024, 1024, 64),
    "sdxl-cross-77-b1": (1, 10, 4096, 77, 64),
    "sdxl-cross-77-1024-b1": (1, 20, 1024, 77, 64),
}
SDPA_BACKENDS = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", None]  # None: PyTorch's choice


def bench(fn) -> float:
    """Milliseconds: the matmul and copy peaks are long calls, timed one by one."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measured_peaks() -> dict:
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench(lambda: torch.matmul(a, b))
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB of fp32
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    return {"bf16_matmul_tflops": 2 * n ** 3 / mm_ms / 1e9, "copy_gbps": 2 * (1 << 30) / copy_ms / 1e6}


def reference_fp32(q, k, v) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in fp32, one head at a time (the full fp32 score matrix of the
    Flux shape is 2 GB; per head keeps the peak small)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = torch.matmul(q[b, h].float(), k[b, h].float().T) * scale
            out[b, h] = torch.matmul(torch.softmax(s, dim=-1), v[b, h].float())
    return out


def sdpa_fn(backend: str | None):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)

    def run(q, k, v):
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def flash_attn_runs() -> list:
    """The flash-attn packages that import here, called as the attention registry calls them
    (rtdiff_cluster/ops/attention.py): the optional FA2/FA3/FA4 rows."""
    from rtdiff_cluster.ops.attention import AttentionRegistry

    reg = AttentionRegistry()
    return [(b.name, lambda q, k, v, run=b.run: run(q, k, v, None)) for b in reg.backends
            if b.name.startswith("flash-attn") and reg.installed()[b.name] is None]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_attention.json", help="JSON results file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (Triton kernels are timed on the device); none found.", file=sys.stderr)
        return 2

    from rtdiff_kernels import attention as ours
    from rtdiff_kernels._bench import bench_us

    t0 = time.time()
    peaks = measured_peaks()
    results = []
    for name, (B, H, LQ, LK, D) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, LQ, H, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
        k = torch.randn(B, LK, H, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
        v = torch.randn(B, LK, H, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
        ref = reference_fp32(q, k, v)
        flops = 4 * B * H * LQ * LK * D
        nbytes = 2 * (2 * B * H * LQ * D + 2 * B * H * LK * D)  # q, o, k, v in bf16, once each
        floor_ms = max(flops / (peaks["bf16_matmul_tflops"] * 1e9), nbytes / (peaks["copy_gbps"] * 1e6))

        rows = {}
        runs = ([("triton (ours)", ours.flash_attention)] + [(f"sdpa {b or 'default'}", sdpa_fn(b)) for b in SDPA_BACKENDS]
                + flash_attn_runs())
        for label, fn in runs:
            try:
                t_first = time.perf_counter()
                out = fn(q, k, v)  # first call: autotuning (ours), kernel selection (SDPA), JIT compilation (FA4)
                torch.cuda.synchronize()
                t_first = time.perf_counter() - t_first
            except Exception as e:  # noqa: BLE001 - a backend that cannot run this shape is a row, not a stop
                rows[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
                continue
            ms = bench_us(lambda: fn(q, k, v)) / 1e3
            rows[label] = {"ms": ms, "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6,
                           "floor_fraction": floor_ms / ms, "max_abs_err_vs_fp32": (out.float() - ref).abs().max().item(),
                           "first_call_s": t_first}
            if label == "triton (ours)":
                rows[label]["config"] = str(ours._attn_fwd.best_config)
            del out
        mine = rows["triton (ours)"]
        for label, r in rows.items():
            if label != "triton (ours)" and "ms" in r and "ms" in mine:
                r["ours_speedup"] = r["ms"] / mine["ms"]  # > 1: ours is faster
        results.append({"shape": name, "B": B, "H": H, "Lq": LQ, "Lk": LK, "D": D, "dtype": "bfloat16",
                        "flops": flops, "bytes": nbytes, "floor_ms": floor_ms, "runs": rows})
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}: bf16 matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s, "
          f"copy {peaks['copy_gbps']:.0f} GB/s (measured)\n")
    print("| shape | kernel | ms | TFLOP/s | of floor | ours faster by | max err vs fp32 | first call, s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for res in results:
        for label, r in res["runs"].items():
            if "error" in r:
                print(f"| {res['shape']} | {label} | unavailable: {r['error'][:60]} | | | | | |")
                continue
            sp = f"{r['ours_speedup']:.2f}x" if "ours_speedup" in r else ""
            print(f"| {res['shape']} | {label} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['floor_fraction']:.0%} | {sp} "
                  f"| {r['max_abs_err_vs_fp32']:.2e} | {r['first_call_s']:.2f} |")
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "measured_peaks": peaks, "results": results, "wall_s": time.time() - t0,
           "method": "median per call of 20 calls captured in a CUDA graph (kernels/_bench.py bench_us); inputs [B,L,H,D] viewed as [B,H,L,D]; "
                     "floor = max(flops / measured bf16 matmul rate, bytes / measured copy bandwidth)"}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"\nwrote {args.out} ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
