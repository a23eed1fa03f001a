"""The rtdiff_* Prometheus series, all exported by the gateway's /metrics endpoint.

Replicas live in other processes (Ray actors); the gateway polls their statistics and GPU samples
(metrics/gpu_sampler.py) and exports them here with a `replica` label, so one scrape target sees
the whole model. Each gateway owns its own CollectorRegistry, so several can live in one process.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
JOULE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250)
STAGES = ("queue", "batch_wait", "text_encode", "denoise", "decode", "encode")


class FrameRate:
    """Frames per second over a sliding window, kept as per-second buckets (bounded memory)."""

    def __init__(self, window_s: float):
        self.window = max(1, int(window_s))
        self._buckets: deque[list[int]] = deque()  # [second, count]
        self._lock = threading.Lock()

    def add(self, n: int, now: float | None = None) -> None:
        sec = int(now if now is not None else time.monotonic())
        with self._lock:
            if self._buckets and self._buckets[-1][0] == sec:
                self._buckets[-1][1] += n
            else:
                self._buckets.append([sec, n])
            self._trim(sec)

    def _trim(self, sec: int) -> None:
        while self._buckets and self._buckets[0][0] <= sec - self.window:
            self._buckets.popleft()

    def rate(self, now: float | None = None) -> float:
        sec = int(now if now is not None else time.monotonic())
        with self._lock:
            self._trim(sec)
            return sum(c for _, c in self._buckets) / self.window


class GatewayMetrics:
    def __init__(self, fps_window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        self.frame_latency = Histogram("rtdiff_frame_latency_seconds", "End-to-end latency of a frame in the gateway",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_latency = Histogram("rtdiff_frame_stage_seconds", "Per-stage latency of a frame",
                                       ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.frames = Counter("rtdiff_frames_total", "Frames computed and returned", ["model", "replica"], registry=r)
        self.requests = Counter("rtdiff_requests_total", "RPCs by terminal status code",
                                ["model", "method", "code"], registry=r)
        self.queue_depth = Gauge("rtdiff_queue_depth", "Frames waiting in the model's queue", ["model"], registry=r)
        self.batch_size = Histogram("rtdiff_batch_size", "Frames per batch sent to a replica", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.streams_active = Gauge("rtdiff_streams_active", "Open StreamGenerate calls", ["model"], registry=r)
        self.replica_up = Gauge("rtdiff_replica_up", "1 when the replica is loaded and serving", ["model", "replica"], registry=r)
        self.replica_inflight = Gauge("rtdiff_replica_inflight_batches", "Batches a replica is computing",
                                      ["model", "replica"], registry=r)
        self.frame_energy = Histogram("rtdiff_frame_energy_joules", "GPU energy per frame", ["model"],
                                      buckets=JOULE_BUCKETS, registry=r)
        self._fps_window = fps_window_s
        self._fps: dict[str, FrameRate] = {}
        self._replica_stats: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()
        r.register(_PolledCollector(self))

    def add_model(self, model: str) -> None:
        self._fps.setdefault(model, FrameRate(self._fps_window))
        self.queue_depth.labels(model).set(0)
        self.streams_active.labels(model).set(0)

    def frames_done(self, model: str, replica: str, n: int) -> None:
        self.frames.labels(model, replica).inc(n)
        self._fps[model].add(n)

    def set_replica_stats(self, model: str, replica: str, stats) -> None:
        with self._lock:
            self._replica_stats[(model, replica)] = stats

    def drop_replica_stats(self, model: str, replica: str) -> None:
        with self._lock:
            self._replica_stats.pop((model, replica), None)


class _PolledCollector:
    """Series read at scrape time: FPS over the window, and the replicas' last polled statistics."""

    def __init__(self, m: GatewayMetrics):
        self.m = m

    def collect(self):
        fps = GaugeMetricFamily("rtdiff_frames_per_second", "Frames per second over the sliding window", labels=["model"])
        for model, rate in self.m._fps.items():
            fps.add_metric([model], rate.rate())
        yield fps
        with self.m._lock:
            items = list(self.m._replica_stats.items())
        computed = CounterMetricFamily("rtdiff_replica_frames_computed", "Frames a replica computed since it started",
                                       labels=["model", "replica"])
        hits = CounterMetricFamily("rtdiff_prompt_cache_hits", "Prompt-embedding cache hits", labels=["model", "replica"])
        misses = CounterMetricFamily("rtdiff_prompt_cache_misses", "Prompt-embedding cache misses", labels=["model", "replica"])
        states = GaugeMetricFamily("rtdiff_replica_stream_states", "Per-stream states a replica holds",
                                   labels=["model", "replica"])
        power = GaugeMetricFamily("rtdiff_gpu_power_watts", "GPU power draw", labels=["model", "replica", "gpu"])
        energy = CounterMetricFamily("rtdiff_gpu_energy_joules", "GPU energy counter (NVML)", labels=["model", "replica", "gpu"])
        util = GaugeMetricFamily("rtdiff_gpu_utilization_ratio", "GPU busy fraction (NVML)", labels=["model", "replica", "gpu"])
        mem = GaugeMetricFamily("rtdiff_gpu_memory_used_bytes", "GPU memory in use", labels=["model", "replica", "gpu"])
        memt = GaugeMetricFamily("rtdiff_gpu_memory_total_bytes", "GPU memory size", labels=["model", "replica", "gpu"])
        for (model, replica), s in items:
            computed.add_metric([model, replica], s.frames_computed)
            hits.add_metric([model, replica], s.prompt_cache_hits)
            misses.add_metric([model, replica], s.prompt_cache_misses)
            states.add_metric([model, replica], s.streams)
            for g in s.gpus:
                labels = [model, replica, g.gpu]
                power.add_metric(labels, g.power_watts)
                energy.add_metric(labels, g.energy_joules)
                util.add_metric(labels, g.utilization_ratio)
                mem.add_metric(labels, g.memory_used_bytes)
                memt.add_metric(labels, g.memory_total_bytes)
        yield from (computed, hits, misses, states)
        # GPU families only when some replica has a GPU: absent, not zero, on CPU-only machines.
        if any(s.gpus for _, s in items):
            yield from (power, energy, util, mem, memt)
