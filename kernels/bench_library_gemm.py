"""Micro-benchmark: a CuTe-DSL GEMM library (quack-kernels, which FlashAttention 4 depends on)
against cuBLAS at an SDXL 1024 step's linears, bf16, each call timed inside a CUDA graph.

The step's GEMMs are 7.7 ms of its kernel time (benchmarks/NOTES.md, "The step's GEMMs call by
call"): the large ones run at 596-655 TFLOP/s under cuBLAS, the 1024 x 1280 x 1280 squares at
409-460. Two questions, one row each per shape:
- plain: does quack's GEMM (tuned: its autotuner picks a configuration per shape; default: its
  heuristic) beat cuBLAS's F.linear with the bias in its epilogue?
- GEGLU: the feed-forward's up projection with the gating in the GEMM's epilogue
  (quack's gemm_act, activation "geglu", the projection never stored) against cuBLAS plus our
  geglu kernel (kernels/activations.py), as the step runs it. quack's GEGLU takes the tanh
  approximation of GELU where SDXL's takes erf; its error against an fp32 reference of the exact
  formula is reported beside the time, so the approximation's cost is measured, not assumed.

    python kernels/bench_library_gemm.py --out library_gemm.json

GPU only; without quack-kernels installed it reports cuBLAS alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

# (tokens M, in K, out N, calls per 1024 step), from benchmarks/gemm_calls.py's labelled run.
SHAPES = {
    "ff up + GEGLU 1280->2x5120": (1024, 1280, 10240, 60),
    "ff down 5120->1280": (1024, 5120, 1280, 60),
    "qkv 1280->3840": (1024, 1280, 3840, 60),
    "out/proj 1280->1280": (1024, 1280, 1280, 132),
    "640 level ff up + GEGLU": (4096, 640, 5120, 10),
    "640 level out 640->640": (4096, 640, 640, 30),
}
GATED = {"ff up + GEGLU 1280->2x5120", "640 level ff up + GEGLU"}


def _quack():
    try:
        from quack import gemm_interface
    except Exception as e:  # noqa: BLE001 - optional: reported as a row, not a stop
        return None, f"{type(e).__name__}: {e}"
    return gemm_interface, None


def _row(fn, ref: torch.Tensor, flops: float) -> dict:
    from rtdiff_kernels._bench import bench_us

    try:
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        us = bench_us(fn)
    except Exception as e:  # noqa: BLE001 - a configuration that cannot run is a row
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    err = (out.float() - ref).abs().max().item()
    return {"us": us, "tflops": flops / us / 1e6, "max_abs_err_vs_fp32": err, "first_call_s": first}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_library_gemm.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_library_gemm.py needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    from rtdiff_kernels.activations import geglu

    quack, why = _quack()
    results = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (m, k, n, calls) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
        b = (torch.randn(n, device="cuda", generator=g) * 0.1).bfloat16()
        flops = 2 * m * k * n
        h = x.float() @ w.float().T + b.float()
        rows = {}
        if name in GATED:
            hidden, gate = h.chunk(2, dim=-1)
            ref = hidden * F.gelu(gate)  # SDXL's GEGLU: exact (erf) GELU
            rows["cuBLAS + our geglu"] = _row(lambda: geglu(F.linear(x, w, b)), ref, flops)
            if quack is not None:
                # quack gates column pairs (gate, up) interleaved: the same weights, reordered once.
                w_il = torch.stack([w[n // 2:], w[:n // 2]], dim=1).reshape(n, k)
                b_il = torch.stack([b[n // 2:], b[:n // 2]], dim=1).reshape(n)
                for tuned in (True, False):
                    rows[f"quack gemm_act geglu ({'tuned' if tuned else 'default'})"] = _row(
                        lambda tuned=tuned: quack.gemm_act(x, w_il.T, bias=b_il, activation="geglu",
                                                           store_preact=False, tuned=tuned)[1], ref, flops)
        else:
            ref = h
            rows["cuBLAS F.linear"] = _row(lambda: F.linear(x, w, b), ref, flops)
            if quack is not None:
                for tuned in (True, False):
                    rows[f"quack gemm ({'tuned' if tuned else 'default'})"] = _row(
                        lambda tuned=tuned: quack.gemm(x, w.T, bias=b, tuned=tuned), ref, flops)
        results.append({"shape": name, "m": m, "k": k, "n": n, "calls_per_1024_step": calls, "rows": rows})
        print(f"{name}: " + ", ".join(f"{lab} {r['us']:.1f} us ({r['tflops']:.0f} TFLOP/s, err {r['max_abs_err_vs_fp32']:.3g})"
                                      if "us" in r else f"{lab} {r['error'][:80]}" for lab, r in rows.items()), flush=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "quack": why or "installed",
           "results": results,
           "method": "median per call of calls captured back to back in a CUDA graph (kernels/_bench.py bench_us); "
                     "error: max |out - fp32 reference| over the output (GEGLU rows: against the exact-erf formula)"}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
