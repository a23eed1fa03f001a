"""Fused residual add + LayerNorm: h = x + residual, y = LayerNorm(h), in one pass.

Every SDXL transformer block (diffusers BasicTransformerBlock, 70 per UNet step) adds the
self-attention output to the residual stream and normalises the sum for the cross-attention,
then adds the cross-attention output and normalises for the feed-forward. Eagerly that is an add
(read two tensors, write one) and a LayerNorm (read, write): five passes and two launches. Here
one program loads a few rows of both inputs, writes their sum (the new residual stream) and the
normalised sum: four passes, one launch. The H200 profile (benchmarks/results/unet_profile-*)
had the 210 LayerNorms and 210 adds of a 1024 step at 1.23 + 0.63 ms, with launch latency a
large share at 512 and below, where a 1800-kernel step stops scaling with the area.

Rounding follows the eager pair exactly in kind: the sum is rounded to x's dtype (the stored h)
and the statistics are taken from that rounded h in fp32, as LayerNorm on the stored sum would.

Bytes moved: read x, residual; write h, y: 4 * rows * D * itemsize, plus weight/bias once per
program (L2 hits after the first).

add_layer_norm_fp8: the same, with y quantised per row to float8_e4m3fn (one scale per token, as
quantize_per_token computes it) for an FP8 linear that reads it (SDXL's feed-forward
up-projection behind norm3). It writes D bytes + 4 per row instead of 2D, and spares that linear
its own quantisation pass (a read of y and a write: 3.2 us per call in a 1024 step on an H200).
y is quantised from fp32, without rounding to x's dtype first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtdiff_kernels._checks import check_eps, check_vector
from rtdiff_kernels._launch import sm_count, triton_runs
from rtdiff_kernels.ada_layer_norm import _layer_norm_rows
from rtdiff_kernels.fp8_quant import _store_fp8_rows, quantize_per_token_reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Launch geometry. Swept on an SDXL step's own calls (benchmarks/tune_pointwise.py, H200,
# results/tune_pointwise-2026-11-24-*): no setting of 27 beat these by more than 3% at both sizes.
_TILE_ELEMS = 4096  # rows * BLOCK_D per program: 2 rows of SDXL's widest (1280 -> 2048 lanes)
_MIN_PROGRAMS_PER_SM = 2  # fewer rows per program rather than idle SMs on short inputs
_ELEMS_PER_WARP = 512  # warps per program = tile lanes / this (1 to 16)


@triton.jit
def _add_layer_norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, h_ptr, y_ptr, scale_ptr,
    M, D, eps,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, FP8: tl.constexpr,
):
    # FP8: y_ptr is float8_e4m3fn and scale_ptr [M] float32 receives each row's scale.
    # All four tensors are contiguous [M, D]: row i starts at i * D.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = (x + r).to(h_ptr.dtype.element_ty)  # [ROWS, BLOCK_D]: the residual stream, rounded as stored
    tl.store(h_ptr + offs, h, mask=mask)

    y = _layer_norm_rows(h.to(tl.float32), mask, cols, col_ok, D, eps, w_ptr, b_ptr, HAS_W, HAS_B)
    if FP8:
        _store_fp8_rows(tl.where(mask, y, 0.0), mask, rows < M, y_ptr + offs, scale_ptr + rows)
    else:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x, residual, weight, bias, eps):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., D], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
        raise ValueError(f"residual must be a tensor of x's shape {tuple(x.shape)}, got {getattr(residual, 'shape', type(residual))}")
    if residual.dtype != x.dtype:
        raise ValueError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    check_vector("weight", weight, x.shape[-1], x)
    check_vector("bias", bias, x.shape[-1], x)
    check_eps(eps)


def _launch(x, residual, weight, bias, eps, y, scale) -> torch.Tensor:
    """Runs the kernel into y (and scale, for FP8); returns h."""
    d = x.shape[-1]
    h = torch.empty_like(x, memory_format=torch.contiguous_format)
    m = x.numel() // d if d else 0
    if m == 0 or d == 0:
        return h
    x, residual = x.contiguous(), residual.contiguous()
    block_d = triton.next_power_of_2(d)
    rows = min(max(1, _TILE_ELEMS // block_d), triton.next_power_of_2(m))
    sms = sm_count(x)
    while rows > 1 and triton.cdiv(m, rows) < _MIN_PROGRAMS_PER_SM * sms:
        rows //= 2
    _add_layer_norm_kernel[(triton.cdiv(m, rows),)](
        x, residual, weight if weight is not None else x, bias if bias is not None else x, h, y,
        scale if scale is not None else x, m, d, float(eps),
        ROWS=rows, BLOCK_D=block_d, HAS_W=weight is not None, HAS_B=bias is not None, FP8=scale is not None,
        num_warps=min(16, max(1, rows * block_d // _ELEMS_PER_WARP)),
    )
    return h


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + residual and y = layer_norm(h over the last dim, weight, bias, eps).

    x, residual: [..., D] of one float dtype (non-contiguous inputs are copied first); weight,
    bias: [D] or None. Both outputs are contiguous, of x's shape and dtype. Off CUDA (and
    outside Triton's interpreter) this runs the PyTorch reference.
    """
    _check(x, residual, weight, bias, eps)
    if not triton_runs(x):
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return _launch(x, residual, weight, bias, eps, y, None), y


def add_layer_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, q, scale): h = x + residual as add_layer_norm returns it; the LayerNorm of h as rows
    [M, D] (M = h.numel() // D) quantised per row, q float8_e4m3fn [M, D] and scale float32
    [M, 1] (amax / 448, at least 1e-12). Off CUDA (and outside Triton's interpreter) this runs
    the PyTorch reference."""
    _check(x, residual, weight, bias, eps)
    if not triton_runs(x):
        return add_layer_norm_fp8_reference(x, residual, weight, bias, eps)
    d = x.shape[-1]
    m = x.numel() // d if d else 0
    q = torch.empty((m, d), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    return _launch(x, residual, weight, bias, eps, q, scale), q, scale


def add_layer_norm_fp8_reference(x, residual, weight, bias, eps):
    """The residual add rounded to x's dtype, an fp32 LayerNorm of it, quantize_per_token_reference."""
    h = (x + residual).contiguous()
    d = h.shape[-1]
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = F.layer_norm(h.float(), (d,), w, b, eps).reshape(-1, d)
    return (h, *quantize_per_token_reference(y))


def add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What diffusers' BasicTransformerBlock does: the residual add, then nn.LayerNorm on the sum."""
    h = x + residual
    w = weight.to(x.dtype) if weight is not None else None
    b = bias.to(x.dtype) if bias is not None else None
    return h.contiguous(), F.layer_norm(h, (h.shape[-1],), w, b, eps).contiguous()
