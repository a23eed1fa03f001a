"""What the kernels' wrappers ask before a launch: whether Triton can run on a tensor's device, and
how many SMs a grid should fill."""

from __future__ import annotations

import functools
import os

import torch


def triton_runs(x: torch.Tensor) -> bool:
    """A CUDA tensor, or any tensor under Triton's interpreter (TRITON_INTERPRET=1, the CPU tests)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(x: torch.Tensor) -> int:
    """Streaming multiprocessors of x's GPU; 4 in the interpreter, where grids are only checked."""
    if not x.is_cuda:
        return 4
    return _sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
