#!/usr/bin/env python
"""Why a cuBLAS linear costs more inside the SDXL step than on its own: each GEMM call of the graphed
1024 step, with its shape and the kernel before it, against the same shape timed alone.

In the step's profile the 1280 x 1280 linears at 1,024 tokens average 12.3 us; back to back on the
same tensors (kernels/bench_linear.py) the same cuBLAS kernel takes 7.7 us. Candidate causes, each
measured here:
- the weights come from HBM in the step (5 GB of them, against a 50 MB L2), and stay in L2 when
  one tensor is timed again and again: the alone rows are timed hot, with a pool of distinct
  weights larger than L2 ("cold weights"), and with distinct weights and inputs ("cold both");
- what ran just before (attention, a norm) leaves the GPU in some state the GEMM pays for: the step
  rows are split by the kernel before each call;
- the calls of one kernel name are of several shapes: each call is labelled with its M x K x N from
  an eager step profiled with its shapes, aligned by kernel name (1x1 convolutions that cuDNN
  hands to cuBLAS are among them, as pixels x input channels x output channels).

    python benchmarks/gemm_calls.py [--size 1024] [--out-dir benchmarks/results]

GPU only (the step's graph and cuBLAS are what is measured).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks", REPO / "kernels"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine_bench import load_engine, write_results  # noqa: E402
from sharding import _inputs  # noqa: E402
from unet_profile import _step  # noqa: E402

GEMM = re.compile(r"nvjet|gemm|sm90_xmma_gemm|cutlass", re.I)
NOT_GEMM = re.compile(r"fprop|conv|splitKreduce|dgrad|wgrad", re.I)
POOL_BYTES = 160 * 2**20  # distinct weights cycled through in the cold rows: > 3x the H200's 50 MB L2
REPLAYS = 5
ALONE_KEYS = ("hot_us", "cold_weights_us", "cold_both_us", "nn_us", "transposed_us", "cublas_us", "cublaslt_us")


def is_gemm(name: str) -> bool:
    return bool(GEMM.search(name)) and not NOT_GEMM.search(name)


def short(name: str) -> str:
    """A kernel's family: '_attn_fwd', 'nvjet 80x128', 'cudnn sdpa', 'conv', 'aten elementwise', ..."""
    if name.startswith("nvjet"):
        m = re.search(r"_(\d+x\d+)_", name)
        return "nvjet " + (m.group(1) if m else "?") + (" bias" if "_bias_" in name else "")
    if "sdpa" in name:
        return "cudnn sdpa"
    if "fprop" in name or "convolve" in name:
        return "conv"
    if name.startswith("void at::native") or name.startswith("at::native"):
        return "aten " + re.sub(r"<.*", "", name.split("::")[-1])[:30]
    return re.sub(r"[<(].*", "", name)[:40]


def kernel_events(prof) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of every CUDA kernel in a profile, in start order."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memset") and "Memcpy" not in e.name:
            out.append((e.name, e.time_range.start, e.time_range.end - e.time_range.start))
    return sorted(out, key=lambda t: t[1])


def graph_calls(run, replays: int = REPLAYS) -> list[tuple[str, float]]:
    """Each kernel of one replay of a captured step, in order: (name, median us over the replays)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            run()
            torch.cuda.synchronize()
    ev = kernel_events(prof)
    if not ev or len(ev) % replays:
        raise SystemExit(f"gemm_calls: {len(ev)} kernel events over {replays} replays: graph kernels not traced one by one")
    n = len(ev) // replays
    names = [ev[i][0] for i in range(n)]
    for r in range(1, replays):
        if [ev[r * n + i][0] for i in range(n)] != names:
            raise SystemExit("gemm_calls: the replays' kernel sequences differ")
    return [(names[i], statistics.median(ev[r * n + i][2] for r in range(replays))) for i in range(n)]


def eager_gemm_shapes(fn) -> list[tuple[str, tuple[int, int, int], bool]]:
    """(kernel name, (M, K, N), bias?) of each cuBLAS GEMM an eager step launches, in order. The
    shape is read from the operator that launched the kernel (addmm: bias, x, w^T; mm and the
    rest: x, w^T, with leading dimensions folded into M); (0, 0, 0) where its shapes do not say."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    found = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            continue
        for k in e.kernels:
            if is_gemm(k.name):
                found.append((e.time_range.start, k.name, e.name, [list(s) for s in e.input_shapes]))
    found.sort(key=lambda t: t[0])
    out = []
    for _, kname, op, shapes in found:
        mats = [s for s in shapes if len(s) >= 2]
        shape, bias = (0, 0, 0), op == "aten::addmm"
        if "conv" in op and len(mats) >= 2 and len(mats[0]) == 4 and len(mats[1]) == 4:
            # A convolution cuDNN hands to cuBLAS (1x1): M = N*H*W pixels, K = C_in*kh*kw, N = C_out.
            (n, _, h, w), (c_out, c_in, kh, kw) = mats[0], mats[1]
            out.append((kname, (n * h * w, c_in * kh * kw, c_out), False))
            continue
        if len(mats) >= 2:
            a, b = mats[0], mats[1]
            m = 1
            for d in a[:-1]:
                m *= d
            shape = (m, a[-1], b[-1])
        out.append((kname, shape, bias))
    return out


def label(gemm_names: list[str], shapes: list) -> list:
    """Each graph GEMM call's (shape, bias) from the eager calls, aligned by kernel name (the graph
    and the eager step launch the same GEMMs in the same order; where they differ the call stays
    unlabelled: ((0, 0, 0), False))."""
    import difflib

    labels = [((0, 0, 0), False)] * len(gemm_names)
    sm = difflib.SequenceMatcher(a=gemm_names, b=[s[0] for s in shapes], autojunk=False)
    for blk in sm.get_matching_blocks():
        for j in range(blk.size):
            labels[blk.a + j] = (shapes[blk.b + j][1], shapes[blk.b + j][2])
    return labels


def alone_us(m: int, k: int, n: int, bias: bool) -> dict:
    """One shape's linear timed alone, each a graph of calls back to back: F.linear on one weight
    (hot), on a pool of distinct weights larger than L2 (cold weights), on distinct weights and
    inputs (cold both); and, hot, the layouts and libraries cuBLAS could be asked for instead:
    the weight stored transposed ([K, N], an NN product), the transposed problem (w @ x^T, whose
    output is out^T), and PyTorch's cuBLAS and cuBLASLt preferences."""
    from _bench import bench_us

    dt = torch.bfloat16
    pool = max(8, POOL_BYTES // (n * k * 2))
    g = torch.Generator("cuda").manual_seed(m + 3 * n + 7 * k)
    ws = [(torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dt) for _ in range(pool)]
    xs = [torch.randn(m, k, device="cuda", generator=g).to(dt) for _ in range(pool)]
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).to(dt) if bias else None
    x, w = xs[0], ws[0]
    wt = w.t().contiguous()
    ref = F.linear(x.float(), w.float(), b.float() if bias else None)
    out = {"pool": pool, "hot_us": bench_us(lambda: F.linear(x, w, b))}

    def cycle(use_x):
        def fn():
            for i in range(pool):
                F.linear(xs[i] if use_x else x, ws[i], b)
        return bench_us(fn) / pool

    out["cold_weights_us"] = cycle(False)
    out["cold_both_us"] = cycle(True)
    variants = {
        "nn_us": lambda: torch.addmm(b, x, wt) if bias else x @ wt,
        "transposed_us": lambda: torch.addmm(b[:, None], w, x.t()) if bias else w @ x.t(),
    }
    for key, fn in variants.items():
        got = fn()
        got = got.t() if key == "transposed_us" else got
        err = (got.float() - ref).abs().max().item()
        out[key] = bench_us(fn) if err < 0.1 * ref.abs().max().item() else float("nan")
    before = torch.backends.cuda.preferred_blas_library()
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        try:
            out[f"{lib}_us"] = bench_us(lambda: F.linear(x, w, b))
        finally:
            torch.backends.cuda.preferred_blas_library(before)
    return out


def analyse(calls: list[tuple[str, float]], shapes: list) -> dict:
    gemm_idx = [i for i, (name, _) in enumerate(calls) if is_gemm(name)]
    labels = label([calls[i][0] for i in gemm_idx], shapes)
    matched = sum(1 for shape, _ in labels if shape != (0, 0, 0))
    rows = {}
    for j, i in enumerate(gemm_idx):
        name, us = calls[i]
        shape, bias = labels[j]
        before = short(calls[i - 1][0]) if i else "(start)"
        r = rows.setdefault((shape, bias, short(name)), {"m": shape[0], "k": shape[1], "n": shape[2], "bias": bias,
                                                          "kernel": short(name), "times": [], "before": {}})
        r["times"].append(us)
        r["before"].setdefault(before, []).append(us)
    out = []
    for r in rows.values():
        t = r.pop("times")
        r.update(calls=len(t), step_us=statistics.median(t), step_min_us=min(t), step_max_us=max(t), total_us=sum(t),
                 before={b: {"calls": len(v), "us": statistics.median(v)} for b, v in r["before"].items()})
        out.append(r)
    out.sort(key=lambda r: -r["total_us"])
    return {"matched": matched, "gemm_calls": len(gemm_idx), "eager_gemms": len(shapes), "rows": out}


def markdown(res: dict) -> str:
    lines = [f"# cuBLAS GEMMs inside the graphed SDXL step against alone: {res['gpu_name']} ({res['date']})", "",
             f"torch {res['torch']}; {res['source']}, batch 1, {res['size']}x{res['size']}, fast paths on. Step: each "
             f"call's median over {REPLAYS} profiled replays of the step's CUDA graph ({res['kernels']} kernels, "
             f"{res['step_kernel_us'] / 1e3:.2f} ms of kernel time; GEMMs {res['gemm_us'] / 1e3:.2f} ms). "
             f"Shapes from an eager step, aligned by kernel name: {res['matched']} of {res['gemm_calls']} calls labelled "
             f"({res['eager_gemms']} GEMMs in the eager step). "
             "Alone: a graph of calls back to back on one weight (hot), on a pool of distinct weights larger than "
             "L2 (cold weights), or distinct weights and inputs (cold both); hot, the weight stored [K, N] (NN), "
             "the transposed problem w @ x^T, and F.linear under PyTorch's cuBLAS or cuBLASLt preference.", "",
             "| M x K x N | bias | kernel | calls | in step us (min-max) | in step total us | hot | cold weights | "
             "cold both | NN | transposed | cuBLAS | cuBLASLt | in step by the kernel before it |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in res["rows"]:
        a = r.get("alone", {})
        before = "; ".join(f"{b} {v['us']:.1f} ({v['calls']})" for b, v in
                           sorted(r["before"].items(), key=lambda kv: -kv[1]["calls"]))
        lines.append(f"| {r['m']}x{r['k']}x{r['n']} | {'yes' if r['bias'] else 'no'} | {r['kernel']} | {r['calls']} | "
                     f"{r['step_us']:.1f} ({r['step_min_us']:.1f}-{r['step_max_us']:.1f}) | {r['total_us']:.0f} | "
                     + " | ".join(f"{a[k]:.1f}" if k in a else "-" for k in ALONE_KEYS)
                     + f" | {before} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--source", default="synthetic:sdxl")
    ap.add_argument("--alone-top", type=int, default=8, help="time alone the shapes with the most step time")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_calls: needs a CUDA GPU")
    args.device, args.vae = "cuda", ""
    model, fp = load_engine(args)
    x = _inputs(args.source.removeprefix("synthetic:"), 1, args.size, torch.device("cuda"), model.dtype)
    fn = _step(model.backbone, x)
    run = lambda: fp.graphs.call(("gemm_calls", args.size), lambda *_: fn())  # noqa: E731
    calls = graph_calls(run)
    res = analyse(calls, eager_gemm_shapes(fn))
    for r in res["rows"][: args.alone_top]:
        if r["m"]:
            r["alone"] = alone_us(r["m"], r["k"], r["n"], r["bias"])
        print(f"{r['m']}x{r['k']}x{r['n']} {r['kernel']} x{r['calls']}: step {r['step_us']:.1f} us, alone "
              + ", ".join(f"{k} {v:.1f}" for k, v in r.get("alone", {}).items() if k != "pool"), file=sys.stderr, flush=True)
    write_results("gemm_calls", "cuda", {"source": args.source, "size": args.size, "kernels": len(calls),
                                         "step_kernel_us": sum(us for _, us in calls),
                                         "gemm_us": sum(r["total_us"] for r in res["rows"]), **res},
                  args.out_dir, markdown)


if __name__ == "__main__":
    main()
