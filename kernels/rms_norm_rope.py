"""Fused RMSNorm + rotary embedding: the QK-norm step of Flux attention in one pass.

diffusers' Flux attention normalises each head of q and k with RMSNorm (over head_dim D) and then
applies the rotary embedding. Eagerly that is ~10 elementwise/reduction kernels over [B, L, H, D],
each reading and writing the whole tensor (some in fp32, twice the bytes), plus a copy that makes
the projection's strided view contiguous. Here one program loads a block of heads of one token,
reduces over D in registers, scales, rotates the interleaved pairs (x[2i], x[2i+1]) and writes the
result once.

Bytes moved: read x (B*L*H*D elements) + write out (same) + read cos/sin once per token
(2*L*D*4 bytes, shared by B and the heads, mostly L2 hits) + the weight. For Flux
(x [1, 4608, 24, 128] bf16) that is ~56.6 MB of x traffic + 4.7 MB of rotary table: the floor is
that traffic at the device's copy bandwidth.

Numerics follow diffusers 0.42 op for op (RMSNorm then apply_rotary_emb(use_real=True,
use_real_unbind_dim=-1, sequence_dim=1)), including its intermediate roundings:
  variance in fp32; x * rsqrt(variance + eps) in fp32; if the weight is fp16/bf16 the normalised
  value is rounded to the weight's dtype and multiplied in that dtype (rounded again); without a
  weight it is rounded to x's dtype; with an fp32 weight it stays fp32. The rotary step then works
  in fp32 from that value and the result is cast to x.dtype.
The one deliberate difference: diffusers returns the norm's dtype (the weight's dtype, e.g. fp32
for an fp32 weight with bf16 activations); we always return x.dtype, which is what the attention
that follows consumes (the values are the same up to that final rounding).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _round(y, DTYPE: tl.constexpr, BY_HAND: tl.constexpr):
    """fp32 -> DTYPE -> fp32, rounding to nearest even. Triton's interpreter truncates fp32->bf16
    casts, so there (BY_HAND, CPU tests only) bf16 rounding is done on the bits; the result is
    exactly representable, so a later truncating cast of it is exact."""
    if BY_HAND:
        bits = y.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return y.to(DTYPE).to(tl.float32)


@triton.jit
def _rms_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    L, H,
    stride_xb, stride_xl, stride_xh,
    stride_ob, stride_ol,  # out's heads and head dim are packed (strides D and 1)
    stride_cos, stride_sin,
    eps,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    ROUND_NORM: tl.constexpr,
    NORM_DTYPE: tl.constexpr,
    NORM_BY_HAND: tl.constexpr,
    OUT_BY_HAND: tl.constexpr,
):
    token = tl.program_id(0)  # b * L + l
    b = token // L
    l = token % L
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (heads < H)[:, None] & col_ok[None, :]

    # int64: B*L*H*D can pass 2**31 for long videos / big batches.
    x_base = b.to(tl.int64) * stride_xb + l.to(tl.int64) * stride_xl
    x_offs = x_base + heads.to(tl.int64)[:, None] * stride_xh + cols[None, :]
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_D]

    # Padded columns load as 0 so they do not disturb the sum; divide by the true D.
    variance = tl.sum(x * x, axis=1) / D
    y = x * tl.math.rsqrt(variance + eps)[:, None]
    if ROUND_NORM:  # diffusers casts to the weight's (or x's) dtype here
        y = _round(y, NORM_DTYPE, NORM_BY_HAND)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
        if ROUND_NORM:  # ... and multiplies in that dtype
            y = _round(y, NORM_DTYPE, NORM_BY_HAND)

    if HAS_ROPE:
        # One rotary row per token, shared by every head of the block.
        c = tl.load(cos_ptr + l.to(tl.int64) * stride_cos + cols, mask=col_ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + l.to(tl.int64) * stride_sin + cols, mask=col_ok, other=0.0).to(tl.float32)
        # Pairs are interleaved (x[2i], x[2i+1]); the rotated vector is (-x[2i+1], x[2i]).
        even, odd = tl.split(tl.reshape(y, (BLOCK_H, BLOCK_D // 2, 2)))
        rotated = tl.reshape(tl.join(-odd, even), (BLOCK_H, BLOCK_D))
        y = y * c[None, :] + rotated * s[None, :]

    if OUT_BY_HAND:
        y = _round(y, tl.bfloat16, True)
    out_offs = b.to(tl.int64) * stride_ob + l.to(tl.int64) * stride_ol + heads.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _heads_per_program(h: int, block_d: int) -> int:
    """A power-of-two head block of up to ~2K elements, shrunk while the padding of the last block
    would waste more than a quarter of the lanes (H = 24 -> 8, H = 12 -> 4, H = 3 -> 1)."""
    cap = max(1, 2048 // block_d)
    p = min(cap, triton.next_power_of_2(h))
    while p > 1 and (triton.cdiv(h, p) * p - h) * 4 > h:
        p //= 2
    return p


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_ok(x: torch.Tensor) -> bool:
    return x.is_cuda or _interpreting()


def _check(x, weight, eps, cos, sin):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [B, L, H, D], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim (stride 1), got strides {x.stride()}")
    d = x.shape[-1]
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (d,):
            got = getattr(weight, "shape", type(weight))
            raise ValueError(f"weight must be None or a tensor of shape [{d}], got {got}")
        if weight.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be given or both be None")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (x.shape[1], d):
                raise ValueError(f"{name} must be [L, D] = [{x.shape[1]}, {d}], got {getattr(t, 'shape', type(t))}")
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if d % 2:
            raise ValueError(f"x: the rotary embedding needs an even head dim D, got {d}")


def _norm_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    """The dtype diffusers' RMSNorm leaves the normalised value in before the rotary step."""
    if weight is None:
        return x.dtype
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                  cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim, then (if cos/sin are given) interleaved-pair rotary.

    x: [B, L, H, D] fp32/fp16/bf16, last dim contiguous (any strides for B, L, H: typically the view
    `linear_out.unflatten(-1, (-1, D))`). weight: [D] or None. cos, sin: [L, D] (fp32), or both None.
    Returns a contiguous [B, L, H, D] tensor of x.dtype, or writes out and returns it: a [B, L, H, D]
    tensor of x.dtype whose heads and head dim are packed, any batch and token strides (e.g. the
    image rows of a joint text + image sequence, so that no concatenation follows). Off CUDA (and
    outside Triton's interpreter) this runs the PyTorch reference.
    """
    _check(x, weight, eps, cos, sin)
    bsz, seq, heads, d = x.shape
    if out is not None:
        if (not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype
                or out.device != x.device):
            raise ValueError(f"out must be a {x.dtype} tensor of shape {list(x.shape)} on {x.device}, got "
                             f"{getattr(out, 'shape', type(out))}, {getattr(out, 'dtype', '')}, {getattr(out, 'device', '')}")
        if out.numel() and (out.stride(3) != 1 or (heads > 1 and out.stride(2) != d)):
            raise ValueError(f"out must have packed heads (strides [.., .., {d}, 1]), got strides {out.stride()}")
    if not _triton_ok(x):
        y = rms_norm_rope_reference(x, weight, eps, cos, sin)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty((bsz, seq, heads, d), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    has_rope = cos is not None
    if has_rope:
        # The kernel walks a row with unit stride; tables are small, so copy if they are not.
        cos = cos if cos.stride(-1) == 1 else cos.contiguous()
        sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    norm_dtype = _norm_dtype(x, weight)
    block_d = triton.next_power_of_2(max(d, 2))
    block_h = _heads_per_program(heads, block_d)
    grid = (bsz * seq, triton.cdiv(heads, block_h))
    _rms_norm_rope_kernel[grid](
        x, weight if weight is not None else x, cos if has_rope else x, sin if has_rope else x, out,
        seq, heads,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1),
        cos.stride(0) if has_rope else 0, sin.stride(0) if has_rope else 0,
        float(eps),
        D=d, BLOCK_H=block_h, BLOCK_D=block_d,
        HAS_WEIGHT=weight is not None, HAS_ROPE=has_rope,
        ROUND_NORM=norm_dtype != torch.float32, NORM_DTYPE=_TL_DTYPE[norm_dtype],
        NORM_BY_HAND=_interpreting() and norm_dtype == torch.bfloat16,
        OUT_BY_HAND=_interpreting() and x.dtype == torch.bfloat16,
        num_warps=4 if block_h * block_d <= 2048 else 8,
    )
    return out


def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                            cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch, step for step what diffusers' RMSNorm + apply_rotary_emb(sequence_dim=1) do,
    returned as a contiguous tensor of x.dtype. x: [B, L, H, D]; weight: [D] or None; cos, sin: [L, D]."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    y = x.float() * torch.rsqrt(variance + eps)
    if weight is None:
        y = y.to(x.dtype)
    else:
        if weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(weight.dtype)
        y = y * weight
    if cos is not None:
        real, imag = y.unflatten(-1, (-1, 2)).unbind(-1)  # pairs (y[2i], y[2i+1])
        rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
        # cos/sin [L, D] broadcast over batch and heads: [1, L, 1, D]
        y = y.float() * cos[None, :, None, :].float() + rotated.float() * sin[None, :, None, :].float()
    return y.to(x.dtype).contiguous()
