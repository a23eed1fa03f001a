"""End-to-end tests of the `rtdiff` CLI: real subprocesses, a real local Ray, real gRPC over loopback.

One `rtdiff serve --tp 2` process (module fixture) serves `synthetic:tiny` sharded over two ranks
(gloo on CPU), so every client test also exercises a tensor-parallel replica; the client commands
run against it as separate processes. The SIGTERM drain test is the LAST test of this module: it stops that
shared server itself, so it must stay at the bottom of the file.
"""

from __future__ import annotations

import os
import re
import signal
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from conftest import metric, scrape
from rtdiff_cluster.cli import free_port, stop_process, wait_serving

CLI = [sys.executable, "-m", "rtdiff_cluster.cli"]
STARTUP_TIMEOUT_S = 180
CLIENT_TIMEOUT_S = 90
MODEL = "synthetic:tiny"


# ---- helpers --------------------------------------------------------------------------------

def run_cli(*args: str, timeout: float = CLIENT_TIMEOUT_S, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m rtdiff_cluster.cli ARGS`; on timeout stops it with SIGTERM (so a `serve` that
    unexpectedly started shuts its Ray down) before failing the test."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"`rtdiff {' '.join(args)}` ran past {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def describe(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def health_status(stub) -> str:
    """SERVING / NOT_SERVING / ..., or the gRPC error code name when the check fails."""
    try:
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    except grpc.RpcError as e:
        return f"rpc-error:{e.code().name}"


@dataclass
class Server:
    proc: subprocess.Popen
    target: str
    metrics_port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, f"server exited with {self.proc.returncode}\n{self.log()[-4000:]}"


# ---- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    port = free_port()
    metrics_port = free_port()
    while metrics_port == port:
        metrics_port = free_port()
    log_path = workdir / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [*CLI, "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), "--tp", "2",
             "--max-queue-delay-ms", "5"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    srv = Server(proc, f"127.0.0.1:{port}", metrics_port, log_path)
    try:
        try:
            wait_serving(srv.target, STARTUP_TIMEOUT_S, proc)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"server did not become SERVING: {e}\n{srv.log()[-4000:]}")
        yield srv
    finally:
        stop_process(proc, 60)


# ---- serve: configuration errors (no server needed) -----------------------------------------

@pytest.mark.parametrize("flags, field", [
    (["--model", "nosuch:model"], "models[0].source"),
    (["--model", "synthetic:nosuch"], "models[0].source: unknown preset"),
    (["--model", "."], "model_index.json: missing"),
    (["--replicas", "0"], "models[0].replicas"),
    (["--tp", "3"], "models[0].tp: tp: 3 does not divide"),
    (["--model", "synthetic:tiny-flux", "--cfg-parallel", "2"], "models[0].cfg_parallel"),
])
def test_serve_rejects_bad_config(flags, field, tmp_path):
    t0 = time.monotonic()
    r = run_cli("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port", "-1", *flags,
                timeout=60, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, describe(r)
    assert field in r.stderr, describe(r)
    assert "error" in r.stderr.lower(), describe(r)
    # Rejected before Ray starts: only the interpreter and imports take time.
    assert elapsed < 30, f"took {elapsed:.1f} s\n{describe(r)}"


# ---- generate ------------------------------------------------------------------------------

def test_generate_writes_png(server, tmp_path):
    server.assert_alive()
    out = tmp_path / "out.png"
    r = run_cli("generate", "--server", server.target, "--prompt", "a lighthouse at dusk", "--width", "128",
                "--height", "64", "--steps", "2", "--seed", "3", "-o", str(out))
    assert r.returncode == 0, describe(r)
    assert out.is_file(), describe(r)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (128, 64)
        assert im.mode == "RGB"
    assert f"wrote {out} (128x64, seed 3)" in r.stdout, describe(r)
    # The embedded model is synthetic: the CLI says its images are noise.
    assert "note:" in r.stdout and MODEL in r.stdout and "noise" in r.stdout, describe(r)


def test_generate_is_deterministic_per_seed(server, tmp_path):
    server.assert_alive()

    def gen(seed: int, name: str) -> np.ndarray:
        out = tmp_path / name
        r = run_cli("generate", "--server", server.target, "--prompt", "a red fox", "--width", "128", "--height", "64",
                    "--steps", "2", "--seed", str(seed), "-o", str(out))
        assert r.returncode == 0, describe(r)
        return pixels(out)

    a = gen(7, "a.png")
    b = gen(7, "b.png")
    c = gen(8, "c.png")
    assert a.shape == (64, 128, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "a different seed gave the same pixels"


@pytest.mark.parametrize("flags, field", [
    (["--width", "100"], "width"),
    (["--steps", "999"], "steps"),
])
def test_generate_invalid_argument(server, tmp_path, flags, field):
    server.assert_alive()
    out = tmp_path / "bad.png"
    r = run_cli("generate", "--server", server.target, "--prompt", "x", *flags, "-o", str(out))
    assert r.returncode != 0, describe(r)
    assert "INVALID_ARGUMENT" in r.stderr, describe(r)
    assert field in r.stderr, describe(r)
    assert not out.exists()


def test_generate_unreachable_server(tmp_path):
    closed = free_port()  # bound then closed: nothing listens there
    out = tmp_path / "never.png"
    r = run_cli("generate", "--server", f"127.0.0.1:{closed}", "--prompt", "x", "--width", "64", "--height", "64",
                "--steps", "1", "-o", str(out), timeout=60)
    assert r.returncode != 0, describe(r)
    assert "UNAVAILABLE" in r.stderr, describe(r)
    assert not out.exists()


def test_generate_several_images(server, tmp_path):
    server.assert_alive()
    out = tmp_path / "x.png"
    r = run_cli("generate", "--server", server.target, "--prompt", "three of them", "--width", "64", "--height", "64",
                "--steps", "1", "--seed", "10", "--num-images", "3", "-o", str(out))
    assert r.returncode == 0, describe(r)
    paths = [tmp_path / f"x-{i}.png" for i in range(3)]
    for i, p in enumerate(paths):
        assert p.is_file(), describe(r)
        with Image.open(p) as im:
            assert (im.format, im.size, im.mode) == ("PNG", (64, 64), "RGB")
        assert f"wrote {p} (64x64, seed {10 + i})" in r.stdout, describe(r)
    assert not out.exists(), "a multi-image request must not also write the unsuffixed path"
    assert not (tmp_path / "x-3.png").exists()
    imgs = [pixels(p) for p in paths]
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[1], imgs[2])


# ---- models --------------------------------------------------------------------------------

def test_models_lists_limits(server):
    server.assert_alive()
    r = run_cli("models", "--server", server.target)
    assert r.returncode == 0, describe(r)
    lines = [line for line in r.stdout.splitlines() if line.startswith(MODEL)]
    assert len(lines) == 1, describe(r)
    line = lines[0]
    for expected in ("family unet", "size 64..1024 step 64", "(default 256x256)", "steps 1..50", "(default 4)",
                     "max images 8", "replicas 1/1", "synthetic"):
        assert expected in line, f"{expected!r} missing from {line!r}"
    # The startup log says how the replica is sharded.
    assert re.search(r"replica synthetic:tiny/0 loaded .*tp=2", server.log()), server.log()[-3000:]


# ---- stream --------------------------------------------------------------------------------

STREAM_SUMMARY = re.compile(
    r"frames (?P<frames>\d+)\s+latency p50 (?P<p50>\S+) ms\s+p95 (?P<p95>\S+) ms\s+p99 (?P<p99>\S+) ms\s+"
    r"sustained (?P<fps>\S+) fps")


def test_stream_reports_latency_and_fps(server, tmp_path):
    server.assert_alive()
    out_dir = tmp_path / "frames"
    r = run_cli("stream", "--server", server.target, "--prompt", "a flowing river", "--frames", "6", "--width", "64",
                "--height", "64", "--steps", "1", "--out-dir", str(out_dir))
    assert r.returncode == 0, describe(r)
    m = STREAM_SUMMARY.search(r.stdout)
    assert m, describe(r)
    assert int(m["frames"]) == 6
    p50, p95, p99, fps = (float(m[k]) for k in ("p50", "p95", "p99", "fps"))
    for name, v in (("p50", p50), ("p95", p95), ("p99", p99), ("fps", fps)):
        assert np.isfinite(v) and v > 0, f"{name} = {v}\n{describe(r)}"
    assert p50 <= p95 <= p99
    assert f"replica {MODEL}/0" in r.stdout, describe(r)
    frames = sorted(out_dir.glob("frame-*.png"))
    assert [p.name for p in frames] == [f"frame-{i:05d}.png" for i in range(6)]
    for p in frames:
        with Image.open(p) as im:
            assert im.size == (64, 64)


@pytest.mark.parametrize("clip_format", ["raw", "jpeg"])
def test_stream_of_a_test_clip(server, tmp_path, clip_format):
    """--clip sends a generated clip for image-to-image, as raw pixels or as JPEG files."""
    server.assert_alive()
    r = run_cli("stream", "--server", server.target, "--prompt", "a clip", "--frames", "4", "--width", "64",
                "--height", "64", "--steps", "2", "--clip", "moving", "--clip-format", clip_format, "--json")
    assert r.returncode == 0, describe(r)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 4, summary


# ---- metrics -------------------------------------------------------------------------------

def test_metrics_endpoint(server, tmp_path):
    server.assert_alive()
    # Its own OK and INVALID_ARGUMENT requests, so the test holds when run alone too.
    ok = run_cli("generate", "--server", server.target, "--prompt", "m", "--width", "64", "--height", "64",
                 "--steps", "1", "-o", str(tmp_path / "m.png"))
    assert ok.returncode == 0, describe(ok)
    bad = run_cli("generate", "--server", server.target, "--prompt", "m", "--width", "100", "-o", str(tmp_path / "n.png"))
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr, describe(bad)

    samples = scrape(server.metrics_port)
    assert metric(samples, "rtdiff_frames_total", model=MODEL) > 0
    for code in ("OK", "INVALID_ARGUMENT"):
        assert metric(samples, "rtdiff_requests_total", model=MODEL, method="Generate", code=code) >= 1, code


# ---- SIGTERM drain: must stay the LAST test, it stops the module's server -------------------

def test_sigterm_drains_in_flight_request(server, tmp_path):
    server.assert_alive()
    proc = server.proc
    out = tmp_path / "big.png"
    result: dict[str, subprocess.CompletedProcess] = {}

    def generate() -> None:
        result["r"] = run_cli("generate", "--server", server.target, "--prompt", "a slow one", "--width", "512",
                              "--height", "512", "--steps", "20", "--seed", "1", "-o", str(out), timeout=120)

    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health_status(health) == "SERVING"

        worker = threading.Thread(target=generate, daemon=True)
        t_start = time.monotonic()
        worker.start()
        # Wait until the request really is on a replica (the client needs a moment to start), at least 0.5 s.
        end = t_start + 30
        while True:
            time.sleep(0.1)
            assert worker.is_alive(), f"generate finished before SIGTERM was sent: {result.get('r')}"
            inflight = metric(scrape(server.metrics_port), "rtdiff_replica_inflight_batches")
            if inflight >= 1 and time.monotonic() - t_start >= 0.5:
                break
            assert time.monotonic() < end, "the generate request never reached a replica"

        proc.send_signal(signal.SIGTERM)
        # Health right after the signal, then until the server is gone: never SERVING again.
        statuses = [health_status(health)]
        rejected = None
        while proc.poll() is None and worker.is_alive():
            if rejected is None:
                # A new request during the drain is turned away.
                rejected = run_cli("generate", "--server", server.target, "--prompt", "late", "--width", "64",
                                   "--height", "64", "--steps", "1", "-o", str(tmp_path / "late.png"), timeout=60)
            statuses.append(health_status(health))
            time.sleep(0.1)

    worker.join(120)
    assert not worker.is_alive(), "the in-flight generate did not finish"
    r = result["r"]
    assert r.returncode == 0, describe(r)
    with Image.open(out) as im:
        assert im.size == (512, 512)

    assert "SERVING" not in statuses, f"health after SIGTERM: {statuses}"
    assert all(s == "NOT_SERVING" or s.startswith("rpc-error:") for s in statuses), statuses
    if rejected is not None:
        assert rejected.returncode != 0, describe(rejected)
        assert "UNAVAILABLE" in rejected.stderr, describe(rejected)
        assert not (tmp_path / "late.png").exists()

    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running 60 s after SIGTERM\n{server.log()[-4000:]}")
    log = server.log()
    assert code == 0, f"server exited with {code}\n{log[-4000:]}"
    assert "draining" in log, log[-4000:]
    assert "drained" in log and "stopped" in log, log[-4000:]
