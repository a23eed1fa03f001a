"""What every micro-benchmark in kernels/ measures the same way: median times per call inside a
CUDA graph (bench_us) and the device's own ceilings measured in the same run."""

from __future__ import annotations

import argparse
import sys

import torch


def bench_args(doc: str, name: str) -> argparse.Namespace:
    """--out and --no-compile; exits 2 where there is no GPU (the kernels are timed on the device only)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves its compile time)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU (the kernels are benchmarked on the device only)", file=sys.stderr)
        raise SystemExit(2)
    return args


def compile_per_shape(fn):
    """torch.compile(fn, dynamic=False), the peer of our fixed-shape kernels. It recompiles per
    shape, so the recompile cap (default 8) is lifted above the shapes a benchmark times: past it,
    later shapes would silently run eagerly."""
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch.compile(fn, dynamic=False)


GRAPH_CALLS = 20  # back-to-back calls per captured graph in bench_us


def _eager_us(fn) -> float:
    """Median microseconds of fn called one by one: the device's peaks, long calls whose launch
    does not count. (Twenty 1 GiB copies back to back in a graph measured 2770 GB/s on the H200,
    one by one 4250: the peak is the latter.)"""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def bench_us(fn) -> float:
    """Median microseconds per call of fn, as our CUDA graphs run it: GRAPH_CALLS calls captured
    back to back in one graph, whose replays do_bench times (25 ms warm-up, 100 ms of repeats).

    Timing calls one by one, as do_bench alone does, measured the host's launch rather than the
    kernel wherever a kernel is shorter than its Python wrapper: add_layer_norm at [1, 4096, 640]
    read 49.7 us that way and 5.4 us per call in a graph on the H200 (eager add + LayerNorm:
    19.8 and 13.2). In a graph, inputs that fit in L2 stay there between calls, as they do
    between the kernels of a captured step, so a memory-bound kernel can beat the HBM floor.
    A function that cannot be captured is timed call by call."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # lazy set-up (compilation, library workspaces) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
    except Exception:
        torch.cuda.synchronize()
        return _eager_us(fn)
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3 / GRAPH_CALLS


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device copy (read + write: 2 GiB moved): the memory-bound floor's peak."""
    src = torch.randn(2**28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * 2**30 / (_eager_us(lambda: dst.copy_(src)) * 1e-6)


def matmul_rate(dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an 8192^3 torch.mm: the compute-bound floor's peak."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    return 2 * 8192**3 / (_eager_us(lambda: a @ b) * 1e-6)


def time_peers(ours, eager, compiled) -> tuple[float, float, float | None]:
    """Median microseconds of ours(), eager() and compiled() (None when not compiled; it runs once
    first, so the compile is not timed)."""
    compiled_us = None
    if compiled is not None:
        compiled()
        compiled_us = bench_us(compiled)
    return bench_us(ours), bench_us(eager), compiled_us


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
