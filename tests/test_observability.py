"""The Grafana dashboard and the Prometheus rules against a real Prometheus scraping a real server.

One `rtdiff serve` (synthetic:tiny on CPU, loopback) runs for the module, and one Prometheus
(scraping every second, evaluating deploy/prometheus/rules.yml every second) scrapes it. A short
bounded load goes through the real client: Generate calls, INVALID_ARGUMENT and RESOURCE_EXHAUSTED
refusals, and a paced stream. Then every dashboard query (variables substituted as Grafana
would), every recording rule and every alert expression is evaluated through Prometheus's HTTP API.

This machine has no GPU, so the server exports the GPU and CUDA-graph families with no samples.
For queries on those, the tests assert that every name they read is a family the server declares
and that Prometheus accepts the query. Beyond that, they evaluate those queries against a
second scrape target: the gateway's own metrics code (GatewayMetrics) fed with made-up NVML
readings and graph-cache counts under model "gpu-fixture". That target proves the queries' label
matching (power over its limit per gpu, for one) on the exact label sets the gateway emits; it
says nothing about NVML itself, which tests/test_gpu.py covers on the GPU machine.

Prometheus and promtool must be installed (scripts/tools/install-prometheus.sh): the tests fail,
not skip, without them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from promql_scan import (exposition_families, metric_names, selectors, series_names, substitute,
                         with_bool_comparisons)
from rtdiff_cluster.cli import free_port, stop_process, wait_serving

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "rtdiff-cluster.json"
INSTALLER = REPO / "scripts" / "tools" / "install-prometheus.sh"
SERVE = [str(Path(sys.executable).with_name("rtdiff")), "serve"]  # the installed console script, .venv/bin/rtdiff

MODEL = "synthetic:tiny"
FIXTURE_MODEL = "gpu-fixture"
FIXTURE_REPLICA = "gpu-fixture/0"
SCRAPE_S = 1
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval).
STEP_S = 1
RATE_INTERVAL_S = max(STEP_S + SCRAPE_S, 4 * SCRAPE_S)
MAX_QUEUE_SIZE = 6  # a Generate of 8 images is then refused at once: RESOURCE_EXHAUSTED, deterministically
STREAM_FRAMES = 40
STREAM_FPS = 10.0  # paced like a camera, so the stream is open across several scrapes
GPU_PREFIXES = ("rtdiff_gpu_", "rtdiff_cuda_graph", "rtdiff_frame_energy_joules")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH. Install Prometheus and promtool with "
                    f"`bash scripts/tools/install-prometheus.sh` (Debian's `prometheus` package).")
    return path


def load_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets(dash: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every query of every panel, rows' nested panels included."""
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((p, t))

    walk(dash["panels"])
    return out


def gpu_names(rules: list[dict]) -> set[str]:
    """Series that only a GPU replica fills: the raw GPU families and the rules built on them."""
    derived = set()
    changed = True
    while changed:  # rules may build on rules
        changed = False
        for r in rules:
            if "record" in r and r["record"] not in derived:
                names = metric_names(r["expr"])
                if any(n.startswith(GPU_PREFIXES) or n in derived for n in names):
                    derived.add(r["record"])
                    changed = True
    return derived


def is_gpu_query(expr: str, derived: set[str]) -> bool:
    return any(n.startswith(GPU_PREFIXES) or n in derived for n in metric_names(expr))


# ---- the running stack: server, GPU fixture target, Prometheus --------------------------------

class GpuFixtureTarget:
    """GatewayMetrics (the gateway's exporter code) with made-up NVML samples and graph-cache
    counts for one replica of FIXTURE_MODEL, advancing four times a second so that rates,
    increases and histogram quantiles over them have something to compute."""

    def __init__(self):
        from prometheus_client import start_http_server

        from rtdiff_cluster.metrics.gateway_metrics import GatewayMetrics

        self.metrics = GatewayMetrics(fps_window_s=10)
        self.series = self.metrics.model(FIXTURE_MODEL)
        self.frames = 0
        self.energy = 0.0
        self.captures = 0
        self.ticks = 0
        self._stop = threading.Event()
        self._tick()
        self.httpd, _ = start_http_server(0, addr="127.0.0.1", registry=self.metrics.registry)
        self.port = self.httpd.server_port
        self._thread = threading.Thread(target=self._run, name="gpu-fixture", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        from rtdiff_cluster.engine.graphs import GraphStats
        from rtdiff_cluster.engine.replica import ReplicaStats
        from rtdiff_cluster.metrics.gpu_sampler import GpuSample

        self.ticks += 1
        self.frames += 3
        power = 640.0 + 10.0 * (self.ticks % 5)
        self.energy += power * 0.25
        if self.ticks % 8 == 1:
            self.captures += 1
        for k in range(3):
            self.series.frame_energy.observe(0.9 + 0.2 * ((self.ticks + k) % 4))
        gpu = GpuSample(gpu="0", name="fixture", power_watts=power, power_limit_watts=700.0, energy_joules=self.energy,
                        utilization_ratio=0.9, memory_used_bytes=60 << 30, memory_total_bytes=141 << 30)
        graphs = GraphStats(graphs=3, bytes=1 << 30, captures=self.captures, evictions=0, replays=self.frames)
        self.metrics.set_replica_stats(FIXTURE_MODEL, FIXTURE_REPLICA, ReplicaStats(
            frames_computed=self.frames, batches=self.frames // 3, prompt_cache_hits=self.frames,
            prompt_cache_misses=1, prompt_cache_entries=1, streams=0, gpus=[gpu], graphs=graphs))

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._tick()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Stack:
    server: subprocess.Popen
    server_log: Path
    target: str
    metrics_port: int
    prometheus: subprocess.Popen
    prometheus_log: Path
    prom_url: str
    fixture: GpuFixtureTarget
    window: tuple[float, float] = (0.0, 0.0)  # the load, as Unix times: set by the `loaded` fixture

    def logs(self) -> str:
        return (f"--- rtdiff serve (tail) ---\n{self.server_log.read_text(errors='replace')[-3000:]}\n"
                f"--- prometheus (tail) ---\n{self.prometheus_log.read_text(errors='replace')[-3000:]}")

    def api(self, path: str, **params) -> object:
        """GET /api/v1/<path>; the `data` of a success, else an AssertionError with Prometheus's error."""
        url = f"{self.prom_url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.loads(e.read().decode() or "{}")
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus refused {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query_range(self, expr: str) -> list[dict]:
        start, end = self.window
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{STEP_S}s")["result"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query at `at`, by default at the end of the load's window."""
        return self.api("query", query=expr, time=f"{self.window[1] if at is None else at:.3f}")["result"]

    def exposition(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    prometheus_bin = tool("prometheus")
    tool("promtool")
    work = tmp_path_factory.mktemp("observability")
    port, metrics_port, prom_port = _free_ports(3)
    server_log = work / "serve.log"
    with open(server_log, "wb") as f:
        server = subprocess.Popen(
            [*SERVE, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
             "--model", MODEL, "--device", "cpu", "--max-queue-size", str(MAX_QUEUE_SIZE)],
            stdout=f, stderr=subprocess.STDOUT, cwd=work, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    fixture = prometheus = None
    try:
        fixture = GpuFixtureTarget()
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s",
                       "evaluation_interval": f"{SCRAPE_S}s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "rtdiff", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
                {"job_name": "rtdiff-gpu-fixture", "static_configs": [{"targets": [f"127.0.0.1:{fixture.port}"]}]},
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus_log = work / "prometheus.log"
        with open(prometheus_log, "wb") as f:
            # Started before the server is ready: Prometheus applies new targets only every 5 s.
            prometheus = subprocess.Popen(
                [prometheus_bin, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h"],
                stdout=f, stderr=subprocess.STDOUT, cwd=work)
        s = Stack(server, server_log, f"127.0.0.1:{port}", metrics_port, prometheus, prometheus_log,
                  f"http://127.0.0.1:{prom_port}", fixture)
        try:
            wait_serving(s.target, 120, server)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"rtdiff serve did not become SERVING: {e}\n{s.logs()}")
        deadline = time.monotonic() + 30
        while True:
            assert prometheus.poll() is None, f"prometheus exited with {prometheus.returncode}\n{s.logs()}"
            try:
                targets = s.api("targets")["activeTargets"]
                if len(targets) == 2 and all(t["health"] == "up" for t in targets):
                    break
            except (urllib.error.URLError, ConnectionError, AssertionError):
                targets = []
            assert time.monotonic() < deadline, f"Prometheus never scraped both targets: {targets}\n{s.logs()}"
            time.sleep(0.25)
        yield s
    finally:
        if prometheus is not None:
            stop_process(prometheus, 10)
        stop_process(server, 60)
        if fixture is not None:
            fixture.close()


@pytest.fixture(scope="module")
def loaded(stack):
    """Runs the load once, then waits until Prometheus has scraped its end and evaluated the
    rules on it. Bounded: 9 unary calls and one stream of STREAM_FRAMES frames, about 10 s."""
    from rtdiff_cluster.client.client import RtdiffClient
    from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

    start = time.time() - 2 * SCRAPE_S
    images = 0
    with RtdiffClient(stack.target, timeout_s=60) as c:
        def generate_ok(seed: int) -> int:
            return len(c.generate("a lighthouse at dusk", width=64, height=64, steps=1, seed=seed,
                                  num_images=2).images)

        def refused() -> None:
            for kw, code in ((dict(width=100), grpc.StatusCode.INVALID_ARGUMENT),
                             (dict(num_images=8), grpc.StatusCode.RESOURCE_EXHAUSTED)):
                with pytest.raises(grpc.RpcError) as err:
                    c.generate("refused", **{"width": 64, "height": 64, "steps": 1, **kw})
                assert err.value.code() == code, f"{kw}: {err.value.code()} {err.value.details()}"

        # The gateway creates a status code's counter at its first request, so Prometheus first sees
        # it with that request already counted and rate() cannot show it. Each code is used once,
        # scraped, and used again while Prometheus watches, as on a long-running server.
        images += generate_ok(0)
        refused()
        wait_for(stack, f'count(rtdiff_requests_total{{model="{MODEL}",method="Generate"}}) >= 3',
                 "the first requests to be scraped")
        for i in range(1, 5):
            images += generate_ok(i)
            time.sleep(0.5 * SCRAPE_S)
        refused()

        def paced():
            for i in range(STREAM_FRAMES):
                # A prompt change halfway: one more prompt-cache miss, then hits again.
                prompt = "a forest" if i == 0 else ("a river" if i == STREAM_FRAMES // 2 else "")
                yield pb.FrameRequest(frame_id=i, prompt=prompt, seed=i, width=64, height=64, steps=1)
                time.sleep(1.0 / STREAM_FPS)

        answered = [r.frame_id for r in c.stream(paced(), timeout_s=60)]
    assert answered == list(range(STREAM_FRAMES))
    frames = images + STREAM_FRAMES

    # Prometheus has the end of the load once it counts every frame and sees the stream closed;
    # two more cycles let every rule evaluate on that last scrape.
    wait_for(stack, f'sum(rtdiff_frames_total{{model="{MODEL}"}}) >= {frames} '
                    f'and on() sum(rtdiff_streams_active{{model="{MODEL}"}}) == 0', f"all {frames} frames to be scraped")
    time.sleep(2 * SCRAPE_S)
    stack.window = (start, time.time())
    return stack


def wait_for(stack: Stack, expr: str, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        got = stack.query(expr, at=time.time())
        if got:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what} ({expr}): {got}\n{stack.logs()}"
        time.sleep(0.25)


def grafana_variables(stack: Stack, gpu: bool) -> dict[str, str]:
    start, end = stack.window
    rng = f"{math.ceil(end - start)}s"
    model, replica = (FIXTURE_MODEL, FIXTURE_REPLICA) if gpu else (MODEL, f"{MODEL}/0")
    for value in (model, replica):
        # Grafana escapes regex metacharacters in multi-value variables; these names have none.
        assert not set(value) & set(".+*?()[]{}|^$\\"), value
    return {"model": model, "replica": replica, "datasource": "prometheus", "__interval": f"{STEP_S}s",
            "__rate_interval": f"{RATE_INTERVAL_S}s", "__range": rng, "__range_s": rng[:-1]}


def finite_values(result: list[dict]) -> list[float]:
    values = []
    for series in result:
        pairs = series.get("values") or [series["value"]]
        values += [float(v) for _, v in pairs if math.isfinite(float(v))]
    return values


def describe(result: list[dict]) -> str:
    return json.dumps(result)[:300] if result else "no series"


# ---- files alone: promtool, rule and dashboard structure --------------------------------------

def test_promtool_check_rules():
    r = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in r.stdout, r.stdout


def test_promtool_unit_tests_pass():
    r = subprocess.run([tool("promtool"), "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    alerts = {r["alert"] for r in load_rules() if "alert" in r}
    fires, quiet = set(), set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    assert alerts - fires == set(), f"alerts never shown firing in rules_test.yml: {sorted(alerts - fires)}"
    assert alerts - quiet == set(), f"alerts never shown quiet in rules_test.yml: {sorted(alerts - quiet)}"
    assert (fires | quiet) - alerts == set(), f"tests name alerts rules.yml lacks: {sorted((fires | quiet) - alerts)}"


@pytest.mark.parametrize("mutation", ["never fires", "always fires"])
def test_unit_tests_catch_a_broken_alert(mutation, tmp_path):
    """Each alert broken in turn (its expression empty, or every comparison made `bool` so that it
    fires wherever its series exist) must fail `promtool test rules`: the unit tests would notice."""
    promtool = tool("promtool")
    doc = yaml.safe_load(RULES.read_text())
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    survivors = []
    for gi, group in enumerate(doc["groups"]):
        for ri, rule in enumerate(group["rules"]):
            if "alert" not in rule:
                continue
            broken = json.loads(json.dumps(doc))
            expr = rule["expr"]
            broken["groups"][gi]["rules"][ri]["expr"] = ("vector(1) < 0" if mutation == "never fires"
                                                         else with_bool_comparisons(expr))
            (tmp_path / "rules.yml").write_text(yaml.safe_dump(broken, sort_keys=False))
            r = subprocess.run([promtool, "test", "rules", str(tmp_path / "rules_test.yml")], capture_output=True,
                               text=True, timeout=60)
            if r.returncode == 0:
                survivors.append(rule["alert"])
    assert survivors == [], f"rules_test.yml still passes with these alerts broken ({mutation}): {survivors}"


def test_rules_are_complete():
    rules = load_rules()
    records = [r["record"] for r in rules if "record" in r]
    assert len(records) == len(set(records)), "duplicate recording rule names"
    for name in records:
        # level:metric:operations, the Prometheus naming convention for recorded series
        assert name.count(":") == 2 and all(name.split(":")), name
    used = {n for _, t in dashboard_targets(load_dashboard()) for n in metric_names(t["expr"])}
    used |= {n for r in rules for n in metric_names(r["expr"])}
    assert set(records) - used == set(), f"recorded but read by no panel or rule: {sorted(set(records) - used)}"
    alerts = [r for r in rules if "alert" in r]
    assert len({a["alert"] for a in alerts}) == len(alerts), "duplicate alert names"
    expected = {"RtdiffFrameLatencyBudgetBurnFast", "RtdiffFrameLatencyBudgetBurnSlow", "RtdiffStreamFPSUnderTarget",
                "RtdiffQueueSaturated", "RtdiffRequestsShed", "RtdiffReplicaDown", "RtdiffModelUnavailable",
                "RtdiffGPUPowerAtLimit"}
    assert {a["alert"] for a in alerts} == expected
    for a in alerts:
        assert a.get("for"), f"{a['alert']}: no `for:`, it would fire on one bad evaluation"
        assert a.get("labels", {}).get("severity") in ("critical", "warning"), a["alert"]
        ann = a.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), f"{a['alert']}: summary and description needed"


def test_dashboard_model():
    d = load_dashboard()
    assert d["uid"] == "rtdiff-cluster" and d["title"]
    assert d["id"] is None, "a provisioned dashboard must not carry a database id"
    assert d["schemaVersion"] >= 39
    assert "__inputs" not in d, "the sidecar does not resolve import inputs: use the datasource variable"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for name, label in (("model", "model"), ("replica", "replica")):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        text = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        assert text.startswith("label_values(") and text.rstrip(")").endswith(f", {label}"), text
        assert v["multi"] and v["includeAll"]
    ids = []
    cells: set[tuple[int, int]] = set()
    rows = 0

    def walk(panels):
        nonlocal rows
        for p in panels:
            ids.append(p["id"])
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"panel {p['title']!r} leaves the 24-column grid"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"panel {p['title']!r} overlaps another at {x},{y}"
                    cells.add((x, y))
            if p["type"] == "row":
                rows += 1
                walk(p.get("panels", []))
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p.get("description"), f"panel {p['title']!r} has no description"
            refs = [t["refId"] for t in p["targets"]]
            assert p["targets"] and len(refs) == len(set(refs)), p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", p["title"]
                # Every series is filtered by the model variable, so the dashboard shows only what is chosen.
                for name, matchers in selectors(t["expr"]):
                    assert 'model=~"$model"' in matchers, f"{p['title']!r}: {name} is not filtered by $model"

    walk(d["panels"])
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert rows >= 6


def test_promql_scan_finds_names_and_rewrites_comparisons():
    expr = ('sum by (model, le) (rate(rtdiff_nope_bucket{model=~"$model", code!="OK"}[5m])) / on (model) '
            'group_left (x) rec:rtdiff_a:ratio > 0.5 and max without (replica) (rtdiff_b) == 0 or vector(0) offset 5m')
    assert metric_names(expr) == {"rtdiff_nope_bucket", "rec:rtdiff_a:ratio", "rtdiff_b"}
    rewritten = with_bool_comparisons(expr)
    assert "> bool 0.5" in rewritten and "== bool 0" in rewritten and 'code!="OK"' in rewritten
    assert substitute("rate(x[$__rate_interval]) ${model}", {"__rate_interval": "4s", "model": "m"}) == "rate(x[4s]) m"
    with pytest.raises(KeyError):
        substitute("x{a=~\"$unknown\"}", {})


def test_installer_is_quiet_when_installed():
    tool("prometheus")
    tool("promtool")
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr
    assert time.monotonic() - t0 < 5


# ---- against the running server ---------------------------------------------------------------

def test_queries_read_only_exported_series(stack):
    """No panel or rule reads a series the server does not export: names parsed out of each
    expression against the families of the real /metrics text plus the recorded series."""
    families = exposition_families(stack.exposition())
    rules = load_rules()
    allowed = series_names(families) | {r["record"] for r in rules if "record" in r}
    unknown = []
    for p, t in dashboard_targets(load_dashboard()):
        unknown += [f"panel {p['title']!r} {t['refId']}: {n}" for n in sorted(metric_names(t["expr"]) - allowed)]
    for r in rules:
        unknown += [f"rule {r.get('record') or r.get('alert')}: {n}" for n in sorted(metric_names(r["expr"]) - allowed)]
    assert unknown == [], "series not exported by the server:\n" + "\n".join(unknown)


def test_gpu_queries_use_declared_families_and_parse(stack):
    """This machine has no GPU: the server declares the GPU and CUDA-graph families (`# TYPE`) but
    has no samples for them. Every query on them must read only declared families, and Prometheus
    must accept it; their data is checked against the fixture target in the tests below."""
    families = series_names(exposition_families(stack.exposition()))
    rules = load_rules()
    derived = gpu_names(rules)
    records = {r["record"]: r["expr"] for r in rules if "record" in r}
    exprs = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p, t in dashboard_targets(load_dashboard())]
    exprs += [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in rules]
    gpu_exprs = [(where, e) for where, e in exprs if is_gpu_query(e, derived)]
    assert len(gpu_exprs) >= 12, "the dashboard's GPU and CUDA-graph panels went missing"
    now = time.time()
    for where, expr in gpu_exprs:
        raw = set()
        for n in metric_names(expr):
            raw |= metric_names(records[n]) if n in records else {n}
        assert raw <= families, f"{where} reads undeclared families: {sorted(raw - families)}"
        variables = dict(grafana_variables(stack, gpu=True), __range="60s", __range_s="60")
        stack.query(substitute(expr, variables), at=now)  # raises with Prometheus's error


def test_dashboard_variables_resolve(loaded):
    d = load_dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    start, end = loaded.window

    def label_values(v, model: str) -> list[str]:
        text = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        inner = text[len("label_values("):-1]
        selector, label = (s.strip() for s in inner.rsplit(",", 1))
        selector = substitute(selector, {"model": model})
        return loaded.api(f"label/{label}/values", **{"match[]": selector, "start": f"{start:.3f}", "end": f"{end:.3f}"})

    assert MODEL in label_values(variables["model"], ".*")
    assert label_values(variables["replica"], MODEL) == [f"{MODEL}/0"]


def test_dashboard_panels_return_data(loaded):
    """Every panel query, as Grafana would send it (range queries at a 1 s step, instant ones at
    the end), returns at least one finite value: for the CPU server's model, or for the GPU
    fixture's where the query reads GPU series."""
    derived = gpu_names(load_rules())
    empty = []
    checked = 0
    for p, t in dashboard_targets(load_dashboard()):
        gpu = is_gpu_query(t["expr"], derived)
        expr = substitute(t["expr"], grafana_variables(loaded, gpu))
        result = loaded.query(expr) if t.get("instant") else loaded.query_range(expr)
        checked += 1
        if not finite_values(result):
            empty.append(f"panel {p['title']!r} {t['refId']} ({'gpu fixture' if gpu else MODEL}): {expr}\n"
                         f"    -> {describe(result)}")
    assert checked >= 40
    assert empty == [], "panel queries without data:\n" + "\n".join(empty)


def test_recording_rules_return_data(loaded):
    rules = load_rules()
    derived = gpu_names(rules)
    empty = []
    for r in rules:
        if "record" not in r:
            continue
        model = FIXTURE_MODEL if r["record"] in derived else MODEL
        result = loaded.query_range(f'{r["record"]}{{model="{model}"}}')
        if not finite_values(result):
            empty.append(f"{r['record']} ({model}) -> {describe(result)}")
    assert empty == [], "recording rules without data:\n" + "\n".join(empty)


def test_alert_expressions_see_their_series(loaded):
    """An alert that is not firing returns nothing, which looks the same as an alert reading a
    series that does not exist. So each alert's expression is evaluated with its comparisons made
    `bool` (0 or 1 instead of filtering): it must return data for the model, which proves every
    series it reads exists with labels that match. Whether it fires when it should is
    rules_test.yml's job. Prometheus must also report every loaded rule healthy."""
    rules = load_rules()
    derived = gpu_names(rules)
    blind = []
    for r in rules:
        if "alert" not in r:
            continue
        model = FIXTURE_MODEL if is_gpu_query(r["expr"], derived) else MODEL
        result = [s for s in loaded.query_range(with_bool_comparisons(r["expr"])) if s["metric"].get("model") == model]
        if not finite_values(result):
            blind.append(f"{r['alert']} ({model}): {with_bool_comparisons(r['expr']).strip()}")
    assert blind == [], "alerts that see no series:\n" + "\n".join(blind)

    loaded_rules = [rule for g in loaded.api("rules")["groups"] for rule in g["rules"]]
    assert len(loaded_rules) == len(rules)
    unhealthy = [f"{x['name']}: {x['health']} {x.get('lastError', '')}" for x in loaded_rules
                 if x["health"] != "ok" or x.get("lastError")]
    assert unhealthy == [], unhealthy
