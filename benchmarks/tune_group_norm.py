#!/usr/bin/env python
"""group_norm_silu's launch geometry against the GroupNorm calls an SDXL UNet step really makes.

The kernel's plan (kernels/group_norm_silu.py `_plan`) has module-level knobs: elements per tile,
warps, programs per SM (how finely H*W is cut into chunks) and the widest channels-last channel
block. The micro-benchmark (kernels/bench_norms.py) times a few square shapes one at a time; a step
calls the kernel 46 times on a dozen shapes, most of them small (32x32 and 64x64 latents), where a
program's fixed cost, not its bytes, sets the time. This script

  1. records every group_norm_silu call of one eager step of the fast-path UNet at each size
     (shape, memory format, groups, affine, SiLU, the time-embedding offset),
  2. for each knob set, times the step's calls back to back inside one CUDA graph, as a captured
     step runs them (kernels/_bench.py bench_us), and checks every call against the fp32 reference,
  3. writes a table: GPU microseconds of GroupNorm per step at each size, per knob set.

    python benchmarks/tune_group_norm.py --sizes 1024,512 --out-dir DIR [--budget-s 300]

GPU only. A knob set's first pass compiles its kernel variants; the budget stops the sweep
(later knob sets are reported as not run).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from engine_bench import load_engine, write_results  # noqa: E402
from sharding import _inputs  # noqa: E402

KNOBS = ("_TILE_ELEMS", "_NUM_WARPS", "_PROGRAMS_PER_SM", "_MAX_BLOCK_C_CL")


def knob_sets(default: tuple) -> list[tuple]:
    """The shipped knobs first, then the grid: fewer, fatter programs are the hypothesis (a 32x32
    latent's GroupNorm is cut into ~350 one-tile programs at 4 per SM)."""
    grid = itertools.product((4096, 8192, 16384), (4, 8), (1, 2, 4), (256, 512))
    return [default] + [k for k in grid if k != default]


def record_calls(model, size: int, device) -> list[dict]:
    """Every group_norm_silu call of one eager UNet step at size x size."""
    import rtdiff_kernels.group_norm_silu as gn

    calls, original = [], gn.group_norm_silu

    def recording(x, num_groups, weight, bias, eps, silu=True, channel_offset=None):
        calls.append(dict(shape=tuple(x.shape), channels_last=x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                          and not x.is_contiguous(), groups=num_groups, weight=weight is not None,
                          bias=bias is not None, eps=eps, silu=silu,
                          offset=None if channel_offset is None else tuple(channel_offset.shape), dtype=x.dtype))
        return original(x, num_groups, weight, bias, eps, silu, channel_offset)

    gn.group_norm_silu = recording
    try:
        x = _inputs("sdxl", 1, size, device, model.dtype)
        with torch.no_grad():
            model.backbone(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                           added_cond_kwargs=x["added_cond_kwargs"])
        torch.cuda.synchronize(device)
    finally:
        gn.group_norm_silu = original
    return calls


def materialise(calls: list[dict], device) -> list[tuple]:
    g = torch.Generator(device).manual_seed(0)
    out = []
    for c in calls:
        x = torch.randn(c["shape"], device=device, dtype=c["dtype"], generator=g) * 2 + 0.5
        if c["channels_last"]:
            x = x.to(memory_format=torch.channels_last)
        ch = c["shape"][1]
        w = torch.randn(ch, device=device, dtype=c["dtype"], generator=g) if c["weight"] else None
        b = torch.randn(ch, device=device, dtype=c["dtype"], generator=g) if c["bias"] else None
        t = torch.randn(c["offset"], device=device, dtype=c["dtype"], generator=g) if c["offset"] else None
        out.append((x, c["groups"], w, b, c["eps"], c["silu"], t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,512")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop sweeping after this long")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_group_norm: needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    args.device, args.source, args.vae = "cuda", "synthetic:sdxl", ""
    device = torch.device("cuda")
    model, _ = load_engine(args)  # the fast paths patch the backbone in place

    import rtdiff_kernels.group_norm_silu as gn
    from rtdiff_kernels._bench import bench_us

    sizes = [int(s) for s in args.sizes.split(",")]
    recorded = {s: record_calls(model, s, device) for s in sizes}
    inputs = {s: materialise(recorded[s], device) for s in sizes}
    refs = {s: [gn.group_norm_silu_reference(x.float(), gr, w.float() if w is not None else None,
                                              b.float() if b is not None else None, eps, silu,
                                              t.float() if t is not None else None)
                for x, gr, w, b, eps, silu, t in inputs[s]] for s in sizes}
    # The tolerance: the shipped knobs' own worst error (bf16 output rounding) times 2, per size.
    default = tuple(getattr(gn, k) for k in KNOBS)
    t_start = time.monotonic()
    rows, base_err = [], {}
    for knobs in knob_sets(default):
        if time.monotonic() - t_start > args.budget_s:
            rows.append({"knobs": dict(zip(KNOBS, knobs)), "skipped": "over the budget"})
            continue
        for k, v in zip(KNOBS, knobs):
            setattr(gn, k, v)
        gn._plan.cache_clear()
        t0 = time.monotonic()
        row = {"knobs": dict(zip(KNOBS, knobs)), "default": knobs == default}
        try:
            for s in sizes:
                err = max((gn.group_norm_silu(*call).float() - ref).abs().max().item()
                          for call, ref in zip(inputs[s], refs[s]))
                base_err.setdefault(s, err)
                row[f"err_{s}"] = err
                row[f"ok_{s}"] = err <= 2 * base_err[s] + 1e-6
                calls = inputs[s]
                row[f"us_{s}"] = bench_us(lambda: [gn.group_norm_silu(*c) for c in calls])
        except Exception as e:  # noqa: BLE001 - a knob set the kernel cannot compile is a result, not a crash
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["seconds"] = time.monotonic() - t0
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row["knobs"].items()),
              " ".join(f"{s}: {row.get(f'us_{s}', float('nan')):.1f} us" for s in sizes), f"({row['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    for k, v in zip(KNOBS, default):
        setattr(gn, k, v)
    shapes = {s: sorted({(c["shape"], c["channels_last"], bool(c["offset"])) for c in recorded[s]}) for s in sizes}
    write_results("tune_group_norm", "cuda", {
        "sizes": sizes, "calls_per_step": {str(s): len(recorded[s]) for s in sizes},
        "shapes": {str(s): [[list(sh), cl, off] for sh, cl, off in shapes[s]] for s in sizes},
        "rows": rows}, args.out_dir, markdown)


def markdown(r: dict) -> str:
    sizes = r["sizes"]
    lines = [f"# group_norm_silu launch geometry on an SDXL step's calls: {r.get('gpu_name')} ({r['date']})", "",
             f"torch {r.get('torch')}; calls per step: " + ", ".join(f"{s}: {r['calls_per_step'][str(s)]}" for s in sizes)
             + ". GPU time of all of a step's GroupNorm calls back to back in a CUDA graph (median).", "",
             "| tile elems | warps | programs/SM | max channels (cl) | " + " | ".join(f"{s} us" for s in sizes)
             + " | " + " | ".join(f"{s} max err" for s in sizes) + " | note |",
             "|--:|--:|--:|--:|" + "--:|" * (2 * len(sizes)) + "---|"]
    done = [x for x in r["rows"] if all(f"us_{s}" in x and x[f"ok_{s}"] for s in sizes)]
    best = min(done, key=lambda x: sum(x[f"us_{s}"] for s in sizes)) if done else None
    for x in r["rows"]:
        k = x["knobs"]
        cells = [str(k["_TILE_ELEMS"]), str(k["_NUM_WARPS"]), str(k["_PROGRAMS_PER_SM"]), str(k["_MAX_BLOCK_C_CL"])]
        cells += [f"{x[f'us_{s}']:.1f}" if f"us_{s}" in x else "-" for s in sizes]
        cells += [f"{x[f'err_{s}']:.3g}" + ("" if x.get(f"ok_{s}", True) else " (over)") if f"err_{s}" in x else "-"
                  for s in sizes]
        note = "shipped" if x.get("default") else ""
        if x is best:
            note = (note + ", " if note else "") + "fastest"
        note = x.get("error") or x.get("skipped") or note
        lines.append("| " + " | ".join(cells + [note]) + " |")
    lines += ["", "Shapes per size (N, C, H, W; channels-last; with the time-embedding offset):", ""]
    for s in sizes:
        lines.append(f"- {s}: " + "; ".join(f"{tuple(sh)}{' cl' if cl else ''}{' +t' if off else ''}"
                                            for sh, cl, off in r["shapes"][str(s)]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
