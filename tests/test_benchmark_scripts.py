"""The benchmark scripts run end to end on CPU at tiny sizes and write complete results.

They are run for real on the device; these dry runs keep them runnable between device sessions
(a stub replica that no longer matched the replica's interface once went unnoticed until then).
The numbers here are CPU noise: only the results' shape and sanity are checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
            "--stub-samples", "40", "--throughput-seconds", "0.5", "--stub-compute-ms", "0,5")
    kinds = {(row["engine"], row["kind"]) for row in r["latency"]}
    assert kinds == {(engine, kind) for engine in ("model", "stub", "stub 5 ms") for kind in ("unary", "stream")}
    slow = [row for row in r["latency"] if row["engine"] == "stub 5 ms"]
    assert all(row["direct"]["p50_ms"] >= 5 for row in slow)  # the stub took its time
    assert {row["engine"] for row in r["verdict"]["rows"]} == {"model", "stub"}
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


def test_stream_cache_runs_the_chosen_clip_and_settings_against_the_uncached_frames(tmp_path):
    r = run("stream_cache.py", tmp_path, "--device", "cpu", "--size", "128", "--frames", "3", "--clips", "10% moving",
            "--settings", "on, halo 0, 16 buckets", "--tag", "dry")
    assert [(row["clip"], row["setting"]) for row in r["rows"]] == [("10% moving", "off"),
                                                                    ("10% moving", "on, halo 0, 16 buckets")]
    off, tight = r["rows"]
    assert off["psnr_db"] == 99.0 and 0 < tight["computed_area"] < 1 and tight["psnr_static_db"] > 0
    assert all(p.name.endswith("-dry.json") or p.name.endswith("-dry.md") for p in tmp_path.iterdir())
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stream_cache.py"), "--device", "cpu",
                          "--settings", "on, halo 7"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "--settings: unknown ['on, halo 7']" in bad.stderr, bad.stderr[-500:]
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stream_cache.py"), "--device", "cpu",
                          "--clips", "10% moving,jumping"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "--clips: unknown ['jumping']" in bad.stderr, bad.stderr[-500:]


def test_stream_serving_runs_each_kind_of_case_through_the_cli(tmp_path):
    """Each kind of case (cache off at every window the overlap needs, with raw and JPEG input;
    the chunk cache with JPEG input; both governed ones), not every window of each: the cases
    share their code, and all fourteen took 70-110 s of CI's 20 minutes."""
    r = run("stream_serving.py", tmp_path, "--device", "cpu", "--frames", "6", "--size", "128", "--cpu-threads",
            "--cases", "1-step, cache off;1-step, chunk cache, JPEG;4 steps, governed to", "--windows", "2", timeout=600)
    assert [row["case"] for row in r["rows"]][:6] == (["1-step, cache off"] * 3 + ["1-step, cache off, JPEG input"] * 2
                                                      + ["1-step, chunk cache, JPEG input"])
    assert r["overlap"] is not None and set(r["overlap"]["by_window"]) == {"1", "2", "3"}  # JSON keys
    # The replica's compute thread did every batch's work (scraped from /metrics); on CPU it computes.
    assert all(row["compute_busy"].get("queue_batch", 0) > 0 for row in r["rows"])
    assert all("window_s" in row["cpu_threads"] for row in r["rows"])
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


@pytest.mark.parametrize("unfused", [False, True])
def test_dit_profile_lists_a_flux_steps_kernels(tmp_path, unfused):
    r = run("dit_profile.py", tmp_path, "--device", "cpu", "--source", "synthetic:tiny-flux", "--sizes", "64,128",
            *(["--unfused-blocks", "--unfused-qkv"] if unfused else []))
    assert [s["size"] for s in r["sizes"]] == [64, 128] and r["source"] == "synthetic:tiny-flux"
    assert r["blocks"] == ("diffusers' own" if unfused else "ours where fusable")
    assert (r["fused_qkv_modules"] == 0) == unfused  # tiny-flux: every block's attention, fused unless asked
    for s in r["sizes"]:
        assert s["graph_ms"] is None and s["kernels"] == sum(row["count"] for row in s["table"]) > 0
        assert [row["ms"] for row in s["table"]] == sorted((row["ms"] for row in s["table"]), reverse=True)


def test_unet_profile_of_a_whole_frame_times_the_host_too(tmp_path):
    r = run("unet_profile.py", tmp_path, "--device", "cpu", "--source", "synthetic:tiny-sdxl", "--sizes", "64", "--frame", "1")
    (s,) = r["sizes"]
    assert r["frame_steps"] == 1 and s["wall_ms"] > 0 and s["kernels"] > 0
    assert any("pipeline.py" in row["function"] and "launch" in row["function"] for row in s["host_profile"])


def test_launch_overlap_times_frames_one_by_one_and_pipelined(tmp_path):
    r = run("launch_overlap.py", tmp_path, "--device", "cpu", "--sizes", "64", "--frames", "3", "--blocking-copies")
    assert [row["case"] for row in r["rows"]] == ["text-to-image 1 step, 64", "image-to-image 2 steps at 0.5, 64"]
    assert r["launch"].startswith("blocking copies")
    assert all(row["one_by_one_ms"] > 0 and row["pipelined_ms"] > 0 and row["syncs_per_launch"] == 0 for row in r["rows"])


def test_new_bucket_times_each_new_shape_bucket(tmp_path):
    r = run("new_bucket.py", tmp_path, "--device", "cpu", "--size", "128")
    assert [row["bucket"] for row in r["rows"]] == ["batch 2 at 128", "batch 1 at 64x128", "region 64x64",
                                                    "batch 3 at 128"]
    assert all(row[k] > 0 for row in r["rows"] for k in ("first_ms", "second_ms", "replay_ms"))
    assert all(row["first_captures"] == row["second_captures"] == 0 for row in r["rows"])  # a CPU replica has no graphs
    assert len(r["warm_up_ms"]) == 1 and not r["eager_first"]  # the default: captured at the first call


def test_sharding_runs_the_scaling_layouts_and_checks_tp_against_tp(tmp_path):
    """The 8-GPU scaling run's layouts in miniature (gloo ranks on CPU): tp=1, 2 and 4 and
    tp=2 x cfg-parallel 2 at a video-style token count, each tp-only layout's output held to the
    lowest tp's (fp32 here: only summation order differs)."""
    r = run("sharding.py", tmp_path, "--models", "tiny-flux", "--device", "cpu", "--gpus", "4", "--tps", "1,2,4",
            "--dit-cfg", "--size", "128", "--tokens", "128", "--steps", "1", "--warmup", "1", "--no-fp32-reference",
            timeout=600)
    rows = {row["label"]: row for row in r["rows"]}
    assert set(rows) == {"tp=1 (diffusers eager)", "tp=2", "tp=4", "tp=2 x cfg-parallel 2"}, list(rows)
    assert all("error" not in row and row["ms"] > 0 for row in rows.values())
    assert [rows[k]["gpus"] for k in ("tp=2", "tp=4", "tp=2 x cfg-parallel 2")] == [2, 4, 4]
    assert rows["tp=1 (diffusers eager)"]["batch"] == 2 and rows["tp=2 x cfg-parallel 2"]["batch"] == 1  # CFG's batch
    for k in ("tp=2", "tp=4"):
        assert rows[k]["vs_lowest_tp"]["against"] == "tp=1 (diffusers eager)"
        assert rows[k]["vs_lowest_tp"]["rel_l2"] < 1e-5, rows[k]["vs_lowest_tp"]
        assert rows[k]["scaling_efficiency"] > 0
    assert r["tokens"] == 128 and any("no float32 reference" in n for n in r["notes"])


def test_stream_serving_through_a_sharded_replica(tmp_path):
    """The scaling run's end-to-end part: one case through a tp=2 replica (gloo ranks on CPU)."""
    r = run("stream_serving.py", tmp_path, "--device", "cpu", "--frames", "6", "--size", "128", "--tp", "2",
            "--cases", "4 steps, ungoverned", timeout=600)
    assert r["tp"] == 2 and r["engine_alone"] is None and r["target"] is None
    assert [row["case"] for row in r["rows"]] == ["4 steps, ungoverned"]
    assert r["rows"][0]["frames"] == 6 and r["rows"][0]["fps"] > 0 and r["rows"][0]["steps_min"] == 8


def test_region_host_times_and_profiles_each_part_of_a_frame(tmp_path):
    r = run("region_host.py", tmp_path, "--device", "cpu", "--size", "128", "--rounds", "2", "--batches", "1,2")
    assert [row["batch"] for row in r["rows"]] == [1, 2]
    assert all(row["host_ms_per_frame"] > 0 for row in r["rows"])
    assert sorted(r["profiles"]) == ["flush at 1 regions per launch", "flush at 2 regions per launch",
                                     "plan + join at 1 regions per launch", "plan + join at 2 regions per launch"]


def test_image_codec_times_pil_where_there_is_no_gpu(tmp_path):
    r = run("image_codec.py", tmp_path, "--sizes", "64,96", "--n", "3")
    assert [(x["size"], x["image"]) for x in r["rows"]] == [(s, i) for s in (64, 96) for i in ("clip frame", "grainy")]
    for x in r["rows"]:
        assert x["pil_encode_ms"] > 0 and x["pil_decode_ms"] > 0 and x["pil_444_bytes"] > x["pil_bytes"] > 0
        assert "nvjpeg_encode_ms" not in x  # CPU only here: the GPU rows need the device


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_threads_finds_a_busy_thread_by_its_own_name():
    """The sampler attributes a child process's spinning thread to the name it gave itself in the
    OS (rtdiff_cluster/thread_names.py); an idle named thread stays under the threshold."""
    import time

    sys.path.insert(0, str(REPO / "benchmarks"))
    import cpu_threads

    child = subprocess.Popen([sys.executable, "-c", """if True:
        import threading, time
        from rtdiff_cluster.thread_names import set_native_name
        def spin():
            set_native_name("rtdiff-spin")
            end = time.monotonic() + 30
            while time.monotonic() < end:
                pass
        def idle():
            set_native_name()  # its Python name, less our prefix
            time.sleep(30)
        for target, name in ((spin, "rtdiff-spinner"), (idle, "rtdiff-idle")):
            threading.Thread(target=target, name=name).start()
        print("started", flush=True)
        """], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "started"
        sampler = cpu_threads.ThreadSampler([os.getpid()], interval_s=0.05).start()
        t0 = time.monotonic()
        time.sleep(1.0)
        r = sampler.busiest(t0, time.monotonic())
        sampler.stop()
    finally:
        child.kill()
        child.wait()
    names = {t["thread"]: t for t in r["threads"]}
    assert names["spin"]["cores"] > 0.5 and names["spin"]["pid"] == child.pid, r
    assert "idle" not in names and r["window_s"] > 0.5
    assert any(p["pid"] == child.pid and p["cores"] > 0.5 for p in r["processes"])
    assert r["gpu_busy_pct"] is None  # no GPU asked for
