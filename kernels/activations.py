"""Feed-forward activations: GEGLU (SD/SDXL) and linear + tanh-GELU (Flux).

geglu: diffusers' GEGLU splits its projection h [..., 2N] into (hidden, gate) and returns
hidden * gelu(gate). Eagerly that is a gelu kernel writing a gate-sized temporary and a multiply
reading it back: 2N read + N written + N written + 2N read + N written per row, against the floor of
2N read + N written. The kernel reads both halves once, computes the exact (erf) GELU and the product
in fp32 and writes the result once (one rounding instead of two for fp16/bf16).

geglu_fp8: the same product quantised per row to float8_e4m3fn for the FP8 down-projection that
follows (quant/fp8.py Fp8Linear.forward_fp8). Unfused, the down-projection's input costs the
product's write in bf16 (2N bytes per row) and quantize_per_token's read of it and its own write (N
bytes + 4). Here a program holds a row in registers and writes N bytes of e4m3 and the row's
scale: the floor is 2N * 2 bytes read + N + 4 written. The fp32 product is quantised directly, without the bf16 rounding in
between.

gelu_tanh_fp8: Flux's tanh-GELU after an FP8 up-projection, quantised per row for the FP8 linear
that reads it (a double block's feed-forward out-projection; a single block's proj_out, whose rows
are the attention output followed by the MLP's GELU: the kernel takes the attention output as a
prefix and writes the concatenated row). Unfused that is a GELU pass (read and write [M, N] in
bf16), the concatenation (read and write [M, P + N]) and quantize_per_token (read it, write e4m3).
Here a program holds its row in registers (up to _GELU_FP8_ONE_PASS_LANES lanes: Flux's
3072 + 12288) and computes each GELU once: 2(P + N) bytes read, P + N + 4 written. Wider rows walk
the row twice, the amax and then the quantised store, recomputing the GELU (the second read of a
row mostly hits L2).

linear_gelu_tanh: F.gelu(F.linear(x, W, b), approximate="tanh"), Flux's FF up-projection and the
single blocks' proj_mlp. On CUDA in fp16/bf16 it calls torch._addmm_activation(..., use_gelu=True):
PyTorch asks cuBLASLt for the GELU_BIAS epilogue, which applies bias and GELU to the fp32
accumulator before the single rounding and store, so the [M, N] pre-activation never goes through
memory (saves 2*M*N*2 bytes, e.g. 201 MB per Flux FF call at 4096 tokens). The epilogue is the
tanh approximation: PyTorch treats it as such, its non-cuBLASLt CUDA fallback for the same op applies
at::gelu_(result, "tanh") (aten/src/ATen/native/cuda/Blas.cpp). Careful: the CPU kernel of
_addmm_activation applies the *exact* erf GELU, so it is used on CUDA only. Numerically the fused
path is, if anything, closer to the fp32 result than eager (no rounding of the pre-activation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtdiff_kernels._launch import triton_runs
from rtdiff_kernels.fp8_quant import _round_to_e4m3, _row_scales, quantize_per_token_reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _gelu_erf(x):
    """Exact GELU, as F.gelu's default: x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _geglu_product(h_row, cols, mask, N):
    """hidden * gelu(gate) in fp32 for the lanes cols of a row of h (0 where masked)."""
    hidden = tl.load(h_row + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(h_row + N + cols, mask=mask, other=0.0).to(tl.float32)
    return hidden * _gelu_erf(gate)


@triton.jit
def _geglu_kernel(h_ptr, out_ptr, M, N, stride_h, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    # A [ROWS, BLOCK_N] tile of the output per program.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)[:, None]
    out = _geglu_product(h_ptr + rows * stride_h, cols[None, :], mask, N)
    tl.store(out_ptr + rows * N + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_fp8_kernel(h_ptr, q_ptr, scale_ptr, N, stride_h, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    # One row per program, held in registers as two power-of-two pieces, [0, BLOCK_A) and
    # [BLOCK_A, BLOCK_A + BLOCK_B) (5120 = 4096 + 1024, 2560 = 2048 + 512), so few lanes idle.
    # The kernel is bound by its instructions (the erf), not by memory: one 8192-lane piece for a
    # 5120-wide row (37% idle lanes) measured 22.5 us per call in the 1024 step, and two passes
    # over the row (the erf twice) 23.7, against 12.0 for geglu alone.
    row = tl.program_id(0).to(tl.int64)
    h_row = h_ptr + row * stride_h
    q_row = q_ptr + row * N
    cols_a = tl.arange(0, BLOCK_A)
    mask_a = cols_a < N
    y_a = _geglu_product(h_row, cols_a, mask_a, N)
    amax = tl.max(tl.abs(y_a), axis=0)
    if BLOCK_B > 0:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        mask_b = cols_b < N
        y_b = _geglu_product(h_row, cols_b, mask_b, N)
        amax = tl.maximum(amax, tl.max(tl.abs(y_b), axis=0))
    scale, inv = _row_scales(amax)
    tl.store(scale_ptr + row, scale)
    tl.store(q_row + cols_a, _round_to_e4m3(tl.clamp(y_a * inv, -448.0, 448.0)), mask=mask_a)
    if BLOCK_B > 0:
        tl.store(q_row + cols_b, _round_to_e4m3(tl.clamp(y_b * inv, -448.0, 448.0)), mask=mask_b)


# Launch geometry of geglu: the widest column block, the output elements per program
# (_TILE_ELEMS // BLOCK_N rows of it) and warps per program. Swept on an SDXL step's own calls
# (benchmarks/tune_pointwise.py, H200, results/tune_pointwise-2026-11-24-*): one row block per
# program was within 2% of the best of 36 settings; more rows per program only lost.
_MAX_BLOCK_N = 1024
_TILE_ELEMS = 1024
_NUM_WARPS = 4


def _block_n(n: int) -> int:
    # Prefer a block that divides N (5120, 2560, 10240 all do) so no program runs half empty.
    p = _MAX_BLOCK_N
    while p >= 256:
        if n % p == 0:
            return p
        p //= 2
    return min(_MAX_BLOCK_N, triton.next_power_of_2(n))


def geglu(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2N] -> [..., N] = h[..., :N] * gelu(h[..., N:]) (exact erf GELU), computed in fp32,
    returned in h.dtype. Any leading shape; leading strides need not be contiguous. Off CUDA (and
    outside Triton's interpreter) this runs the PyTorch reference."""
    _check_h(h)
    if not triton_runs(h):
        return geglu_reference(h)
    n = h.shape[-1] // 2
    out = torch.empty((*h.shape[:-1], n), device=h.device, dtype=h.dtype)
    if out.numel() == 0:
        return out
    h2d = h.reshape(-1, 2 * n)  # a view when the leading dims allow it
    if h2d.stride(-1) != 1:
        h2d = h2d.contiguous()
    m = h2d.shape[0]
    block_n = _block_n(n)
    rows = min(max(1, _TILE_ELEMS // block_n), triton.next_power_of_2(m))
    grid = (triton.cdiv(m, rows), triton.cdiv(n, block_n))
    _geglu_kernel[grid](h2d, out, m, n, h2d.stride(0), ROWS=rows, BLOCK_N=block_n, num_warps=_NUM_WARPS)
    return out


def _check_h(h) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() < 1:
        raise ValueError(f"h must be a tensor [..., 2N], got {getattr(h, 'shape', type(h))}")
    if h.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"h must be float32, float16 or bfloat16, got {h.dtype}")
    if h.shape[-1] % 2:
        raise ValueError(f"h: the last dim must be even (hidden and gate halves), got {h.shape[-1]}")


def geglu_fp8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [..., 2N] -> (q [M, N] float8_e4m3fn, scale [M, 1] float32), M = h.numel() // 2N: the rows
    of h[..., :N] * gelu(h[..., N:]) (exact GELU, fp32), each quantised with its own scale
    amax / 448 as quantize_per_token does. Off CUDA (and outside Triton's interpreter) this runs
    the reference."""
    _check_h(h)
    if not triton_runs(h):
        return geglu_fp8_reference(h)
    n = h.shape[-1] // 2
    h2d = h.reshape(-1, 2 * n)
    if h2d.stride(-1) != 1:
        h2d = h2d.contiguous()
    m = h2d.shape[0]
    q = torch.empty((m, n), device=h.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=h.device, dtype=torch.float32)
    if m == 0:
        return q, scale
    if n == 0:
        return q, scale.fill_(1e-12)
    block_a, block_b = _pow2_pieces(n)
    _geglu_fp8_kernel[(m,)](h2d, q, scale, n, h2d.stride(0), BLOCK_A=block_a, BLOCK_B=block_b,
                            num_warps=8 if block_a + block_b >= 4096 else 4)
    return q, scale


def geglu_fp8_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 GEGLU product (not rounded to h's dtype) through quantize_per_token_reference."""
    hidden, gate = h.float().reshape(-1, h.shape[-1]).chunk(2, dim=-1)
    return quantize_per_token_reference((hidden * F.gelu(gate)).contiguous())


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU after its projection, in fp32: hidden, gate = h.chunk(2, -1);
    hidden * gelu(gate), returned in h.dtype."""
    hidden, gate = h.float().chunk(2, dim=-1)
    return (hidden * F.gelu(gate)).to(h.dtype)


@triton.jit
def _gelu_tanh(x):
    """F.gelu(x, approximate="tanh") in fp32, its tanh(u) as 1 - 2 / (exp(2u) + 1). 2u is capped at
    80 (tanh is 1 in fp32 long before), so exp stays finite; at the other end exp reaches 0."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * u, 80.0)) + 1.0))


@triton.jit
def _gelu_tanh_piece(h_row, cols, N):
    """tanh-GELU in fp32 of the lanes cols of a row of h (0 where masked: gelu(0) = 0)."""
    return _gelu_tanh(tl.load(h_row + cols, mask=cols < N, other=0.0).to(tl.float32))


@triton.jit
def _store_e4m3(q_row, cols, n, y, inv):
    tl.store(q_row + cols, _round_to_e4m3(tl.clamp(y * inv, -448.0, 448.0)), mask=cols < n)


@triton.jit
def _gelu_tanh_fp8_row_kernel(p_ptr, h_ptr, q_ptr, scale_ptr, P, N, stride_p, stride_h,
                              P_A: tl.constexpr, P_B: tl.constexpr, H_A: tl.constexpr, H_B: tl.constexpr):
    # One row per program, in registers: the prefix as pieces [0, P_A) and [P_A, P_A + P_B), the
    # GELU as [0, H_A) and [H_A, H_A + H_B), each a power of two (Flux: 2048 + 1024 and 8192 + 4096,
    # no idle lane). Each GELU is computed once, where the two-pass kernel below computes it twice.
    row = tl.program_id(0).to(tl.int64)
    p_row, h_row, q_row = p_ptr + row * stride_p, h_ptr + row * stride_h, q_ptr + row * (P + N)
    cols_ha = tl.arange(0, H_A)
    g_a = _gelu_tanh_piece(h_row, cols_ha, N)
    amax = tl.max(tl.abs(g_a), axis=0)
    if H_B > 0:
        cols_hb = H_A + tl.arange(0, H_B)
        g_b = _gelu_tanh_piece(h_row, cols_hb, N)
        amax = tl.maximum(amax, tl.max(tl.abs(g_b), axis=0))
    if P_A > 0:
        cols_pa = tl.arange(0, P_A)
        x_a = tl.load(p_row + cols_pa, mask=cols_pa < P, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x_a), axis=0))
    if P_B > 0:
        cols_pb = P_A + tl.arange(0, P_B)
        x_b = tl.load(p_row + cols_pb, mask=cols_pb < P, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x_b), axis=0))
    scale, inv = _row_scales(amax)
    tl.store(scale_ptr + row, scale)
    if P_A > 0:
        _store_e4m3(q_row, cols_pa, P, x_a, inv)
    if P_B > 0:
        _store_e4m3(q_row, cols_pb, P, x_b, inv)
    _store_e4m3(q_row + P, cols_ha, N, g_a, inv)
    if H_B > 0:
        _store_e4m3(q_row + P, cols_hb, N, g_b, inv)


@triton.jit
def _gelu_tanh_fp8_kernel(p_ptr, h_ptr, q_ptr, scale_ptr, P, N, stride_p, stride_h, BLOCK: tl.constexpr):
    # One row per program: cat([prefix row (P), gelu_tanh(h row) (N)]) in BLOCK-wide pieces, walked
    # twice (the row amax, then the quantised store); masked lanes load 0, and gelu(0) = 0.
    row = tl.program_id(0).to(tl.int64)
    p_row, h_row, q_row = p_ptr + row * stride_p, h_ptr + row * stride_h, q_ptr + row * (P + N)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, P, BLOCK):
        acc = tl.maximum(acc, tl.abs(tl.load(p_row + start + cols, mask=start + cols < P, other=0.0).to(tl.float32)))
    for start in range(0, N, BLOCK):
        v = _gelu_tanh(tl.load(h_row + start + cols, mask=start + cols < N, other=0.0).to(tl.float32))
        acc = tl.maximum(acc, tl.abs(v))
    scale, inv = _row_scales(tl.max(acc, axis=0))
    tl.store(scale_ptr + row, scale)
    for start in range(0, P, BLOCK):
        c = start + cols
        v = tl.load(p_row + c, mask=c < P, other=0.0).to(tl.float32)
        tl.store(q_row + c, _round_to_e4m3(tl.clamp(v * inv, -448.0, 448.0)), mask=c < P)
    for start in range(0, N, BLOCK):
        c = start + cols
        v = _gelu_tanh(tl.load(h_row + c, mask=c < N, other=0.0).to(tl.float32))
        tl.store(q_row + P + c, _round_to_e4m3(tl.clamp(v * inv, -448.0, 448.0)), mask=c < N)


_GELU_FP8_BLOCK = 1024  # two-pass kernel: lanes per piece of a row (4 warps)
# One-pass kernel: the most register lanes a row may take (its four pieces together; Flux's single
# blocks take 15,360), and warps per program by lanes: 16 warps hold 15,360 fp32 values at 30 a thread.
_GELU_FP8_ONE_PASS_LANES = 16384
_GELU_FP8_LANES_PER_WARP = 1024


def _pow2_pieces(n: int) -> tuple[int, int]:
    """n split as the largest power of two <= n and the next power of two >= the rest (0: none)."""
    if n <= 0:
        return 0, 0
    a = 1 << (n.bit_length() - 1)
    return a, (triton.next_power_of_2(n - a) if n > a else 0)


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.shape[-1] <= 1 or t2.stride(-1) == 1 else t2.contiguous()


def gelu_tanh_fp8(h: torch.Tensor, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h [..., N] -> (q [M, P + N] float8_e4m3fn, scale [M, 1] float32), M = h.numel() // N: each row
    of cat([prefix, gelu_tanh(h)], -1), the GELU in fp32, quantised with its own scale amax / 448
    as quantize_per_token does. prefix: [..., P] with h's leading shape, dtype and device, or None
    (P = 0). Off CUDA (and outside Triton's interpreter) this runs the reference."""
    if not isinstance(h, torch.Tensor) or h.dim() < 1 or h.dtype not in _FLOAT_DTYPES or h.shape[-1] == 0:
        raise ValueError(f"h must be a float32, float16 or bfloat16 tensor [..., N], N > 0, got "
                         f"{getattr(h, 'dtype', type(h))} {tuple(getattr(h, 'shape', ()))}")
    if prefix is not None and (not isinstance(prefix, torch.Tensor) or prefix.shape[:-1] != h.shape[:-1]
                               or prefix.dtype != h.dtype or prefix.device != h.device):
        raise ValueError(f"prefix must be None or [..., P] with h's leading shape {tuple(h.shape[:-1])}, dtype "
                         f"{h.dtype} and device {h.device}, got {getattr(prefix, 'dtype', type(prefix))} "
                         f"{tuple(getattr(prefix, 'shape', ()))}")
    if not triton_runs(h):
        return gelu_tanh_fp8_reference(h, prefix)
    h2d = _rows_2d(h)
    p2d = _rows_2d(prefix) if prefix is not None else h2d[:, :0]
    m, n, p = h2d.shape[0], h2d.shape[1], p2d.shape[1]
    q = torch.empty((m, p + n), device=h.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=h.device, dtype=torch.float32)
    if m == 0:
        return q, scale
    (p_a, p_b), (h_a, h_b) = _pow2_pieces(p), _pow2_pieces(n)
    lanes = p_a + p_b + h_a + h_b
    if lanes <= _GELU_FP8_ONE_PASS_LANES:
        warps = min(16, max(4, triton.next_power_of_2(lanes // _GELU_FP8_LANES_PER_WARP)))
        _gelu_tanh_fp8_row_kernel[(m,)](p2d, h2d, q, scale, p, n, max(p2d.stride(0), 1), h2d.stride(0),
                                        P_A=p_a, P_B=p_b, H_A=h_a, H_B=h_b, num_warps=warps)
    else:
        _gelu_tanh_fp8_kernel[(m,)](p2d, h2d, q, scale, p, n, max(p2d.stride(0), 1), h2d.stride(0),
                                    BLOCK=_GELU_FP8_BLOCK, num_warps=4)
    return q, scale


def gelu_tanh_fp8_reference(h: torch.Tensor, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cat([prefix, F.gelu(h, approximate="tanh")], -1) in fp32 (not rounded to h's dtype) through
    quantize_per_token_reference."""
    rows = F.gelu(h.float().reshape(-1, h.shape[-1]), approximate="tanh")
    if prefix is not None:
        rows = torch.cat([prefix.float().reshape(-1, prefix.shape[-1]), rows], dim=-1)
    return quantize_per_token_reference(rows.contiguous())


def _fused_gemm_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and bias is not None):
        return False
    if weight.dtype != x.dtype or bias.dtype != x.dtype or x.numel() == 0:
        return False
    # _addmm_activation is an inference fast path; let autograd see the plain ops.
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return False
    return hasattr(torch, "_addmm_activation")


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.gelu(F.linear(x, weight, bias), approximate="tanh").

    x: [..., K]; weight: [N, K]; bias: [N] or None. Returns [..., N] in x.dtype. On CUDA with
    fp16/bf16 and a bias, the GELU runs in the GEMM's epilogue (cuBLASLt); otherwise the reference.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., K], got {getattr(x, 'shape', type(x))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, K] with K = x.shape[-1] = {x.shape[-1]}, "
                         f"got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be None or [N] = [{weight.shape[0]}], got {getattr(bias, 'shape', type(bias))}")
    if not _fused_gemm_ok(x, weight, bias):
        return linear_gelu_tanh_reference(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, x2d, weight.t(), use_gelu=True)  # [M, N]
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_gelu_tanh_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' GELU(approximate="tanh") module: the projection, then tanh-GELU."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")
