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

Two ways to load tiles (Config.tma): pointers, or Hopper's TMA descriptors, with one program per
SM walking the tiles or one program per tile. Measured, not assumed (kernels/bench_linear.py,
results/kernels/bench_linear-2026-11-2{4,5}-*, H200): as plain GEMMs both lose to cuBLAS at every
linear of an SDXL step (TMA tiles by 1.0-1.4x its time, pointers by 1.1-1.65x). The fused GEGLU
with TMA tiles, one program per tile, beats cuBLAS + our geglu kernel where the call is large:
54.9 against 57.4 us at 1024 tokens x 1280 -> 2 x 5120, and its error against fp32 is 2.6x
smaller. So the engine's GEGLU feed-forwards take it there (geglu_config); elsewhere they stay on
cuBLAS. The launch configuration is a parameter (Config), never autotuned at a call: a serving
replica must not time kernels on the serving path.

Shapes: x [..., K] (rows contiguous), W [N_out, K] (nn.Linear's layout), b [N_out] or None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtdiff_kernels._launch import sm_count, triton_runs
from rtdiff_kernels.activations import _gelu_erf


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int  # output columns per program (for GEGLU: of the product; twice that of W is read)
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    # Hopper's tensor-memory accelerator: tiles come in through TMA descriptors (one instruction per
    # tile, no address arithmetic in the registers the accumulators need). Where a tensor breaks
    # TMA's alignment rules (16-byte base and row stride) the pointer kernel runs.
    tma: bool = False
    # With TMA: one program per SM walks the output tiles, its loops flattened so that a tile's
    # epilogue overlaps the next tile's first loads; else one program per tile.
    persistent: bool = True


DEFAULT = Config(128, 128, 64, 8, 3)

# The fast path's GEGLU feed-forwards (rtdiff_cluster/ops/fused.py) take linear_geglu where
# geglu_config says so. Integers, so that benchmarks/unet_profile.py --knob can set each one.
# Measured on an H200 (kernels/bench_linear.py, results/kernels/bench_linear-2026-11-25-*): TMA
# tiles, one program per tile, beat cuBLAS + geglu at 1024 x 1280 -> 2 x 5120 (54.9 against 57.4
# us) and 4096 x 640 -> 2 x 2560 (58.2 against 65.7), and lost at 256 x 1280 -> 2 x 5120 and 1024 x
# 640 -> 2 x 2560 (18.6 against 16.2, 23.7 against 20.3): calls under _GEGLU_MIN_OUTPUTS output
# elements stay on cuBLAS.
_FUSED_GEGLU = 1
_GEGLU_MIN_OUTPUTS = 4 << 20
_GEGLU_BLOCK_M, _GEGLU_BLOCK_N, _GEGLU_BLOCK_K, _GEGLU_WARPS, _GEGLU_STAGES, _GEGLU_GROUP_M = 128, 128, 64, 8, 3, 8
_GEGLU_TMA, _GEGLU_PERSISTENT = 1, 0


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


@triton.jit
def _linear_tma_kernel(
    x_desc, w_desc, b_ptr, out_desc, M, N, K, GATE_ROW,
    HAS_BIAS: tl.constexpr, GEGLU: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr,
):
    # Program p takes output tiles p, p + PROGRAMS, ... (one tile each where PROGRAMS is the tile
    # count) in _linear_kernel's grouped order. TMA zero-fills reads past M, 2N and K and clips the
    # store past M and N, so no mask is needed. In a GEGLU's last column block the hidden tile may
    # read gate rows, but only into columns >= N, which the store drops.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    in_group = GROUP_M * grid_n
    for tile in tl.range(pid, grid_m * grid_n, PROGRAMS, flatten=FLATTEN):
        first_m = (tile // in_group) * GROUP_M
        group_rows = min(grid_m - first_m, GROUP_M)
        off_m = (first_m + (tile % in_group) % group_rows) * BLOCK_M
        off_n = ((tile % in_group) // group_rows) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_steps):
            a = x_desc.load([off_m, kk * BLOCK_K])   # [BLOCK_M, BLOCK_K]
            w = w_desc.load([off_n, kk * BLOCK_K])   # [BLOCK_N, BLOCK_K]
            if DOT_FP32:  # the interpreter's bf16 dot (see _linear_kernel)
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
            if GEGLU:
                g = w_desc.load([GATE_ROW + off_n, kk * BLOCK_K])
                if DOT_FP32:
                    g = g.to(tl.float32)
                acc_g = tl.dot(a, tl.trans(g), acc_g, input_precision=PRECISION)
        rn = off_n + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            if GEGLU:
                acc_g += tl.load(b_ptr + GATE_ROW + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if GEGLU:
            acc = acc * _gelu_erf(acc_g)
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


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
    if not (m and n):
        return out.view(*x.shape[:-1], n)
    meta = dict(HAS_BIAS=bias is not None, GEGLU=geglu,
                # fp32 inputs multiply in full fp32 ("ieee"), as F.linear does, not in TF32.
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                DOT_FP32=not x.is_cuda and x.dtype == torch.bfloat16,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    b = bias if bias is not None else weight
    if cfg.tma and tma_ready(x2d, weight, out):
        from triton.tools.tensor_descriptor import TensorDescriptor

        programs = min(tiles, sm_count(x)) if cfg.persistent else tiles
        _linear_tma_kernel[(programs,)](
            TensorDescriptor.from_tensor(x2d, [cfg.block_m, cfg.block_k]),
            TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]), b,
            TensorDescriptor.from_tensor(out, [cfg.block_m, cfg.block_n]), m, n, k, n if geglu else 0,
            PROGRAMS=programs, FLATTEN=cfg.persistent, **meta)
    else:
        _linear_kernel[(tiles,)](
            x2d, weight, b, out, m, n, k, n if geglu else 0, x2d.stride(0), weight.stride(0), out.stride(0),
            EVEN_K=k % cfg.block_k == 0, **meta)
    return out.view(*x.shape[:-1], n)


def tma_ready(*tensors: torch.Tensor) -> bool:
    """TMA's rules for a 2-D tensor it reads or writes: a 16-byte aligned base, unit column stride,
    a row stride of a multiple of 16 bytes (and on the GPU, Hopper or newer)."""
    if tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device) < (9, 0):
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in tensors)


def geglu_config(x: torch.Tensor, weight: torch.Tensor) -> Config | None:
    """The configuration the fast path runs linear_geglu with for x [..., K] and weight [2N, K], or
    None where it keeps cuBLAS's projection and the geglu kernel: the fused GEMM is off, the device
    is not Hopper or newer (where it was measured), the dtype is not half precision, the call has
    fewer than _GEGLU_MIN_OUTPUTS output elements, or TMA could not read x (contiguous), the weight
    or the output: the pointer kernel lost to cuBLAS everywhere."""
    if not _FUSED_GEGLU or not triton_runs(x) or x.dtype not in (torch.float16, torch.bfloat16):
        return None
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (9, 0):
        return None
    k, n = x.shape[-1], weight.shape[0] // 2
    if weight.dtype != x.dtype or x.numel() // max(k, 1) * n < _GEGLU_MIN_OUTPUTS:
        return None
    config = Config(_GEGLU_BLOCK_M, _GEGLU_BLOCK_N, _GEGLU_BLOCK_K, _GEGLU_WARPS, _GEGLU_STAGES, _GEGLU_GROUP_M,
                    tma=bool(_GEGLU_TMA), persistent=bool(_GEGLU_PERSISTENT))
    if config.tma and not (x.is_contiguous() and tma_ready(x.view(-1, k), weight) and n * x.element_size() % 16 == 0):
        return None
    return config


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
