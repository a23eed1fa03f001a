"""What a kernel boundary costs inside a CUDA graph, with and without programmatic dependent launch.

A 1024 SDXL step is ~1,280 kernels in one graph; ~600 of them are our Triton kernels of 3-12 us.
Between two dependent kernels the GPU drains the first one's last wave, then launches the second
(its CTAs, their prologue). Programmatic dependent launch (PDL, Hopper and later) lets the second
kernel's CTAs become resident while the first finishes; they block in `griddepcontrol.wait` until
the first kernel's memory is visible. This measures, per boundary, in graphs of many launches:

  chain     N row-wise kernels (h = x + r; y = h * 2 over [1024, 1280] bf16, 10.5 MB, the size
            of SDXL's add+LayerNorm), each reading the last one's output;
  gemm+pw   N pairs: a cuBLAS 1024 x 1280 x 1280 linear, then the row-wise kernel on its output
            (the step's most common boundary).

Each with the row-wise kernel launched plain or with PDL. Times are medians of graph replays
timed with CUDA events, per boundary (replay time / launches).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _rowwise_kernel(x_ptr, r_ptr, h_ptr, M, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()  # the previous kernel's writes are visible from here on
        gdc_launch_dependents()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, (x + r * 0.5).to(h_ptr.dtype.element_ty), mask=mask)


def _rowwise(x, r, out, pdl: bool):
    m, d = x.shape
    rows = 2
    _rowwise_kernel[(triton.cdiv(m, rows),)](x, r, out, m, d, ROWS=rows, BLOCK_D=triton.next_power_of_2(d),
                                             PDL=pdl, num_warps=4, launch_pdl=pdl)


def _graph(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _time(g, reps: int) -> float:
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    m, d = 1024, 1280
    bufs = [torch.randn(m, d, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    r = torch.randn(m, d, device=dev, dtype=torch.bfloat16)
    w = torch.randn(d, d, device=dev, dtype=torch.bfloat16) / d ** 0.5
    bias = torch.randn(d, device=dev, dtype=torch.bfloat16)
    rows = []

    def chain(pdl):
        def fn():
            for i in range(a.n):
                _rowwise(bufs[i % 2], r, bufs[(i + 1) % 2], pdl)
        return fn

    def gemm_pw(pdl):
        def fn():
            for i in range(a.n // 2):
                torch.addmm(bias, bufs[0], w.t(), out=bufs[2])
                _rowwise(bufs[2], r, bufs[0], pdl)
        return fn

    def gemm_only():
        def fn():
            for i in range(a.n):
                torch.addmm(bias, bufs[i % 2], w.t(), out=bufs[(i + 1) % 2])
        return fn

    # Correctness first: the PDL chain must give the plain chain's result.
    for b in bufs[:2]:
        b.copy_(torch.randn_like(b))
    start = bufs[0].clone()
    chain(False)()
    ref = bufs[0].clone()
    bufs[0].copy_(start)
    g = _graph(chain(True))
    bufs[0].copy_(start)
    g.replay()
    torch.cuda.synchronize()
    print(f"pdl chain equals plain: {torch.equal(bufs[0], ref)}", flush=True)

    for name, make, launches in (("chain", chain, a.n), ("gemm+pw", gemm_pw, a.n)):
        for trial in range(2):
            for pdl in (False, True):
                ms = _time(_graph(make(pdl)), a.reps)
                rows.append({"case": name, "pdl": pdl, "trial": trial, "ms": ms, "us_per_kernel": 1e3 * ms / launches})
                print(f"{name:8s} pdl={pdl!s:5s} trial {trial}: {ms:.3f} ms, {1e3 * ms / launches:.2f} us per kernel",
                      flush=True)
    ms = _time(_graph(gemm_only()), a.reps)
    rows.append({"case": "gemm chain", "pdl": False, "trial": 0, "ms": ms, "us_per_kernel": 1e3 * ms / a.n})
    print(f"gemm chain: {ms:.3f} ms, {1e3 * ms / a.n:.2f} us per GEMM", flush=True)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
