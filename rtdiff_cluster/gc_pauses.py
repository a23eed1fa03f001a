"""Python's garbage collector in a serving process: the start-up heap frozen, the pauses counted.

A full (generation 2) collection walks every object the collector tracks, with the GIL held: no
thread of the process runs meanwhile. After start-up a gateway or replica process holds hundreds of
thousands of them (torch, diffusers, transformers, Ray, gRPC): on the 2-core VM a full collection
of a process with the tiny model loaded (432k objects) took 195-207 ms, and during a live stream
the gateway process ran one of 210 ms, its event loop and every stream stalled meanwhile (found by
logging each process's collections during benchmarks/stream_serving.py on CPU). gc.freeze() moves
everything alive at the end of start-up into a permanent generation the collector no longer walks,
so later full collections see only what serving allocated since; start-up garbage is collected
first, so freezing keeps nothing that was already dead. The price: a frozen object that serving
drops later is still freed by its reference count, but a reference cycle among such objects is
never collected. What start-up builds (the model, its graphs and caches, the gateway's state)
lives as long as the process anyway.

GcPauses counts the collections and their seconds per generation, for the metrics
(rtdiff_gateway_gc_pause_seconds_total, rtdiff_replica_gc_pause_seconds_total).
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger("rtdiff.gc")


class GcPauses:
    """This process's collections and the seconds they held the GIL, per generation, since install()."""

    _installed: "GcPauses | None" = None
    _lock = threading.Lock()

    def __init__(self):
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started = 0.0

    @classmethod
    def install(cls) -> "GcPauses":
        """The process's one tracker, its callback added to gc.callbacks at the first call."""
        with cls._lock:
            if cls._installed is None:
                cls._installed = cls()
                gc.callbacks.append(cls._installed._callback)
            return cls._installed

    def _callback(self, phase: str, info: dict) -> None:
        # Runs inside the collection, on whichever thread triggered it (it holds the GIL).
        if phase == "start":
            self._started = time.perf_counter()
            return
        s = time.perf_counter() - self._started
        g = info["generation"]
        self.seconds[g] += s
        self.collections[g] += 1


def freeze_startup_objects(where: str) -> int:
    """Collects the start-up garbage, then freezes every object still alive (gc.freeze): call once
    the process is ready to serve (again after later start-up work, such as a warm-up). Returns the
    objects frozen so far."""
    t = time.perf_counter()
    gc.collect()
    collect_s = time.perf_counter() - t
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%s: froze %d start-up objects out of the collector's walks (the full collection before took %.0f ms)",
             where, frozen, collect_s * 1e3)
    return frozen
