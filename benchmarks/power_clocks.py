#!/usr/bin/env python
"""Is the SDXL step bound by the GPU's power limit? Power, SM clock and the driver's clock-event
reasons sampled by NVML while work replays back to back, against the same work after idle gaps.

The 1024 step measured ~690 W on an H200 (11.8 J per 17.1 ms step, roofline runs), the board's
700 W limit. If the driver lowers the SM clock to hold that limit, every kernel of the step runs
slower than it does alone, and the step's time is set by its energy (bytes moved, FLOPs and their
precision) as much as by its kernels' efficiency. Cases, each for >= --seconds:

  sustained   the graphed step replayed back to back;
  gapped      one step, then --gap-ms idle, repeated (a stream that leaves the GPU headroom);
  gemm-large  a 8192^3 bf16 matmul back to back (what "the measured peak" runs);
  gemm-1280   1024 x 1280 x 1280 matmuls back to back (the step's most common linear).

Per case: median ms per call (CUDA events), the sampled power and SM clock (median, p10, p90),
and the fraction of samples in which NVML reports each clock-event reason (software power cap,
hardware slowdown, thermal). The clocks are only read, never set.

    python benchmarks/power_clocks.py --size 1024 --out-dir "$OUT"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from engine_bench import load_engine, write_results  # noqa: E402
from rtdiff_cluster.metrics.gpu_sampler import nvml_handle  # noqa: E402
from sharding import _inputs  # noqa: E402
from unet_profile import _step  # noqa: E402


_REASONS = {  # the clock-event reason bits this probe reports (nvml.h)
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
}


class Sampler:
    """NVML power (W), SM clock (MHz) and clock-event reasons every period_s, in a thread."""

    def __init__(self, device, period_s: float = 0.005):
        self.nvml, self.h = nvml_handle(device)
        self.period_s = period_s
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)

    def _run(self):
        nv, h = self.nvml, self.h
        reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
        while not self._stop.is_set():
            self.samples.append((nv.nvmlDeviceGetPowerUsage(h) / 1e3,
                                 nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM), int(reasons(h))))
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        watts = sorted(s[0] for s in self.samples)
        mhz = sorted(s[1] for s in self.samples)
        n = len(self.samples)
        pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
        return {"samples": n, "watts_p50": pct(watts, 0.5), "watts_p10": pct(watts, 0.1), "watts_p90": pct(watts, 0.9),
                "sm_mhz_p50": pct(mhz, 0.5), "sm_mhz_p10": pct(mhz, 0.1), "sm_mhz_p90": pct(mhz, 0.9),
                **{f"reason_{k}": sum(1 for s in self.samples if s[2] & bit) / n for k, bit in _REASONS.items()}}


def run_case(device, fn, seconds: float, gap_s: float = 0.0) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    times = []
    with Sampler(device) as sampler:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            times.append((a, b))
            if gap_s:
                b.synchronize()
                time.sleep(gap_s)
            elif len(times) % 16 == 0:
                b.synchronize()
        torch.cuda.synchronize(device)
    ms = [a.elapsed_time(b) for a, b in times]
    return {"calls": len(ms), "ms": statistics.median(ms), **sampler.summary()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--source", default="synthetic:sdxl")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--gap-ms", type=float, default=30.0)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    args.vae = ""
    device = torch.device(args.device)
    model, fp = load_engine(args)
    x = _inputs(args.source.removeprefix("synthetic:"), 1, args.size, device, model.dtype)
    step = _step(model.backbone, x)
    graphed = lambda: fp.graphs.call(("power", args.size), lambda *_: step())  # noqa: E731
    g = torch.Generator(device=device).manual_seed(0)
    big = [torch.randn(8192, 8192, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2)]
    a1280 = torch.randn(1024, 1280, device=device, dtype=torch.bfloat16, generator=g)
    w1280 = torch.randn(1280, 1280, device=device, dtype=torch.bfloat16, generator=g) / 1280 ** 0.5
    cases = {
        "sustained": (graphed, 0.0),
        "gapped": (graphed, args.gap_ms / 1e3),
        "gemm-large": (lambda: big[0] @ big[1], 0.0),
        "gemm-1280": (lambda: [a1280 @ w1280 for _ in range(50)], 0.0),
    }
    rows = []
    for name, (fn, gap) in cases.items():
        r = {"case": name, "gap_ms": gap * 1e3, **run_case(device, fn, args.seconds, gap)}
        rows.append(r)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    lines = [f"# Power and SM clock under load: {torch.cuda.get_device_name(device)}", "",
             f"synthetic SDXL step at {args.size}, batch 1, fast paths on ({'FP8' if args.fp8 else 'bf16'}), "
             f"graphed; {args.seconds:g} s per case; NVML sampled every 5 ms", "",
             "| case | ms per call | W p50 (p10-p90) | SM MHz p50 (p10-p90) | power cap | HW slowdown | thermal |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        thermal = max(r.get("reason_sw_thermal", 0), r.get("reason_hw_thermal", 0))
        lines.append(f"| {r['case']}{' (' + format(r['gap_ms'], 'g') + ' ms idle after each)' if r['gap_ms'] else ''} "
                     f"| {r['ms']:.2f} | {r.get('watts_p50', 0):.0f} ({r.get('watts_p10', 0):.0f}-{r.get('watts_p90', 0):.0f}) "
                     f"| {r.get('sm_mhz_p50', 0)} ({r.get('sm_mhz_p10', 0)}-{r.get('sm_mhz_p90', 0)}) "
                     f"| {r.get('reason_sw_power_cap', 0):.0%} | {r.get('reason_hw_slowdown', 0):.0%} | {thermal:.0%} |")
    lines.append("")
    lines.append("gemm-1280 calls are 50 matmuls each. Power cap, HW slowdown, thermal: the share of samples in "
                 "which NVML reported that clock-event reason.")
    text = "\n".join(lines) + "\n"
    write_results("power_clocks", args.device, {"size": args.size, "fp8": args.fp8, "seconds": args.seconds, "rows": rows},
                  args.out_dir, lambda _: text, tag="fp8" if args.fp8 else "")


if __name__ == "__main__":
    main()
