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

from rtdiff_cluster.gc_pauses import GcPauses

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
        self.queue_capacity = Gauge("rtdiff_queue_capacity", "Frames the model's queue admits before it answers "
                                    "RESOURCE_EXHAUSTED (max_queue_size)", ["model"], registry=r)
        self.batch_size = Histogram("rtdiff_batch_size", "Frames per batch sent to a replica", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.streams_active = Gauge("rtdiff_streams_active", "Open StreamGenerate calls", ["model"], registry=r)
        self.replica_up = Gauge("rtdiff_replica_up", "1 when the replica is loaded and serving", ["model", "replica"], registry=r)
        self.replica_inflight = Gauge("rtdiff_replica_inflight_batches", "Batches a replica is computing",
                                      ["model", "replica"], registry=r)
        self.frame_energy = Histogram("rtdiff_frame_energy_joules", "GPU energy per frame", ["model"],
                                      buckets=JOULE_BUCKETS, registry=r)
        self._fps_window = fps_window_s
        self._models: dict[str, ModelSeries] = {}
        self._requests: dict[tuple[str, str, str], object] = {}
        self._replica_stats: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()
        self.gc_pauses = GcPauses.install()  # this process's collections, counted from here
        r.register(_PolledCollector(self))

    def request_done(self, model: str, method: str, code: str) -> None:
        key = (model, method, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(model, method, code)
        child.inc()

    def model(self, model: str) -> "ModelSeries":
        """The model's series with their label children resolved once (not per frame)."""
        series = self._models.get(model)
        if series is None:
            series = self._models[model] = ModelSeries(self, model)
        return series

    def set_replica_stats(self, model: str, replica: str, stats) -> None:
        with self._lock:
            self._replica_stats[(model, replica)] = stats

    def drop_replica_stats(self, model: str, replica: str) -> None:
        with self._lock:
            self._replica_stats.pop((model, replica), None)


class ModelSeries:
    def __init__(self, m: GatewayMetrics, model: str):
        self._m = m
        self.model = model
        self.fps = FrameRate(m._fps_window)
        self.frame_latency = m.frame_latency.labels(model)
        self.stage = {stage: m.stage_latency.labels(model, stage) for stage in STAGES}
        self.queue_depth = m.queue_depth.labels(model)
        self.queue_capacity = m.queue_capacity.labels(model)
        self.batch_size = m.batch_size.labels(model)
        self.frame_energy = m.frame_energy.labels(model)
        self.streams_active = m.streams_active.labels(model)
        self.queue_depth.set(0)
        self.streams_active.set(0)
        self._replicas: dict[str, ReplicaSeries] = {}

    def replica(self, name: str) -> "ReplicaSeries":
        r = self._replicas.get(name)
        if r is None:
            r = self._replicas[name] = ReplicaSeries(self._m, self.model, name)
        return r

    def frames_done(self, replica: str, n: int) -> None:
        self.replica(replica).frames.inc(n)
        self.fps.add(n)


class ReplicaSeries:
    def __init__(self, m: GatewayMetrics, model: str, replica: str):
        self.frames = m.frames.labels(model, replica)
        self.inflight = m.replica_inflight.labels(model, replica)
        self.up = m.replica_up.labels(model, replica)


class _PolledCollector:
    """Series read at scrape time: FPS over the window, and the replicas' last polled statistics."""

    def __init__(self, m: GatewayMetrics):
        self.m = m

    def collect(self):
        fps = GaugeMetricFamily("rtdiff_frames_per_second", "Frames per second over the sliding window", labels=["model"])
        for model, series in list(self.m._models.items()):
            fps.add_metric([model], series.fps.rate())
        yield fps
        pauses = self.m.gc_pauses
        gateway_gc = CounterMetricFamily("rtdiff_gateway_gc_pause_seconds", "Seconds the gateway process spent in "
                                         "Python garbage collections (every thread stopped), by generation",
                                         labels=["generation"])
        for g in range(3):
            gateway_gc.add_metric([str(g)], pauses.seconds[g])
        yield gateway_gc
        with self.m._lock:
            items = list(self.m._replica_stats.items())
        computed = CounterMetricFamily("rtdiff_replica_frames_computed", "Frames a replica computed since it started",
                                       labels=["model", "replica"])
        hits = CounterMetricFamily("rtdiff_prompt_cache_hits", "Prompt-embedding cache hits", labels=["model", "replica"])
        misses = CounterMetricFamily("rtdiff_prompt_cache_misses", "Prompt-embedding cache misses", labels=["model", "replica"])
        states = GaugeMetricFamily("rtdiff_replica_stream_states", "Per-stream states a replica holds",
                                   labels=["model", "replica"])
        power = GaugeMetricFamily("rtdiff_gpu_power_watts", "GPU power draw", labels=["model", "replica", "gpu"])
        power_limit = GaugeMetricFamily("rtdiff_gpu_power_limit_watts", "GPU power limit the driver enforces (NVML)",
                                        labels=["model", "replica", "gpu"])
        energy = CounterMetricFamily("rtdiff_gpu_energy_joules", "GPU energy counter (NVML)", labels=["model", "replica", "gpu"])
        util = GaugeMetricFamily("rtdiff_gpu_utilization_ratio", "GPU busy fraction (NVML)", labels=["model", "replica", "gpu"])
        mem = GaugeMetricFamily("rtdiff_gpu_memory_used_bytes", "GPU memory in use", labels=["model", "replica", "gpu"])
        memt = GaugeMetricFamily("rtdiff_gpu_memory_total_bytes", "GPU memory size", labels=["model", "replica", "gpu"])
        graphs = GaugeMetricFamily("rtdiff_cuda_graphs", "CUDA graphs a replica keeps captured", labels=["model", "replica"])
        graph_mem = GaugeMetricFamily("rtdiff_cuda_graph_memory_bytes", "Device memory a replica's captured graphs hold",
                                      labels=["model", "replica"])
        captures = CounterMetricFamily("rtdiff_cuda_graph_captures", "CUDA graph captures (a new shape bucket, or one "
                                       "captured again after eviction), by where: on the serving path (the frame "
                                       "waited for it) or aside (on a thread of its own)", labels=["model", "replica", "path"])
        deferred = CounterMetricFamily("rtdiff_cuda_graph_deferrals", "Launches that computed another way because "
                                       "their graph was being captured aside", labels=["model", "replica"])
        chunks = CounterMetricFamily("rtdiff_stream_chunks", "Chunks of image-to-image stream frames, by whether the "
                                     "chunk cache reused or recomputed them", labels=["model", "replica", "outcome"])
        from_cache = CounterMetricFamily("rtdiff_stream_frames_from_cache", "Stream frames answered from the chunk "
                                         "cache with nothing computed", labels=["model", "replica"])
        launches = CounterMetricFamily("rtdiff_stream_launches", "GPU launches that computed chunk-cache stream "
                                       "frames on single-GPU replicas: a frame, a region, or several frames' regions "
                                       "in one launch", labels=["model", "replica"])
        launched = CounterMetricFamily("rtdiff_stream_launched_frames", "Chunk-cache stream frames those launches "
                                       "computed (over rtdiff_stream_launches: frames per launch)", labels=["model", "replica"])
        busy = CounterMetricFamily("rtdiff_replica_compute_busy_seconds", "Seconds a replica's compute thread (its host "
                                   "work for every batch, in order) spent in jobs, by job: near 1 s per second, it is "
                                   "the replica's limit", labels=["model", "replica", "job"])
        cache_bytes = GaugeMetricFamily("rtdiff_stream_cache_bytes", "Memory the streams' chunk caches hold",
                                        labels=["model", "replica"])
        cache_streams = GaugeMetricFamily("rtdiff_stream_caches", "Streams with a chunk cache", labels=["model", "replica"])
        replica_gc = CounterMetricFamily("rtdiff_replica_gc_pause_seconds", "Seconds a replica's leader process spent "
                                         "in Python garbage collections (every thread stopped), by generation",
                                         labels=["model", "replica", "generation"])
        fp8_psnr = GaugeMetricFamily("rtdiff_fp8_fidelity_psnr_db", "An FP8 replica's warm-up frame against the same "
                                     "frame from the model as loaded (its dtype, eager): PSNR", labels=["model", "replica"])
        fp8_ssim = GaugeMetricFamily("rtdiff_fp8_fidelity_ssim", "The same comparison's SSIM (1: equal)",
                                     labels=["model", "replica"])
        for (model, replica), s in items:
            computed.add_metric([model, replica], s.frames_computed)
            if s.fp8_fidelity is not None:
                fp8_psnr.add_metric([model, replica], s.fp8_fidelity.psnr_db)
                fp8_ssim.add_metric([model, replica], s.fp8_fidelity.ssim)
            chunks.add_metric([model, replica, "reused"], s.stream_cache.chunks_reused)
            chunks.add_metric([model, replica, "recomputed"], s.stream_cache.chunks_recomputed)
            from_cache.add_metric([model, replica], s.stream_cache.frames_from_cache)
            launches.add_metric([model, replica], s.stream_cache.launches)
            launched.add_metric([model, replica], s.stream_cache.launched_frames)
            cache_bytes.add_metric([model, replica], s.stream_cache_bytes)
            cache_streams.add_metric([model, replica], s.stream_caches)
            for job, seconds in s.compute_busy_s.items():
                busy.add_metric([model, replica, job], seconds)
            for g, seconds in enumerate(s.gc_pause_s):
                replica_gc.add_metric([model, replica, str(g)], seconds)
            if s.graphs is not None:
                graphs.add_metric([model, replica], s.graphs.graphs)
                graph_mem.add_metric([model, replica], s.graphs.bytes)
                captures.add_metric([model, replica, "serving"], s.graphs.captures - s.graphs.aside)
                captures.add_metric([model, replica, "aside"], s.graphs.aside)
                deferred.add_metric([model, replica], s.graphs.deferred)
            hits.add_metric([model, replica], s.prompt_cache_hits)
            misses.add_metric([model, replica], s.prompt_cache_misses)
            states.add_metric([model, replica], s.streams)
            for g in s.gpus:
                labels = [model, replica, g.gpu]
                power.add_metric(labels, g.power_watts)
                power_limit.add_metric(labels, g.power_limit_watts)
                energy.add_metric(labels, g.energy_joules)
                util.add_metric(labels, g.utilization_ratio)
                mem.add_metric(labels, g.memory_used_bytes)
                memt.add_metric(labels, g.memory_total_bytes)
        # Every family is declared even without samples (GPU series on a CPU-only machine, graphs on
        # CPU replicas): the series are absent, not zero, and dashboards can still be checked
        # against the names the server declares.
        yield from (computed, hits, misses, states, chunks, from_cache, launches, launched, busy, cache_bytes, cache_streams, replica_gc,
                    power, power_limit, energy, util, mem, memt, graphs, graph_mem, captures, deferred, fp8_psnr, fp8_ssim)
