"""Nearest-neighbour upsampling by an integer factor: a tiny VAE decoder's nn.Upsample and a UNet's
Upsample2D, each in front of a convolution.

The op is a copy that writes every input value S*S times: bytes moved = numel * (1 + S^2) *
itemsize. PyTorch's channels-last kernel (upsample_nearest2d_nhwc_out_frame) took 0.55 ms for the
tiny VAE decoder's three upsamplings at 1024x1024 on an H200 (the last one alone writes 134 MB),
far from that floor. Here each program writes one [BLOCK_P output pixels, BLOCK_C channels] tile
whose rows are the unit-stride axis of the layout (channels in channels-last, pixels in NCHW), so
stores are full vectors; an input value is read by the S*S programs that need it, mostly from L2.

Layouts: any 4-D strides; the output takes x's memory format (channels-last or contiguous).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtdiff_kernels._launch import triton_runs

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE_ELEMS = 4096  # elements per program: 16 per thread at 8 warps
_NUM_WARPS = 8


@triton.jit
def _upsample_nearest_kernel(
    x_ptr, y_ptr,  # x: [N, C, H, W], y: [N, C, H * S, W * S], both by strides
    P, C, H_OUT, W_OUT,  # P = N * H_OUT * W_OUT output pixels
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
    S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, C_FASTEST: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ow = offs_p % W_OUT
    rest = offs_p // W_OUT
    oh = rest % H_OUT
    n = (rest // H_OUT).to(tl.int64)
    src = n * sx_n + (oh // S).to(tl.int64) * sx_h + (ow // S).to(tl.int64) * sx_w  # [BLOCK_P]
    dst = n * sy_n + oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w
    c = offs_c.to(tl.int64)
    if C_FASTEST:  # [BLOCK_P, BLOCK_C]: channels contiguous
        mask = (offs_p < P)[:, None] & (offs_c < C)[None, :]
        v = tl.load(x_ptr + src[:, None] + c[None, :] * sx_c, mask=mask)
        tl.store(y_ptr + dst[:, None] + c[None, :] * sy_c, v, mask=mask)
    else:  # [BLOCK_C, BLOCK_P]: pixels contiguous
        mask = (offs_c < C)[:, None] & (offs_p < P)[None, :]
        v = tl.load(x_ptr + src[None, :] + c[:, None] * sx_c, mask=mask)
        tl.store(y_ptr + dst[None, :] + c[:, None] * sy_c, v, mask=mask)


def _channels_last(x: torch.Tensor) -> bool:
    return x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def upsample_nearest(x: torch.Tensor, scale: int) -> torch.Tensor:
    """F.interpolate(x, scale_factor=scale, mode="nearest") for an integer scale >= 1.

    x: [N, C, H, W] fp32/fp16/bf16, any strides. Returns [N, C, H*scale, W*scale] in x's dtype, in
    channels-last when x is channels-last, else contiguous; the values are x's, copied exactly.
    Off CUDA (and outside Triton's interpreter) this runs the PyTorch reference.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D [N, C, H, W] tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if not triton_runs(x):
        return upsample_nearest_reference(x, scale)
    n, c, h, w = x.shape
    c_fastest = _channels_last(x)
    y = torch.empty((n, c, h * scale, w * scale), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last if c_fastest else torch.contiguous_format)
    if y.numel() == 0:
        return y
    p = n * h * scale * w * scale
    block_c = min(triton.next_power_of_2(c), 128 if c_fastest else 16)
    block_p = max(1, min(_TILE_ELEMS // block_c, triton.next_power_of_2(p)))
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    _upsample_nearest_kernel[grid](x, y, p, c, h * scale, w * scale, *x.stride(), *(y.stride()[i] for i in range(4)),
                                   S=scale, BLOCK_P=block_p, BLOCK_C=block_c, C_FASTEST=c_fastest,
                                   num_warps=_NUM_WARPS)
    return y


def upsample_nearest_reference(x: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=scale, mode="nearest")
