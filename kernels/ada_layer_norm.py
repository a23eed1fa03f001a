"""Fused adaLN modulation: LayerNorm(x) * (1 + scale) + shift in one pass over x.

Flux's transformer blocks (diffusers AdaLayerNormZero, AdaLayerNormZeroSingle,
AdaLayerNormContinuous) normalise every token with a LayerNorm (elementwise_affine=False,
eps=1e-6, or with weight/bias for the continuous variant) and then modulate it with a per-sample
shift and scale that are chunks of one [B, k*D] projection. Eagerly that is a LayerNorm kernel
(read x, write), then `1 + scale`, a multiply and an add (each reading and writing [B, L, D]):
about four passes over the activations. Here one program normalises a few rows in registers with
fp32 statistics (two-pass over the register-resident row: mean, then the centred variance) and
writes the modulated result once, in x's dtype.

Bytes moved: read x + write y (2 * B*L*D*itemsize) + shift/scale once per program (B*D each, L2
hits after the first program of a sample). For Flux at 1024x1024 (x [1, 4096, 3072] bf16) that is
~50 MB: the floor is that traffic at the device's copy bandwidth.

The same file holds the gated residual update around it. A Flux block adds each branch's output
to the residual stream through a per-sample gate, `x + gate * y`, and its double blocks then
normalise and modulate the sum for the feed-forward. Eagerly that is a multiply, an add, a
LayerNorm, `1 + scale`, a multiply and an add: six passes. `gated_residual` is one (read x and y,
write the sum); `gated_residual_layer_norm_modulate` writes the sum and its modulated norm from
the same registers (read 2, write 2 instead of about 12 tensor passes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtdiff_kernels._checks import check_eps, check_vector
from rtdiff_kernels._launch import sm_count, triton_runs

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE_ELEMS = 8192  # rows * BLOCK_D per program: 2 Flux rows (BLOCK_D 4096) at 8 warps
_MIN_PROGRAMS_PER_SM = 2  # fewer rows per program rather than idle SMs on short sequences


@triton.jit
def _layer_norm_rows(x, mask, cols, col_ok, D, eps, w_ptr, b_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """LayerNorm of each row of a register tile x [ROWS, BLOCK_D] (fp32; lanes outside mask are
    ignored): two passes over the tile, the mean and then the centred variance, then the affine."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)  # padded lanes must not add to the variance
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y *= tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _ln_modulate_kernel(
    x_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, y_ptr,
    L, D, eps,
    sx_b, sx_l,  # x's last dim has unit stride
    s_shift_b, s_shift_d, s_scale_b, s_scale_d,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    # grid (row blocks, B): every row of a program shares one sample's shift and scale.
    bidx = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < L)[:, None] & col_ok[None, :]

    x_offs = bidx.to(tl.int64) * sx_b + rows.to(tl.int64)[:, None] * sx_l + cols[None, :]
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)  # [ROWS, BLOCK_D]
    y = _layer_norm_rows(x, mask, cols, col_ok, D, eps, w_ptr, b_ptr, HAS_W, HAS_B)

    shift = tl.load(shift_ptr + bidx.to(tl.int64) * s_shift_b + cols * s_shift_d, mask=col_ok, other=0.0)
    scale = tl.load(scale_ptr + bidx.to(tl.int64) * s_scale_b + cols * s_scale_d, mask=col_ok, other=0.0)
    y = y * (1.0 + scale.to(tl.float32))[None, :] + shift.to(tl.float32)[None, :]

    # Output is contiguous [B, L, D].
    y_offs = (bidx.to(tl.int64) * L + rows.to(tl.int64))[:, None] * D + cols[None, :]
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, out_ptr, norm_ptr,
    L, D, eps,
    sx_b, sx_l, sy_b, sy_l,  # x's and y's last dims have unit stride
    s_gate_b, s_gate_d, s_shift_b, s_shift_d, s_scale_b, s_scale_d,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    # grid (row blocks, B), as _ln_modulate_kernel: one sample's gate (and shift, scale) per program.
    bidx = tl.program_id(1)
    b64 = bidx.to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < L)[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]

    x = tl.load(x_ptr + b64 * sx_b + r64 * sx_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b64 * sy_b + r64 * sy_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b64 * s_gate_b + cols * s_gate_d, mask=col_ok, other=0.0).to(tl.float32)
    s = x + gate[None, :] * y  # [ROWS, BLOCK_D], rounded once at the store

    o_offs = (b64 * L + r64) * D + cols[None, :]  # both outputs are contiguous [B, L, D]
    tl.store(out_ptr + o_offs, s.to(out_ptr.dtype.element_ty), mask=mask)
    if NORM:
        n = _layer_norm_rows(s, mask, cols, col_ok, D, eps, w_ptr, b_ptr, HAS_W, HAS_B)
        shift = tl.load(shift_ptr + b64 * s_shift_b + cols * s_shift_d, mask=col_ok, other=0.0)
        scale = tl.load(scale_ptr + b64 * s_scale_b + cols * s_scale_d, mask=col_ok, other=0.0)
        n = n * (1.0 + scale.to(tl.float32))[None, :] + shift.to(tl.float32)[None, :]
        tl.store(norm_ptr + o_offs, n.to(norm_ptr.dtype.element_ty), mask=mask)


def _rows_per_program(bsz: int, seq: int, block_d: int, x: torch.Tensor) -> int:
    rows = min(max(1, _TILE_ELEMS // block_d), triton.next_power_of_2(seq))
    sms = sm_count(x)
    while rows > 1 and bsz * triton.cdiv(seq, rows) < _MIN_PROGRAMS_PER_SM * sms:
        rows //= 2
    return rows


def _check(x, shift, scale, eps, weight, bias):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor [B, L, D], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    bsz, _, d = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (bsz, d):
            raise ValueError(f"{name} must be a tensor of shape [B, D] = [{bsz}, {d}], got {getattr(t, 'shape', type(t))}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    check_vector("weight", weight, d, x)
    check_vector("bias", bias, d, x)
    check_eps(eps)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """layer_norm(x over D, eps, weight, bias) * (1 + scale[:, None, :]) + shift[:, None, :].

    x: [B, L, D] fp32/fp16/bf16 (a last dim that is not unit-stride is copied first).
    shift, scale: [B, D], any float dtype and strides (e.g. chunks of a [B, 6D] projection).
    weight, bias: [D] or None. Statistics and arithmetic in fp32; returns a contiguous [B, L, D]
    tensor of x.dtype. Off CUDA (and outside Triton's interpreter) this runs the PyTorch reference.
    """
    _check(x, shift, scale, eps, weight, bias)
    if not triton_runs(x):
        return layer_norm_modulate_reference(x, shift, scale, eps, weight, bias)
    bsz, seq, d = x.shape
    y = torch.empty((bsz, seq, d), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    if d > 1 and x.stride(2) != 1:
        x = x.contiguous()
    block_d = triton.next_power_of_2(d)
    rows = _rows_per_program(bsz, seq, block_d, x)
    grid = (triton.cdiv(seq, rows), bsz)
    _ln_modulate_kernel[grid](
        x, shift, scale, weight if weight is not None else x, bias if bias is not None else x, y,
        seq, d, float(eps),
        x.stride(0), x.stride(1),
        shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
        ROWS=rows, BLOCK_D=block_d, HAS_W=weight is not None, HAS_B=bias is not None,
        num_warps=min(16, max(1, rows * block_d // 1024)),
    )
    return y


def layer_norm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What diffusers' AdaLayerNorm* do: LayerNorm over D, then * (1 + scale) + shift per sample,
    in x's dtype (weight/bias cast to it). Returns a contiguous [B, L, D] tensor of x.dtype."""
    w = weight.to(x.dtype) if weight is not None else None
    b = bias.to(x.dtype) if bias is not None else None
    y = F.layer_norm(x, (x.shape[-1],), w, b, eps)
    y = y * (1 + scale.to(x.dtype)[:, None, :]) + shift.to(x.dtype)[:, None, :]
    return y.contiguous()


def _check_gated(x, y, gate):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor [B, L, D], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"y must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"{getattr(y, 'shape', type(y))}, {getattr(y, 'dtype', '')}, {getattr(y, 'device', '')}")
    bsz, _, d = x.shape
    if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (bsz, d) or not gate.is_floating_point():
        raise ValueError(f"gate must be a floating-point tensor of shape [B, D] = [{bsz}, {d}], got "
                         f"{getattr(gate, 'shape', type(gate))}")
    if gate.device != x.device:
        raise ValueError(f"gate is on {gate.device} but x is on {x.device}")


def _gated(x, y, gate, norm):
    """Launches _gated_residual_kernel; norm is (shift, scale, eps, weight, bias) or None."""
    bsz, seq, d = x.shape
    out = torch.empty((bsz, seq, d), device=x.device, dtype=x.dtype)
    normed = torch.empty_like(out) if norm is not None else None
    if out.numel() == 0:
        return out, normed
    if d > 1 and x.stride(2) != 1:
        x = x.contiguous()
    if d > 1 and y.stride(2) != 1:
        y = y.contiguous()
    shift, scale, eps, weight, bias = norm if norm is not None else (gate, gate, 0.0, None, None)
    block_d = triton.next_power_of_2(d)
    rows = _rows_per_program(bsz, seq, block_d, x)
    _gated_residual_kernel[(triton.cdiv(seq, rows), bsz)](
        x, y, gate, shift, scale, weight if weight is not None else x, bias if bias is not None else x,
        out, normed if normed is not None else out,
        seq, d, float(eps),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        gate.stride(0), gate.stride(1), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
        ROWS=rows, BLOCK_D=block_d, NORM=norm is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        num_warps=min(16, max(1, rows * block_d // 1024)),
    )
    return out, normed


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate[:, None, :] * y: a branch's output y joining the residual stream x through its
    per-sample gate (a chunk of an adaLN projection).

    x, y: [B, L, D] of one float dtype (any batch and token strides; a last dim that is not
    unit-stride is copied first). gate: [B, D], any float dtype and strides. Arithmetic in fp32,
    rounded once; returns a contiguous [B, L, D] tensor of x.dtype. Off CUDA (and outside
    Triton's interpreter) this runs the PyTorch reference.
    """
    _check_gated(x, y, gate)
    if not triton_runs(x):
        return gated_residual_reference(x, y, gate)
    return _gated(x, y, gate, None)[0]


def gated_residual_layer_norm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                       scale: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
                                       bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm_modulate(s, shift, scale, eps, weight, bias)) with s = x + gate * y: a Flux
    double block's attention output joining the residual stream, and the feed-forward's
    modulated input, from one read of each.

    Shapes and dtypes as gated_residual and layer_norm_modulate; the norm is taken of s before
    its rounding to x.dtype. Returns two contiguous [B, L, D] tensors of x.dtype.
    """
    _check_gated(x, y, gate)
    _check(x, shift, scale, eps, weight, bias)
    if not triton_runs(x):
        return gated_residual_layer_norm_modulate_reference(x, y, gate, shift, scale, eps, weight, bias)
    return _gated(x, y, gate, (shift, scale, eps, weight, bias))


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """What diffusers' Flux blocks compute: `x + gate.unsqueeze(1) * y` in x's dtype."""
    return (x + gate.to(x.dtype)[:, None, :] * y).contiguous()


def gated_residual_layer_norm_modulate_reference(x, y, gate, shift, scale, eps, weight=None, bias=None):
    """A Flux double block's `x + gate * y`, then norm2 and `* (1 + scale) + shift`, in x's dtype."""
    s = gated_residual_reference(x, y, gate)
    return s, layer_norm_modulate_reference(s, shift, scale, eps, weight, bias)
