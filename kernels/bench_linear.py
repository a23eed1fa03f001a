"""Micro-benchmark: our Triton linear (and linear + GEGLU epilogue) against cuBLAS at the linears of
an SDXL UNet step, batch 1, bf16, at 1024 and 512.

    python kernels/bench_linear.py --out linear.json [--no-compile]

GPU only. Each shape is timed inside a CUDA graph of 20 back-to-back calls (kernels/_bench.py
bench_us) for cuBLAS (F.linear; for the GEGLU projections F.linear then our geglu kernel, what the
fast path runs today) and for every launch configuration in CANDIDATES, with pointer loads or
persistent TMA tiles (Config.tma); the fastest configuration that passes the error check is
reported with its time ratio against cuBLAS and the time per step it would save (the shape's
calls per step x the difference), and the fastest of each kind beside it. Floor: 2*M*N*K FLOPs at the bf16 rate
of an 8192^3 torch.mm measured in the same run. Errors are max abs against an fp32 reference
from the same bf16 inputs; a configuration passes at up to twice cuBLAS's own error (+1 ulp).
--no-compile is accepted for device_run.sh's uniform call (nothing here is compiled).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rtdiff_kernels._bench import bench_args, bench_us, matmul_rate, max_err

try:
    from rtdiff_kernels.activations import geglu
    from rtdiff_kernels.linear import Config, linear, linear_geglu
except ImportError:  # run as a script from a checkout without the editable install
    from activations import geglu
    from linear import Config, linear, linear_geglu

DTYPE = torch.bfloat16
# (what, tokens M, K, N out of the projection, GEGLU?, calls per step): SDXL's transformer linears.
# The 1280-wide level has 60 blocks and 6 transformers, the 640-wide one 10 blocks and 5.
STEP_LINEARS = {
    1024: [("qkv 1280", 1024, 1280, 3840, False, 60), ("square 1280 (self out, cross q, cross out, proj)", 1024, 1280, 1280, False, 192),
           ("ff geglu 1280", 1024, 1280, 10240, True, 60), ("ff down 1280", 1024, 5120, 1280, False, 60),
           ("qkv 640", 4096, 640, 1920, False, 10), ("square 640", 4096, 640, 640, False, 40),
           ("ff geglu 640", 4096, 640, 5120, True, 10), ("ff down 640", 4096, 2560, 640, False, 10)],
    512: [("qkv 1280", 256, 1280, 3840, False, 60), ("square 1280 (self out, cross q, cross out, proj)", 256, 1280, 1280, False, 192),
          ("ff geglu 1280", 256, 1280, 10240, True, 60), ("ff down 1280", 256, 5120, 1280, False, 60),
          ("qkv 640", 1024, 640, 1920, False, 10), ("square 640", 1024, 640, 640, False, 40),
          ("ff geglu 640", 1024, 640, 5120, True, 10), ("ff down 640", 1024, 2560, 640, False, 10)],
}
_POINTER = {
    False: [Config(128, 128, 64, 8, 3), Config(128, 128, 64, 4, 4), Config(128, 256, 64, 8, 3), Config(64, 128, 64, 4, 4),
            Config(64, 64, 64, 4, 4), Config(128, 64, 64, 4, 4), Config(64, 256, 64, 8, 3), Config(256, 128, 64, 8, 3),
            Config(64, 128, 128, 4, 3), Config(128, 128, 128, 8, 2), Config(64, 64, 128, 4, 3)],
    True: [Config(128, 128, 64, 8, 3), Config(128, 128, 64, 8, 4), Config(128, 64, 64, 4, 4), Config(64, 128, 64, 4, 4),
           Config(64, 64, 64, 4, 4), Config(256, 64, 64, 8, 3), Config(128, 64, 64, 8, 4), Config(64, 128, 64, 8, 3),
           Config(128, 64, 128, 8, 3)],
}
# Persistent TMA tiles (Config.tma). A GEGLU stage holds three tiles (x, hidden and gate rows of W):
# 48 KB at 128 x 128 x 64 in bf16, so four stages plus the 32 KB output tile nearly fill an H200's
# 227 KB of shared memory.
_TMA = {
    False: [Config(128, 128, 64, 8, 4, tma=True), Config(128, 128, 64, 4, 4, tma=True), Config(128, 256, 64, 8, 3, tma=True),
            Config(128, 64, 64, 4, 4, tma=True), Config(64, 128, 64, 4, 4, tma=True), Config(64, 64, 64, 4, 4, tma=True),
            Config(128, 128, 128, 8, 2, tma=True), Config(64, 128, 128, 4, 3, tma=True), Config(256, 128, 64, 8, 3, tma=True),
            Config(128, 128, 64, 8, 4, group_m=16, tma=True), Config(128, 128, 64, 8, 4, tma=True, persistent=False),
            Config(128, 256, 64, 8, 3, tma=True, persistent=False)],
    True: [Config(128, 128, 64, 8, 3, tma=True), Config(128, 128, 64, 8, 4, tma=True), Config(128, 64, 64, 4, 4, tma=True),
           Config(128, 64, 64, 8, 4, tma=True), Config(128, 64, 64, 4, 5, tma=True), Config(64, 128, 64, 4, 4, tma=True),
           Config(64, 64, 64, 4, 4, tma=True), Config(128, 64, 128, 8, 3, tma=True), Config(256, 64, 64, 8, 3, tma=True),
           Config(128, 128, 64, 8, 3, group_m=16, tma=True), Config(128, 128, 64, 8, 3, tma=True, persistent=False),
           Config(128, 128, 64, 8, 4, tma=True, persistent=False), Config(256, 64, 64, 8, 3, tma=True, persistent=False),
           Config(128, 64, 64, 8, 4, tma=True, persistent=False), Config(128, 128, 32, 8, 4, tma=True, persistent=False),
           Config(128, 128, 32, 8, 5, tma=True)],
}
CANDIDATES = {gated: _POINTER[gated] + _TMA[gated] for gated in (False, True)}


def measure(what, m, k, n, gated, calls, flops_peak) -> dict:
    g = torch.Generator("cuda").manual_seed(m * 7 + n)
    x = torch.randn(m, k, device="cuda", generator=g).to(DTYPE)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(DTYPE)
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).to(DTYPE)
    h32 = x.float() @ w.float().T + b.float()
    if gated:
        ref = h32[:, : n // 2] * F.gelu(h32[:, n // 2:])
        theirs = lambda: geglu(F.linear(x, w, b))  # noqa: E731
        ours = lambda cfg: linear_geglu(x, w, b, cfg)  # noqa: E731
    else:
        ref = h32
        theirs = lambda: F.linear(x, w, b)  # noqa: E731
        ours = lambda cfg: linear(x, w, b, cfg)  # noqa: E731
    cublas_err = max_err(theirs(), ref)
    tol = 2 * cublas_err + torch.finfo(DTYPE).eps * ref.abs().max().item()
    cublas_us = bench_us(theirs)
    flop = 2 * m * n * k
    row = {"what": what, "m": m, "k": k, "n": n, "geglu": gated, "calls_per_step": calls,
           "floor_us": flop / flops_peak * 1e6, "cublas_us": cublas_us, "cublas_tflops": flop / cublas_us / 1e6,
           "cublas_err": cublas_err, "configs": []}
    for cfg in CANDIDATES[gated]:
        print(f"  {m}x{k}x{n} {cfg}", file=sys.stderr, flush=True)  # where a hang would stop
        try:
            err = max_err(ours(cfg), ref)
            us = bench_us(lambda: ours(cfg))
            row["configs"].append({"config": list(cfg.__dict__.values()), "us": us, "err": err, "ok": err <= tol})
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile (shared memory) is a result
            row["configs"].append({"config": list(cfg.__dict__.values()), "error": f"{type(e).__name__}: {str(e)[:160]}"})
    ok = [c for c in row["configs"] if c.get("ok")]
    if ok:
        best = min(ok, key=lambda c: c["us"])
        row.update(best_config=best["config"], ours_us=best["us"], ours_err=best["err"],
                   ours_tflops=flop / best["us"] / 1e6, ours_over_cublas=best["us"] / cublas_us,
                   step_saving_us=calls * (cublas_us - best["us"]))
    for kind, tma in (("pointer", False), ("tma", True)):
        mine = [c for c in ok if c["config"][6] == tma]
        if mine:
            row[f"best_{kind}_us"] = min(c["us"] for c in mine)
    return row


def main() -> int:
    args = bench_args(__doc__, "bench_linear")
    t0 = time.monotonic()
    peak = matmul_rate()
    print(f"# {torch.cuda.get_device_name()}  bf16 mm {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for size, shapes in STEP_LINEARS.items():
        for what, m, k, n, gated, calls in shapes:
            r = measure(what, m, k, n, gated, calls, peak)
            r["size"] = size
            rows.append(r)
            print(f"{size} {what} [{m}x{k}x{n}]: cuBLAS{'+geglu' if gated else ''} {r['cublas_us']:.1f} us, ours "
                  f"{r.get('ours_us', float('nan')):.1f} us {r.get('best_config')} -> "
                  f"{r.get('step_saving_us', float('nan')):+.0f} us per step", flush=True)
    for size in STEP_LINEARS:
        gain = sum(max(0.0, r.get("step_saving_us", 0.0)) for r in rows if r["size"] == size)
        print(f"{size}: taking ours only where it wins saves {gain:.0f} us per step", flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bf16_peak_tflops": peak / 1e12,
           "rows": rows, "seconds": time.monotonic() - t0}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    Path(args.out).with_suffix(".md").write_text(markdown(out))
    return 0


def markdown(r: dict) -> str:
    """The table of a result: per shape cuBLAS against our fastest passing configuration."""
    lines = [f"# Triton linear (+ GEGLU epilogue) against cuBLAS at an SDXL step's linears: {r['device']}", "",
             f"torch {r['torch']}; bf16; bf16 mm peak in this run {r['bf16_peak_tflops']:.0f} TFLOP/s; per call in a CUDA "
             "graph of 20 calls (kernels/_bench.py bench_us). GEGLU rows: cuBLAS projection + our geglu kernel "
             "against one fused kernel. Config: block M, N, K, warps, stages, group M, TMA, persistent (with TMA).", "",
             "| size | linear | M x K x N | calls/step | cuBLAS us (TFLOP/s) | ours us (TFLOP/s) | ours/cuBLAS | config | "
             "per step | err (cuBLAS's) | best pointer / TMA us |", "|--:|---|---|--:|--:|--:|--:|---|--:|---|---|"]
    for x in r["rows"]:
        ours = (f"{x['ours_us']:.1f} ({x['ours_tflops']:.0f})", f"{x['ours_over_cublas']:.2f}",
                str(x["best_config"]), f"{x['step_saving_us']:+.0f} us", f"{x['ours_err']:.3g} ({x['cublas_err']:.3g})") \
            if "ours_us" in x else ("-", "-", "none passed", "-", "-")
        lines.append(f"| {x['size']} | {x['what']}{' (GEGLU)' if x['geglu'] else ''} | {x['m']}x{x['k']}x{x['n']} | "
                     f"{x['calls_per_step']} | {x['cublas_us']:.1f} ({x['cublas_tflops']:.0f}) | " + " | ".join(ours) +
                     f" | {x.get('best_pointer_us', float('nan')):.1f} / {x.get('best_tma_us', float('nan')):.1f} |")
    for size in sorted({x["size"] for x in r["rows"]}, reverse=True):
        gain = sum(max(0.0, x.get("step_saving_us", 0.0)) for x in r["rows"] if x["size"] == size)
        lines.append(f"\n{size}: taking ours only where it is faster would save {gain:.0f} us per step.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
