"""The benchmark scripts run end to end on CPU at tiny sizes and write complete results.

They are run for real on the device; these dry runs keep them runnable between device sessions
(a stub replica that no longer matched the replica's interface once went unnoticed until then).
The numbers here are CPU noise: only the results' shape and sanity are checked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(script: str, tmp_path: Path, *args: str, timeout: float = 300) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--out-dir", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = [p for p in tmp_path.glob("*.json")]
    assert result.with_suffix(".md").exists()
    return json.loads(result.read_text())


def test_gateway_overhead_runs_model_and_stub_rows(tmp_path):
    r = run("gateway_overhead.py", tmp_path, "--samples", "20", "--large-samples", "4", "--stream-frames", "10",
            "--stub-samples", "40", "--throughput-seconds", "0.5")
    kinds = {(row["engine"], row["kind"]) for row in r["latency"]}
    assert kinds == {("model", "unary"), ("model", "stream"), ("stub", "unary"), ("stub", "stream")}
    assert all(math.isfinite(row["overhead_p50_ms"]) for row in r["latency"])
    assert len(r["throughput"]) == 2 and all(t["gateway"]["fps"] > 0 and t["direct"]["fps"] > 0 for t in r["throughput"])


def test_knobs_reports_every_sampler_and_adaptive_choice(tmp_path):
    r = run("knobs.py", tmp_path, "--device", "cpu", "--size", "64", "--runs", "1")
    settings = {row["setting"] for row in r["rows"]}
    for sampler in ("euler", "ddim", "dpmpp", "lcm"):
        assert {f"{sampler}, {n} steps" for n in (1, 2, 4, 8)} <= settings
    eight = [row for row in r["rows"] if row["reference"] == "itself"]
    assert all(row["psnr_db"] == 99.0 for row in eight)
    chosen = [a["steps"] for a in r["adaptive"]]
    assert chosen == sorted(chosen) and 1 <= chosen[0] and chosen[-1] <= 8  # stricter targets never need fewer steps


def test_stream_serving_runs_every_case_through_the_cli(tmp_path):
    r = run("stream_serving.py", tmp_path, "--device", "cpu", "--frames", "6", "--size", "128", timeout=600)
    assert [row["case"] for row in r["rows"]][:3] == ["1-step, cache off"] * 3
    assert all(row["frames"] == 6 and row["fps"] > 0 for row in r["rows"])
    governed = r["rows"][-1]
    assert governed["target_fps"] > 0 and governed["steps_min"] >= governed["min_steps"]
    assert all(row["graph_captures"] == 0 for row in r["rows"])  # scraped from /metrics; a CPU replica has no graphs


def test_unet_profile_lists_the_step_kernels_by_size(tmp_path):
    r = run("unet_profile.py", tmp_path, "--device", "cpu", "--source", "synthetic:tiny-sdxl", "--sizes", "64,128")
    assert [s["size"] for s in r["sizes"]] == [64, 128]
    for s in r["sizes"]:
        assert s["kernels"] == sum(row["count"] for row in s["table"]) > 0
        assert math.isclose(s["kernel_ms"], sum(row["ms"] for row in s["table"]), rel_tol=1e-6)
        assert [row["ms"] for row in s["table"]] == sorted((row["ms"] for row in s["table"]), reverse=True)
