"""FlashAttention-style forward pass in Triton: the portable fallback of our attention registry
(rtdiff_cluster/ops/attention.py), for GPUs and head dims that cuDNN / flash-attn / PyTorch's flash
backend cannot take, and the path CI exercises through Triton's interpreter.

Why a kernel: softmax(q k^T * scale) v done eagerly writes the [Lq, Lk] score matrix to memory and
reads it back two or three times (scores, softmax, the product with v): at SDXL's 4096-token
self-attention that is 2 * 10 * 4096^2 * 2 bytes = 671 MB per call against 42 MB of q, k, v and
output. Here each program keeps a BLOCK_M x BLOCK_N tile of scores in registers and folds it into a
running output with the online softmax (FlashAttention-2: running row max and row sum in fp32,
exp2 with log2(e) folded into the scale, the output rescaled once per key block and divided by the
sum once at the end), so memory traffic is q, k, v and the output only (k and v are re-read once
per BLOCK_M rows of q, mostly from L2). The work is then bound by the tensor cores:
4 * B * H * Lq * Lk * D flops, the two matmuls; exp2 on the MUFU units is the second limit at
head dim 64.

Head dims are padded up to the next power of two inside the kernel (masked loads, zeros), so
D = 40, 72, 80, 96 work; the key tail is masked (cross-attention over 77 text tokens), and only the
last, partial key block pays for that mask.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_MAX_GRID_Y = 65535  # B * H runs on the grid's second axis
# The softmax scale inside exp2's argument (one FMA per score) instead of a multiply first: at head
# dim 64 the exponentials and the FP32 pipe limit the kernel as much as the matmuls, and each scalar
# op per score counts. Measured (kernels/tune_attention.py, H200, results/kernels/tune_attention-*):
# 19.5 -> 19.0 us at SDXL's 1024-token self-attention, 116.9 -> 113.7 at 4096 tokens. Off is the
# plain FlashAttention-2 order, kept for that A/B; a negative scale always takes it.
FOLD_SCALE = True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# A few configs that cover H100/H200 at head dims 64 and 128 (BLOCK_M 128 keeps the tensor cores
# busy; BLOCK_N 64 vs 128 trades registers against loop overhead). Autotuning runs at the first call
# of each (head dim, key-length bucket, dtype) on the server, so the list stays short. The
# interpreter runs one small config: there the block size only decides how slow numpy is.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    # Two stages suffice for 77 text tokens (two key blocks): 5.7 against 6.3 us for the autotuner's
    # earlier pick at SDXL's 1024-query cross-attention, 8.7 against 9.9 at 4096 (same sweep).
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
]
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
_SMEM_BUDGET = 160 * 1024  # below Hopper's 227 KiB: Triton needs scratch for layout changes too


def fits_smem(block_m: int, block_n: int, stages: int, block_d: int, elsize: int) -> bool:
    """Whether a q tile plus `stages` pipelined k and v tiles fit in _SMEM_BUDGET."""
    return (block_m + max(stages, 1) * 2 * block_n) * block_d * elsize <= _SMEM_BUDGET


def _prune(configs, named_args, **kwargs):
    """Drops configs whose q tile plus pipelined k and v tiles cannot fit in shared memory
    (head dim 256, or fp32 inputs); falls back to small tiles if none fits (fp32 at head dim 256
    is a test path, not a fast one)."""
    if len(configs) <= 1:
        return configs
    block_d, elsize = kwargs["BLOCK_D"], named_args["Q"].element_size()
    kept = [c for c in configs if fits_smem(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, block_d, elsize)]
    if kept:
        return kept
    return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32 if elsize <= 2 else 16}, num_warps=4,
                          num_stages=2 if elsize <= 2 else 1)]


@triton.jit
def _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi, LK, qk_scale,
                D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                MASK_N: tl.constexpr, PAD_D: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                FOLD_SCALE: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        rows = start_n + offs_n
        k_ptrs = k_base + rows[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + rows[:, None] * stride_vn + offs_d[None, :]
        # Masks only where needed: full key blocks of a power-of-two head dim load unmasked.
        if MASK_N:
            mask = (rows[:, None] < LK) & (offs_d[None, :] < D)
            k = tl.load(k_ptrs, mask=mask, other=0.0)
            v = tl.load(v_ptrs, mask=mask, other=0.0)
        elif PAD_D:
            mask = offs_d[None, :] < D
            k = tl.load(k_ptrs, mask=mask, other=0.0)
            v = tl.load(v_ptrs, mask=mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        p_ty = v.dtype
        if DOT_FP32:  # interpreter + bf16 only, see _attn_fwd
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # Scores in fp32, in log2 units (qk_scale = scale * log2(e)) so exp2 is one MUFU op.
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if not FOLD_SCALE:
            qk = qk * qk_scale  # before the mask: a negative scale would turn its -inf into +inf
        if MASK_N:
            qk = tl.where(rows[None, :] < LK, qk, float("-inf"))
        # Every block holds at least one real key, so m_new is finite and alpha is 0 on the first
        # block (m_i = -inf), never NaN.
        if FOLD_SCALE:
            # qk_scale > 0: the row max of the raw scores, scaled, is the max of the scaled scores,
            # and the scale goes into exp2's argument below as one fused multiply-add per score.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
        if FOLD_SCALE:
            p = tl.math.exp2(qk * qk_scale - m_i[:, None])
        else:
            p = tl.math.exp2(qk - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
        # p goes to the tensor cores in v's precision, as FlashAttention does; the sum above is fp32.
        p = p.to(p_ty)
        if DOT_FP32:
            p = p.to(tl.float32)  # rounded to bf16 first, exactly as the GPU path feeds the tensor cores
        acc = tl.dot(p, v, acc, input_precision=PRECISION)
    return acc, l_i, m_i


@triton.autotune(configs=_INTERPRETER_CONFIGS if _interpreting() else _GPU_CONFIGS,
                 key=["BLOCK_D", "LK_BUCKET", "ROWS_BUCKET"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_fwd(Q, K, V, O, qk_scale,
              stride_qb, stride_qh, stride_qm,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_om,
              H, LQ, LK, LK_BUCKET, ROWS_BUCKET,
              D: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, PRECISION: tl.constexpr,
              DOT_FP32: tl.constexpr, FOLD_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 before multiplying by strides: B * H * L * D can pass 2^31 elements.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # q rows past LQ load as zeros: their scores are finite, their output is never stored.
    q_mask = (offs_m[:, None] < LQ) & (offs_d[None, :] < D)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_FP32:
        # Triton's interpreter keeps bfloat16 as uint16 bits and its tl.dot multiplies those bits
        # (triton-lang/triton#11584): there the bf16 operands are upcast, which changes nothing in
        # the numbers (bf16 products are exact in fp32). Never set on the GPU.
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (LK // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, 0, n_full, LK, qk_scale,
                                D, BLOCK_N, BLOCK_D, False, PAD_D, PRECISION, DOT_FP32, FOLD_SCALE)
    # The key tail (Lk = 77 -> 13 keys past one 64-block): at most one masked block.
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, n_full, LK, LK, qk_scale,
                                D, BLOCK_N, BLOCK_D, True, PAD_D, PRECISION, DOT_FP32, FOLD_SCALE)

    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask)


def _shape_error(q, k, v) -> str | None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() != 4:
            return f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}"
    for name, t in (("k", k), ("v", v)):
        if t.shape[:2] != q.shape[:2]:
            return f"{name} batch and heads {tuple(t.shape[:2])} differ from q's {tuple(q.shape[:2])}"
    if k.shape[-1] != q.shape[-1]:
        return f"k head dim {k.shape[-1]} differs from q's {q.shape[-1]}"
    if v.shape[-1] != q.shape[-1]:
        return f"v head dim {v.shape[-1]} differs from q's {q.shape[-1]} (this kernel needs them equal)"
    if v.shape[2] != k.shape[2]:
        return f"v length {v.shape[2]} differs from k's {k.shape[2]}"
    if k.shape[2] == 0:
        return "k has no keys (Lk = 0): softmax over nothing is undefined"
    return None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when flash_attention can run these inputs, else a short reason (for the registry)."""
    why = _shape_error(q, k, v)
    if why:
        return why
    if not (q.device.type == "cuda" or (q.device.type == "cpu" and _interpreting())):
        return f"q on {q.device.type}: runs on CUDA (or CPU under TRITON_INTERPRET=1)"
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            return f"{name} on {t.device}, q on {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"q dtype {q.dtype}: needs float16, bfloat16 or float32"
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            return f"{name} dtype {t.dtype} differs from q's {q.dtype}"
    d = q.shape[-1]
    if d > _MAX_HEAD_DIM or d % 8 or d == 0:
        return f"q head dim D = {d}: needs a multiple of 8, at most {_MAX_HEAD_DIM}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            return f"{name} last dim not contiguous (stride {t.stride(-1)})"
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        return f"q batch * heads = {q.shape[0] * q.shape[1]} > {_MAX_GRID_Y} (grid limit)"
    return None


def _lk_bucket(lk: int) -> int:
    # Autotune once per regime, not per length: text tokens, mid-size and long sequences.
    return 128 if lk <= 128 else (1024 if lk <= 1024 else 8192)


def _rows_bucket(rows: int) -> int:
    """B * H * Lq in two regimes: whether the query blocks fill the GPU a few times over decides the
    best BLOCK_M (SDXL's 1024-token attention at batch 1 is 160 blocks of 128 rows on 132 SMs).
    Two, not one per size: every new key autotunes (all configs timed) at its first call."""
    return 0 if rows <= 2**16 else 1


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v, non-causal, no mask, forward only (no autograd).

    q [B, H, Lq, D], k and v [B, H, Lk, D] (any strides with a contiguous last dim: transposed
    views of [B, L, H, D] are the usual input); scale defaults to 1 / sqrt(D).
    Returns [B, H, Lq, D] in q's dtype, laid out in memory as [B, Lq, H, D] (the transposed view
    SDPA's flash backend also returns), so `out.transpose(1, 2).reshape(B, Lq, H * D)` is free.
    """
    why = supports(q, k, v)
    if why is not None:
        raise ValueError(f"flash_attention: {why}")
    B, H, LQ, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"flash_attention: scale must be a number, got {type(scale).__name__}") from None
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: scale must be finite, got {scale}")

    o = torch.empty((B, LQ, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, H, Lq, D]
    if LQ == 0 or B * H == 0:
        return o
    _launch(_attn_fwd, q, k, v, o, scale)
    return o


def _launch(kernel, q, k, v, o, scale: float, **meta) -> None:
    """kernel is _attn_fwd (autotuned) or, for benchmarks/tune sweeps, _attn_fwd.fn with its block
    sizes, warps and stages in meta."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16
    grid = lambda m: (triton.cdiv(LQ, m["BLOCK_M"]), B * H)  # noqa: E731
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        kernel[grid](
            q, k, v, o, scale * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            H, LQ, LK, _lk_bucket(LK), _rows_bucket(B * H * LQ),
            D=D, BLOCK_D=block_d, PAD_D=block_d != D,
            # fp32 inputs stay fp32 (no tf32): that path exists to be exact. Half inputs: default.
            PRECISION="ieee" if q.dtype == torch.float32 else None,
            DOT_FP32=q.dtype == torch.bfloat16 and not q.is_cuda,
            FOLD_SCALE=meta.pop("FOLD_SCALE", FOLD_SCALE) and scale > 0, **meta,
        )


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v computed in float32, cast to q's dtype. Shapes as flash_attention."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
