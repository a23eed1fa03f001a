"""A thread pool that counts how long its threads spend in each kind of job.

A single-GPU replica does its host work for every batch on one compute thread (decode inputs,
plan chunk-cache frames, queue launches). When that thread is busy nearly all the time it is the
replica's limit, whatever the GPU's own utilization says: a GPU fed with small launches stays busy
too. The counters answer that from /metrics (rtdiff_replica_compute_busy_seconds_total), by job.
A job's time includes what it waits for inside (a device-to-host read, the GIL): that is time the
thread cannot spend on anything else."""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor


class TimedPool(ThreadPoolExecutor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._busy_lock = threading.Lock()
        self._busy_s: dict[str, float] = {}

    def submit(self, fn, /, *args, **kwargs) -> Future:
        inner = fn.func if isinstance(fn, functools.partial) else fn
        name = getattr(inner, "__name__", None) or type(inner).__name__
        return super().submit(self._timed, name.lstrip("_"), fn, *args, **kwargs)

    def _timed(self, job: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - t0
            with self._busy_lock:
                self._busy_s[job] = self._busy_s.get(job, 0.0) + spent

    def busy_seconds(self) -> dict[str, float]:
        """Seconds spent in jobs so far, by job (the submitted function's name, less its leading
        underscores). A job that never returns (a follower's loop) is counted only if it ends."""
        with self._busy_lock:
            return dict(self._busy_s)

