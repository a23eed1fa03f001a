"""Argument checks the kernels' wrappers share: errors name the argument, as the serving code's do."""

from __future__ import annotations

import torch


def check_vector(name: str, t, size: int, x: torch.Tensor) -> None:
    """t is None or a floating-point [size] tensor on x's device (an affine weight or bias)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (size,):
        raise ValueError(f"{name} must be None or a tensor of shape [{size}], got {getattr(t, 'shape', type(t))}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
