"""Feed-forward activations: GEGLU (SD/SDXL) and linear + tanh-GELU (Flux).

geglu: diffusers' GEGLU splits its projection h [..., 2N] into (hidden, gate) and returns
hidden * gelu(gate). Eagerly that is a gelu kernel writing a gate-sized temporary and a multiply
reading it back: 2N read + N written + N written + 2N read + N written per row, against the floor of
2N read + N written. The kernel reads both halves once, computes the exact (erf) GELU and the product
in fp32 and writes the result once (one rounding instead of two for fp16/bf16).

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

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _geglu_kernel(h_ptr, out_ptr, N, stride_h, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    row_ptr = h_ptr + row.to(tl.int64) * stride_h
    hidden = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(row_ptr + N + cols, mask=mask, other=0.0).to(tl.float32)
    # Exact GELU, as F.gelu's default: x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))).
    gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    out = hidden * gelu
    tl.store(out_ptr + row.to(tl.int64) * N + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _block_n(n: int) -> int:
    # Prefer a block that divides N (5120, 2560, 10240 all do) so no program runs half empty.
    for p in (1024, 512, 256):
        if n % p == 0:
            return p
    return min(1024, triton.next_power_of_2(n))


def geglu(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2N] -> [..., N] = h[..., :N] * gelu(h[..., N:]) (exact erf GELU), computed in fp32,
    returned in h.dtype. Any leading shape; leading strides need not be contiguous. Off CUDA (and
    outside Triton's interpreter) this runs the PyTorch reference."""
    if not isinstance(h, torch.Tensor) or h.dim() < 1:
        raise ValueError(f"h must be a tensor [..., 2N], got {getattr(h, 'shape', type(h))}")
    if h.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"h must be float32, float16 or bfloat16, got {h.dtype}")
    if h.shape[-1] % 2:
        raise ValueError(f"h: the last dim must be even (hidden and gate halves), got {h.shape[-1]}")
    if not triton_runs(h):
        return geglu_reference(h)
    n = h.shape[-1] // 2
    out = torch.empty((*h.shape[:-1], n), device=h.device, dtype=h.dtype)
    if out.numel() == 0:
        return out
    h2d = h.reshape(-1, 2 * n)  # a view when the leading dims allow it
    if h2d.stride(-1) != 1:
        h2d = h2d.contiguous()
    block_n = _block_n(n)
    grid = (h2d.shape[0], triton.cdiv(n, block_n))
    _geglu_kernel[grid](h2d, out, n, h2d.stride(0), BLOCK_N=block_n, num_warps=4)
    return out


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU after its projection, in fp32: hidden, gate = h.chunk(2, -1);
    hidden * gelu(gate), returned in h.dtype."""
    hidden, gate = h.float().chunk(2, dim=-1)
    return (hidden * F.gelu(gate)).to(h.dtype)


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
