"""Sweep: our Triton attention kernel (kernels/attention.py) at SDXL's batch-1 attention shapes at
1024x1024, over launch configurations and the inner loop's two options, against cuDNN, each call
timed inside a CUDA graph (kernels/_bench.py bench_us) on q, k, v laid out as the UNet passes them
(views of one packed [B, L, 3, H, D] projection for self-attention).

    python kernels/tune_attention.py --out tune_attention.json

The inner loop's option (kernels/attention.py's FOLD_SCALE, on as shipped): the softmax scale
inside exp2's argument, one FMA per score, or a multiply first. At head dim 64 the exponentials
(MUFU, 16 per SM per clock) take about as long as the two matmuls and the FP32 pipe carries the
rest of the softmax, so each scalar op per score counts.

Tried and dropped (2026-11-25, H200): a lazy rescale, the running max moved only when some row's
max grew by more than 8 (log2 units), to skip the accumulator's rescaling. The block-wide branch
cost more than it saved: 20.3 against 19.0 us at 1024 tokens, 133 against 114 at 4096.
Also tried and dropped (same day): the full key blocks' loop software-pipelined, block j + 1's
scores issued before block j's softmax (FlashAttention-3's intra-warpgroup overlap, left to
Triton's asynchronous wgmma). It lost at every shape, best configuration against best: 20.0
against 19.1 us at 1024 tokens, 115.8 against 114.2 at 4096, 6.1 against 5.6 and 9.8 against 8.5
for the cross-attentions (results/kernels/tune_attention-2026-11-25-*-overlap.*). Two or three
programs share each SM at these tiles, so one program's exponentials already overlap another's
matmuls; the pipelined loop only held a second score tile in registers.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
import torch.nn.functional as F

from rtdiff_kernels import attention as A
from rtdiff_kernels._bench import bench_args, bench_us, matmul_rate, max_err

SHAPES = {  # name: (B, H, Lq, Lk, D, self-attention)
    "self-1024": (1, 20, 1024, 1024, 64, True),
    "self-4096": (1, 10, 4096, 4096, 64, True),
    "cross-77-1024": (1, 20, 1024, 77, 64, False),
    "cross-77-4096": (1, 10, 4096, 77, 64, False),
}
BLOCKS = [(64, 64), (64, 128), (128, 64), (128, 128), (64, 32), (128, 32)]
WARPS = [4, 8]
STAGES = [2, 3, 4]
OPTIONS = [False, True]  # FOLD_SCALE


def _inputs(b, h, lq, lk, d, self_attn):
    g = torch.Generator(device="cuda").manual_seed(0)
    if self_attn:
        qkv = torch.randn(b, lq, 3, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        return [t.transpose(1, 2) for t in qkv.unbind(2)]
    q = torch.randn(b, lq, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    kv = torch.randn(b, lk, 2, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    return [q, *(t.transpose(1, 2) for t in kv.unbind(2))]


def main() -> None:
    args = bench_args(__doc__, "tune_attention")
    peak = matmul_rate()
    rows = []
    for name, (b, h, lq, lk, d, self_attn) in SHAPES.items():
        q, k, v = _inputs(b, h, lq, lk, d, self_attn)
        flops = 4 * b * h * lq * lk * d
        ref = A.attention_reference(q, k, v)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            cudnn_us = bench_us(lambda: F.scaled_dot_product_attention(q, k, v))
        shipped_us = bench_us(lambda: A.flash_attention(q, k, v))
        err_shipped = max_err(A.flash_attention(q, k, v), ref)
        print(f"{name}: cuDNN {cudnn_us:.1f} us, ours as shipped (autotuned) {shipped_us:.1f} us "
              f"({flops / shipped_us / 1e6:.0f} TFLOP/s), err {err_shipped:.2e}", flush=True)
        scale = 1.0 / d ** 0.5
        # The cross-attentions (one or two key blocks) sweep the block shapes that fit 77 keys.
        blocks = BLOCKS if self_attn else [(64, 64), (128, 64), (64, 128), (128, 128)]
        for (bm, bn), warps, stages, fold in itertools.product(blocks, WARPS, STAGES, OPTIONS):
            if not A.fits_smem(bm, bn, stages, d, q.element_size()) or (bm == 64 and warps == 8):
                continue
            o = torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
            run = lambda: A._launch(A._attn_fwd.fn, q, k, v, o, scale, BLOCK_M=bm, BLOCK_N=bn,  # noqa: E731
                                    num_warps=warps, num_stages=stages, FOLD_SCALE=fold)
            try:
                run()
                torch.cuda.synchronize()
                err = max_err(o, ref)
                us = bench_us(run)
            except Exception as e:  # a config the compiler rejects (resources) is skipped, not fatal
                print(f"  {bm}x{bn} w{warps} s{stages} fold={fold}: failed ({type(e).__name__})", flush=True)
                continue
            row = {"shape": name, "block_m": bm, "block_n": bn, "warps": warps, "stages": stages, "fold_scale": fold,
                   "us": us, "tflops": flops / us / 1e6, "max_err": err,
                   "cudnn_us": cudnn_us, "shipped_us": shipped_us}
            rows.append(row)
        for fold in OPTIONS:
            sub = [r for r in rows if r["shape"] == name and r["fold_scale"] == fold]
            r = min(sub, key=lambda r: r["us"]) if sub else None
            if r:
                print(f"  fold={fold!s:5s} best: {r['block_m']}x{r['block_n']} w{r['warps']} s{r['stages']} "
                      f"{r['us']:.1f} us ({r['tflops']:.0f} TFLOP/s), err {r['max_err']:.2e}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "matmul_tflops": peak / 1e12,
                   "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
