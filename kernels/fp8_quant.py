"""Per-token (row-wise) FP8 quantisation of activations, the input side of an FP8 linear.

Each row of x [M, K] gets its own scale, amax(|row|) / 448 (448 is float8_e4m3fn's largest
finite value), so one outlier token does not flatten the resolution of the others. Eagerly this
is six kernels (upcast, abs, amax, multiply, clamp, cast) moving about 41 bytes per element for a
bf16 input; the floor is one read of x and one write of the fp8 copy: 3 bytes per element for
bf16/fp16 (5 for fp32) plus 4 bytes per row for the scale. The kernel keeps a row (or a few short
rows) in registers between the amax and the cast, so it reads x once; rows longer than
`max_block_k` are read twice (the second read mostly hits L2).

Rounding: under Triton's interpreter (the CPU tests) the kernels round to the e4m3 grid themselves
(round to nearest, ties to even, in fp32 integer arithmetic) and only then cast, so the cast is
exact: the interpreter casts float32 -> float8e4nv wrongly (ties away from zero, subnormals
truncated, and a mantissa carry into an odd exponent lost: 1.96 becomes 1.0), and this way the CPU
tests check the kernels' arithmetic byte for byte against torch's own cast. On the GPU the hardware
cast (cvt.rn.satfinite, sm_89+) rounds to nearest even in one instruction per pair, where the
integer rounding costs about a dozen per element: free in this memory-bound kernel, but a third of
the instructions of the producers bound by their arithmetic (activations.gelu_tanh_fp8,
geglu_fp8). The GPU tests hold the hardware cast to the same reference. Setting
RTDIFF_E4M3_SOFTWARE_ROUNDING=1 before import rounds in software on the GPU too (the A/B of
benchmarks/device_run.sh e4m3-ab). The two per-row divisions use div_rn because Triton's `/` on
fp32 is the approximate one on CUDA, and the scale must match the reference bit for bit.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
SCALE_FLOOR = 1e-12  # an all-zero row gets this scale instead of a division by zero
_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Rounding in software (see the module docstring): in the interpreter always, on the GPU on request.
_SOFTWARE_E4M3 = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1"
                              or os.environ.get("RTDIFF_E4M3_SOFTWARE_ROUNDING") == "1")


@triton.jit
def _round_to_e4m3(v):
    # v: fp32 already clamped to [-448, 448]. Returns v on the e4m3 grid as float8e4nv.
    if _SOFTWARE_E4M3:
        bits = v.to(tl.int32, bitcast=True)
        a = tl.abs(v)
        a_bits = a.to(tl.int32, bitcast=True)
        # Normal e4m3 numbers (|v| >= 2^-6) keep 3 of fp32's 23 mantissa bits: adding just under
        # half of the dropped part, plus the kept LSB, rounds ties to even, and a carry out of the
        # mantissa correctly bumps the exponent.
        normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        # Subnormals (|v| < 2^-6) are multiples of 2^-9; fp32's spacing at 2^14 is 2^-9, so the
        # addition itself rounds to nearest even (abs() sits between this and the scaling multiply,
        # so the compiler cannot fuse them into an FMA that would round only once).
        sub = (a + 16384.0) - 16384.0
        r = tl.where(a < 0.015625, sub, normal)
        v = tl.where(bits < 0, -r, r)  # the sign bit, so -0.0 stays -0.0 as in torch's cast
    return v.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _row_scales(amax):
    # amax [ROWS] fp32 -> (scale, 1 / scale), both correctly rounded. 448.0 and 1e-12 are FP8_MAX
    # and SCALE_FLOOR (a jitted function reads only constexpr globals).
    zero = tl.zeros_like(amax)
    scale = tl.maximum(tl.math.div_rn(amax, zero + 448.0), 1e-12)
    return scale, tl.math.div_rn(zero + 1.0, scale)


@triton.jit
def _store_fp8_rows(y, mask, row_ok, q_ptrs, scale_ptrs):
    """Quantises a register tile y [ROWS, BLOCK] (fp32; every lane outside mask must be 0) row by
    row and stores it: the row scales at scale_ptrs [ROWS], the e4m3 values at q_ptrs. Producers
    that hold whole rows in registers (a norm, an activation) call this instead of writing y and
    having quantize_per_token read it back."""
    scale, inv = _row_scales(tl.max(tl.abs(y), axis=1))
    tl.store(scale_ptrs, scale, mask=row_ok)
    v = tl.clamp(y * inv[:, None], -448.0, 448.0)
    tl.store(q_ptrs, _round_to_e4m3(v), mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, M, K, stride_x, stride_q,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_q
    if ONE_PASS:
        mask = row_ok[:, None] & (cols[None, :] < K)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        _store_fp8_rows(x, mask, row_ok, q_rows + cols[None, :], scale_ptr + rows)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            m = row_ok[:, None] & (k0 + cols[None, :] < K)
            xk = tl.load(x_rows + k0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(xk), axis=1))
        scale, inv = _row_scales(amax)
        tl.store(scale_ptr + rows, scale, mask=row_ok)
        for k0 in range(0, K, BLOCK_K):
            m = row_ok[:, None] & (k0 + cols[None, :] < K)
            xk = tl.load(x_rows + k0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            v = tl.clamp(xk * inv[:, None], -448.0, 448.0)
            tl.store(q_rows + k0 + cols[None, :], _round_to_e4m3(v), mask=m)


@functools.lru_cache(maxsize=None)
def _cuda_fp8_ok(index: int) -> bool:
    # float8e4nv conversions need sm_89 (Ada) or newer.
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _kernel_ok(x: torch.Tensor) -> bool:
    if x.is_cuda:
        return _cuda_fp8_ok(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch_config(K: int, max_block_k: int) -> tuple[int, int, bool, int]:
    block_k = triton.next_power_of_2(K)
    one_pass = block_k <= max_block_k
    if not one_pass:
        block_k = min(4096, triton.next_power_of_2(max_block_k))
    # Short rows share a program (about 8K elements per tile) so each one still has enough bytes
    # in flight; a row of 15360 (Flux's single-block input) is one program of 16 warps.
    block_m = max(1, min(16, 8192 // block_k)) if one_pass else 1
    tile = block_m * block_k
    num_warps = 4 if tile <= 2048 else (8 if tile <= 8192 else 16)
    return block_m, block_k, one_pass, num_warps


def quantize_per_token(x: torch.Tensor, *, max_block_k: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (contiguous; float32, float16 or bfloat16) -> (x_fp8 [M, K] float8_e4m3fn,
    scale [M, 1] float32) with x ~= x_fp8.float() * scale and scale = max(amax|row| / 448, 1e-12).

    Runs the Triton kernel on CUDA with compute capability >= 8.9 and in Triton's interpreter;
    elsewhere the PyTorch reference (identical bytes either way). Rows longer than max_block_k
    (a power of two) take the two-pass path; tests lower it to exercise that path.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _IN_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got strides {x.stride()} for shape {tuple(x.shape)}")
    if max_block_k < 16 or max_block_k & (max_block_k - 1):
        raise ValueError(f"max_block_k must be a power of two >= 16, got {max_block_k}")
    if not _kernel_ok(x):
        return quantize_per_token_reference(x)
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    if M == 0 or K == 0:
        return q, scale.fill_(SCALE_FLOOR)
    block_m, block_k, one_pass, num_warps = _launch_config(K, max_block_k)
    grid = (triton.cdiv(M, block_m),)
    _quantize_rows_kernel[grid](x, q, scale, M, K, x.stride(0), q.stride(0), BLOCK_M=block_m,
                                BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=num_warps)
    return q, scale


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain PyTorch, for any 2-D x: per-row scale = max(amax / 448, 1e-12); values
    x * (1 / scale) clamped to +-448 and cast (round to nearest even) to float8_e4m3fn."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True) if x.shape[1] else xf.new_zeros((x.shape[0], 1))
    # A tensor divisor, not the number: PyTorch's CUDA division by a scalar multiplies by its
    # reciprocal, which can differ from amax / 448 in the last bit.
    scale = torch.clamp(amax / torch.full_like(amax, FP8_MAX), min=SCALE_FLOOR)
    inv = 1.0 / scale
    q = torch.clamp(xf * inv, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale
