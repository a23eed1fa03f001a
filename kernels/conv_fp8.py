"""A 3x3 convolution (stride 1, padding 1) on float8 inputs: implicit GEMM over channels-last pixels.

Not on the serving path yet. It answers one question first (benchmarks/NOTES.md, "FP8
convolutions, counted first"): can SDXL's convolutions, 2.75 ms of the FP8 1024 step in cuDNN's
bf16 kernels, run faster in float8? kernels/bench_conv_fp8.py times it against cuDNN.

Shapes: x [N, H, W, C] float8_e4m3fn (channels-last pixels, each pixel a row of C) with one
scale per pixel, x_scale [N * H * W] float32, as quantize_per_token gives for x viewed as rows
[N * H * W, C] (and as a GroupNorm+SiLU kernel could write); w [9 * C, K] float8_e4m3fn, tap-major
(row tap * C + c holds w[:, c, tap // 3, tap % 3]) with one scale per output channel,
w_scale [K]; bias [K] or None. Output y [N, H, W, K] in bf16/fp16/fp32.

Why per-pixel scales cost more than a GEMM's per-token ones: an output pixel sums nine input
pixels, each with its own scale, so the scale cannot leave the sum. The kernel keeps a second
accumulator: each tap's product over C lands in it, and it is added to the output scaled by that
tap's input pixels' scales. A per-tensor scale would avoid that, but needs the whole tensor's
amax before the producer writes (a second pass or a stale scale).

Each program computes BLOCK_M consecutive output pixels (row-major over n, h, w) by BLOCK_N
output channels; for each tap it loads the BLOCK_M shifted input pixels (zeros past the image's
edges) BLOCK_K channels at a time.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rtdiff_kernels.fp8_quant import quantize_per_token

# Triton's interpreter (the CPU tests) has no float8 matmul: it multiplies the float8 tiles
# upcast to fp32, which is exact (the products of two e4m3 values fit fp32) and sums in fp32.
_UPCAST = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _conv3x3_fp8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, H, W, C, K,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PER_PIXEL: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pixels = N * H * W
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels [BLOCK_M]
    p_ok = p < pixels
    n = p // (H * W)
    h = (p // W) % H
    w = p % W
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels [BLOCK_N]
    col_ok = cols < K
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in range(9):
        hh = h + (tap // 3 - 1)
        ww = w + (tap % 3 - 1)
        ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        src = (n * H + hh) * W + ww  # the input pixel this tap reads, per output pixel
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) if PER_PIXEL else acc
        for k0 in range(0, C, BLOCK_K):
            kk = k0 + ks
            a = tl.load(x_ptr + src[:, None] * C + kk[None, :], mask=ok[:, None] & (kk[None, :] < C), other=0.0)
            b = tl.load(w_ptr + (tap * C + kk)[:, None] * K + cols[None, :],
                        mask=(kk[:, None] < C) & col_ok[None, :], other=0.0)
            if _UPCAST:
                part += tl.dot(a.to(tl.float32), b.to(tl.float32))
            else:
                part = tl.dot(a, b, part)
        if PER_PIXEL:
            s = tl.load(xs_ptr + src, mask=ok, other=0.0)
            acc += part * s[:, None]
        else:
            acc = part
    out = acc * tl.load(ws_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if not PER_PIXEL:  # one scale for the whole tensor
        out *= tl.load(xs_ptr)
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + p[:, None] * K + cols[None, :], out.to(y_ptr.dtype.element_ty),
             mask=p_ok[:, None] & col_ok[None, :])


DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv weight [K, C, 3, 3] as the kernel takes it: w [9 * C, K] float8_e4m3fn, tap-major,
    and w_scale [K] float32 (each output channel's amax / 448)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [K, C, 3, 3], got {tuple(weight.shape)}")
    k_out = weight.shape[0]
    rows = weight.permute(0, 2, 3, 1).reshape(k_out, -1).float()  # [K, 9 * C], row k: (tap, c) order
    q, scale = quantize_per_token(rows)
    return q.t().contiguous(), scale.view(-1)


def conv3x3_fp8(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                config: dict | None = None) -> torch.Tensor:
    """y [N, H, W, K] = conv2d(x * x_scale, w * w_scale, bias, padding=1), computed in float8 with
    fp32 sums (shapes in the module docstring)."""
    if x.dim() != 4 or x.dtype != torch.float8_e4m3fn or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float8_e4m3fn [N, H, W, C], got {x.dtype} {tuple(x.shape)}")
    n, h, wd, c = x.shape
    if x_scale.dtype != torch.float32 or x_scale.numel() not in (1, n * h * wd):
        raise ValueError(f"x_scale must be float32 with one value per pixel ({n * h * wd}) or one in all, "
                         f"got {x_scale.dtype} {tuple(x_scale.shape)}")
    if w.dim() != 2 or w.dtype != torch.float8_e4m3fn or w.shape[0] != 9 * c or not w.is_contiguous():
        raise ValueError(f"w must be a contiguous float8_e4m3fn [9 * {c}, K], got {w.dtype} {tuple(w.shape)}")
    k = w.shape[1]
    if w_scale.dtype != torch.float32 or w_scale.numel() != k:
        raise ValueError(f"w_scale must be float32 [{k}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.numel() != k):
        raise ValueError(f"bias must be [{k}], got {tuple(bias.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if n * h * wd * max(c, k) * 9 >= 2**31:
        raise ValueError("x is too large for the kernel's 32-bit offsets")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    y = torch.empty(n, h, wd, k, device=x.device, dtype=out_dtype)
    if y.numel() == 0:
        return y
    grid = (triton.cdiv(n * h * wd, cfg["BLOCK_M"]), triton.cdiv(k, cfg["BLOCK_N"]))
    _conv3x3_fp8_kernel[grid](x, x_scale.contiguous(), w, w_scale.contiguous(), bias if bias is not None else w_scale,
                              y, n, h, wd, c, k, HAS_BIAS=bias is not None, PER_PIXEL=x_scale.numel() != 1,
                              BLOCK_M=cfg["BLOCK_M"],
                              BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"])
    return y


def conv3x3_fp8_reference(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same convolution in fp32 on the dequantised tensors (PyTorch's conv2d): [N, H, W, K]."""
    n, h, wd, c = x.shape
    k = w.shape[1]
    xf = x.float() * (x_scale.view(n, h, wd, 1) if x_scale.numel() != 1 else x_scale.view(1, 1, 1, 1))
    wf = (w.float() * w_scale.view(1, k)).t().reshape(k, 3, 3, c).permute(0, 3, 1, 2)  # [K, C, 3, 3]
    y = torch.nn.functional.conv2d(xf.permute(0, 3, 1, 2), wf, None if bias is None else bias.float(), padding=1)
    return y.permute(0, 2, 3, 1)
