"""A Triton GEMM for the UNet's linears, with the GEGLU gating in its epilogue.

linear_geglu: diffusers' GEGLU feed-forward input, h = x @ W.T + b with W [2N, K], then
h[..., :N] * gelu(h[..., N:]). Through cuBLAS that is the projection writing h [M, 2N] and the
geglu kernel reading it back and writing [M, N]: for an SDXL 1024 step's 70 calls, 4.2 GB of
traffic against 0.8 GB fused, and 70 more launches (geglu alone took 0.88 ms of the 17 ms step on
an H200). Here a program computes the same output tile of the hidden half and of the gate half
(two accumulators, one shared load of x per K step) and writes only hidden * gelu(gate): h never
goes through memory and is never rounded to bf16.

linear: x @ W.T + b, the same kernel without the gate, for the shapes where cuBLAS's tile choice
leaves SMs idle (SDXL's 1280x1280 projections at 256-1024 tokens: one under-filled wave).

Measured, not assumed (kernels/bench_linear.py, results/kernels/bench_linear-2026-11-24-*): on an
H200 this kernel lost to cuBLAS at every linear of an SDXL step, 1.1-1.65x its time, and the fused
GEGLU lost to cuBLAS + our geglu kernel by 1-27% (57.2 against 63.7 us at 1024 tokens x 1280 ->
2 x 5120), though its error against fp32 was 2.6x smaller. So the engine does not use it: it is the
tested starting point for a Hopper-specific GEMM (TMA loads, warp specialisation), which would have
to come within ~10% of cuBLAS for the GEGLU epilogue to pay. The launch configuration is a
parameter (Config), never autotuned at a call: a serving replica must not time kernels on the
serving path.

Shapes: x [..., K] (rows contiguous), W [N_out, K] (nn.Linear's layout), b [N_out] or None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtdiff_kernels._launch import triton_runs
from rtdiff_kernels.activations import _gelu_erf


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int  # output columns per program (for GEGLU: of the product; twice that of W is read)
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


DEFAULT = Config(128, 128, 64, 8, 3)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, GATE_ROW,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, GEGLU: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Programs walk the output in groups of GROUP_M row blocks, so the W columns a group reads stay
    # in L2 across its rows.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns are read at a valid index (row 0) and never stored, so the
    # loads need no M/N mask.
    rm_in = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_in = tl.where(rn < N, rn, 0).to(tl.int64)
    x_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn_in[:, None] * stride_wn + rk[None, :]  # [BLOCK_N, BLOCK_K] of W
    g_ptrs = w_ptrs + GATE_ROW * stride_wn  # the gate half's rows (GEGLU only)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = rk[None, :] < K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=k_ok, other=0.0)
        if DOT_FP32:
            # Triton's interpreter keeps bfloat16 as uint16 bits and its tl.dot multiplies those
            # bits (triton-lang/triton#11584): there the operands are upcast, exactly (bf16 products
            # are exact in fp32). Never set on the GPU.
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
        if GEGLU:
            if EVEN_K:
                g = tl.load(g_ptrs)
            else:
                g = tl.load(g_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
            if DOT_FP32:
                g = g.to(tl.float32)
            acc_g = tl.dot(a, tl.trans(g), acc_g, input_precision=PRECISION)
            g_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    n_ok = rn < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GEGLU:
            acc_g += tl.load(b_ptr + GATE_ROW + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GEGLU:
        acc = acc * _gelu_erf(acc_g)
    mask = (rm < M)[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x, weight, bias, geglu: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., K], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, K] with K = x.shape[-1] = {x.shape[-1]}, "
                         f"got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must have x's dtype and device ({x.dtype}, {x.device}), got {weight.dtype}, {weight.device}")
    if geglu and weight.shape[0] % 2:
        raise ValueError(f"weight: GEGLU needs an even number of rows (hidden and gate halves), got {weight.shape[0]}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be None or [{weight.shape[0]}] of x's dtype and device, "
                         f"got {getattr(bias, 'shape', type(bias))}")


def _launch(x, weight, bias, geglu: bool, config: Config | None) -> torch.Tensor:
    cfg = config or DEFAULT
    k = x.shape[-1]
    if k == 0:  # nothing to multiply: the bias alone, as the reference gives it
        return (linear_geglu_reference if geglu else linear_reference)(x, weight, bias)
    n = weight.shape[0] // 2 if geglu else weight.shape[0]
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m = x2d.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m and n:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _linear_kernel[grid](
            x2d, weight, bias if bias is not None else weight, out, m, n, k, n if geglu else 0,
            x2d.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, GEGLU=geglu, EVEN_K=k % cfg.block_k == 0,
            # fp32 inputs multiply in full fp32 ("ieee"), as F.linear does, not in TF32.
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            DOT_FP32=not x.is_cuda and x.dtype == torch.bfloat16,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: Config | None = None) -> torch.Tensor:
    """x @ weight.T + bias, accumulated in fp32 and rounded once. Off CUDA (and outside Triton's
    interpreter) this runs the reference."""
    _check(x, weight, bias, geglu=False)
    if not triton_runs(x):
        return linear_reference(x, weight, bias)
    return _launch(x, weight, bias, False, config)


def linear_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 config: Config | None = None) -> torch.Tensor:
    """GEGLU(x @ weight.T + bias) = hidden * gelu(gate) (exact erf GELU), hidden and gate the first and
    second half of the projection's N_out = 2N features; [..., N] in x's dtype, computed from the fp32
    accumulators. Off CUDA (and outside Triton's interpreter) this runs the reference."""
    _check(x, weight, bias, geglu=True)
    if not triton_runs(x):
        return linear_geglu_reference(x, weight, bias)
    return _launch(x, weight, bias, True, config)


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def linear_geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' GEGLU module: the projection (rounded to x's dtype), then hidden * gelu(gate)."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)
