"""What every micro-benchmark in kernels/ measures the same way: median times (triton's do_bench,
25 ms warm-up, 100 ms of repeats) and the device's own ceilings measured in the same run."""

from __future__ import annotations

import torch


def bench_us(fn) -> float:
    """Median time of fn in microseconds."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device copy (read + write: 2 GiB moved): the memory-bound floor's peak."""
    src = torch.randn(2**28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * 2**30 / (bench_us(lambda: dst.copy_(src)) * 1e-6)


def matmul_rate(dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an 8192^3 torch.mm: the compute-bound floor's peak."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    return 2 * 8192**3 / (bench_us(lambda: a @ b) * 1e-6)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
