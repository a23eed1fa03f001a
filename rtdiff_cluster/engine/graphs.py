"""CUDA graphs per shape bucket: a bounded LRU of captured calls with the memory each holds.

At batch 1 an SDXL step is ~1,500 kernel launches and a 1-step frame with a tiny VAE a few hundred
more; launched from Python one by one the GPU idles between them (DESIGN.md: 93 ms eager at 512x512
for 2 ms of work). Replaying a captured graph launches them all at once. A graph is fixed to its
input shapes, so the cache is keyed by the bucket (what the shapes depend on: batch, latent height
and width, and for a captured loop the schedule); a new resolution costs one capture (warm-up
runs plus the capture: tenths of a second), not a recompilation.

All graphs share one memory pool. Inside each graph its outputs are copied into buffers allocated
outside the pool, so what the pool holds is only intermediates, dead after every replay: any
graph may reuse another's, whatever the order of replays (they never run concurrently: one stream).
The pool then grows to about the largest graph's working set, not the sum of them all, so a
stream whose governor walks sizes, step counts and chunk-cache regions can keep every graph it
needs (with a pool per graph and at most 16 graphs, a governed SDXL stream allowed down to half
size recaptured 20 graphs in 240 measured frames, p99 1.0 s). The least recently used graph is
dropped beyond the count budget; beyond the byte budget (the pool plus every graph's static
inputs and outputs) all are dropped and the pool starts over.

A bucket is captured at its first call: two eager warm-up runs on a side stream (the lazy set-up a
graph must not contain: Triton's compiles and autotuning, cuDNN's plans, our own per-size caches),
the capture, a replay. With `eager_first` (fast_paths.graph_capture_at_call = 2) the first call
runs eagerly on the caller's inputs and the second captures without warm-up runs, the eager call
having done that set-up on the same thread. On an H200 that cut a new 768x1024 SDXL frame's
slowest call from 390-591 ms to 269-333 ms (then 103-135 ms for the capture), but a live stream
then pays two slow frames per new size and its p99 grew (benchmarks/NOTES.md), so it is off by
default.

Capture aside (fast_paths.graph_capture_aside): a caller that can do without a bucket for now (a
chunk-cache region, which its stream can compute as a larger captured region or the whole frame;
a frame at a size new to its stream, computed at the stream's last size; a loop of a schedule new
at its size, run step by step on graphs every schedule of that size shares; a batch size that
smaller captured sizes cover) asks `capture_aside`, which queues the capture on a thread of its
own and returns at once; `call` then finds the graph ready some frames later. The capture's 0.2-0.6 s of
host time (warm-up runs with the libraries' per-shape set-up, the recording) leaves the serving
path: a governed SDXL stream met 11 new buckets in 240 frames and its p99 was 1.68 s
(results/stream_serving-2026-11-24-*-final-jpeg.md). Captures, aside or not, run one at a time:
they share the pool. The capturing thread never replays: every replay stays on the callers'
stream, one after another, as the shared pool needs.

`torch.cuda.graphs.make_graphed_callables` targets autograd training steps (it captures a
backward too); inference needs only capture and replay, with the inputs copied into static
buffers, which is what this does.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from rtdiff_cluster.thread_names import set_native_name

log = logging.getLogger("rtdiff.graphs")

Fn = Callable[..., "torch.Tensor | tuple[torch.Tensor, ...]"]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]
    single: bool  # fn returned one tensor, not a tuple
    bytes: int
    capture_s: float
    fn: Fn  # kept alive with the graph: what it closes over (a schedule the graph copies from) is read by every replay
    replays: int = 0


SEEN_PER_GRAPH = 4  # buckets remembered as run once, per graph the cache may keep
# Eager runs before a capture aside: one does the lazy set-up on the capturing thread (Triton's
# compiles and autotuning, cuDNN's per-thread plans); a second costs another frame's host time,
# shared with the compute thread, while the stream it is for computes whole frames meanwhile.
ASIDE_WARMUP_RUNS = 1


@dataclass
class _Layout:
    """What a call returned: one tensor or a tuple, each output's shape, strides and dtype."""
    single: bool
    outputs: tuple[tuple[torch.Size, tuple[int, ...], torch.dtype], ...]

    @staticmethod
    def of(out) -> "_Layout":
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else tuple(out)
        # The strides empty_like would give (a dense tensor keeps its own, so channels-last stays
        # so; others become contiguous), found without allocating.
        return _Layout(single, tuple((o.shape, torch.empty_like(o, device="meta").stride(), o.dtype) for o in outs))

    def empty(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(torch.empty_strided(shape, stride, dtype=dtype, device=device) for shape, stride, dtype in self.outputs)


@dataclass
class GraphStats:
    graphs: int
    bytes: int
    captures: int
    evictions: int
    replays: int
    aside: int = 0  # of captures, those made off the caller's thread (capture_aside)
    deferred: int = 0  # calls turned back by capture_aside because their graph was not ready


class BucketNotReady(Exception):
    """A bucket's graph is being captured aside; the caller computes something else for now."""

    def __init__(self, key: Hashable):
        super().__init__(f"CUDA graph {key} is being captured aside")
        self.key = key


class GraphCache:
    """`call(key, fn, *inputs)` runs fn(*inputs) as a captured graph. fn must be a pure function of
    its tensor inputs on the cache's device: anything else it reads (Python numbers, module weights,
    the schedule) is frozen into the graph, so it must be part of the key, and device tensors it
    closes over are read again at every replay (the cache keeps fn, and so them, alive). The outputs are the
    graph's static buffers: a later replay of the same key overwrites them, so a caller that keeps
    them across calls clones them."""

    def __init__(self, device: torch.device, max_graphs: int, max_bytes: int, warmup_runs: int = 2,
                 eager_first: bool = False, capture_error_mode: str = "thread_local", aside: bool = False):
        """warmup_runs: eager runs on a side stream before a capture that no eager call preceded
        (eager_first=False, or a bucket whose first call was forgotten). capture_error_mode:
        torch.cuda.graph's; "global" makes other threads' synchronising calls fail the capture.
        aside: capture_aside queues captures on a thread of the cache's own."""
        if device.type != "cuda":
            raise ValueError(f"GraphCache: CUDA graphs need a CUDA device, got {device}")
        self.device = device
        self.max_graphs = max_graphs
        self.max_bytes = max_bytes
        self.warmup_runs = warmup_runs
        self.eager_first = eager_first
        self.capture_error_mode = capture_error_mode
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        # Buckets whose first call ran eagerly, with their outputs' layout (the capture allocates
        # its output buffers from it); bounded, oldest forgotten first.
        self._seen: OrderedDict[Hashable, _Layout] = OrderedDict()
        self.eager_calls = 0
        self._pool = None  # the shared pool's handle, made at the first capture
        self._pool_bytes = 0  # what the captures grew the device reservation by
        self.captures = 0
        self.evictions = 0
        self.aside = aside
        self.aside_captures = 0
        self.deferred = 0
        # One capture at a time (they share the pool), on any thread; re-entrant for _capture's
        # own evictions. _lock guards the dicts that the capturing thread and callers both change.
        self._capturing = threading.RLock()
        self._lock = threading.Lock()
        self._pending: set[Hashable] = set()  # queued or being captured aside
        self._failed_aside: set[Hashable] = set()  # their capture failed aside: the caller captures (and learns why)
        self._jobs: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def stats(self) -> GraphStats:
        g = list(self._graphs.values())  # a snapshot: the replica's stats call reads it from another thread
        return GraphStats(len(g), self._pool_bytes + sum(c.bytes for c in g), self.captures, self.evictions,
                          sum(c.replays for c in g), self.aside_captures, self.deferred)

    def call(self, key: Hashable, fn: Fn, *inputs: torch.Tensor):
        """fn(*inputs): eagerly at a bucket's first call (eager_first), captured at its second (or at
        its first without eager_first), replayed from then on."""
        entry = self._graphs.get(key)
        fresh = False
        if entry is None:
            layout = self._seen.get(key)
            if layout is None and self.eager_first:
                out = fn(*inputs)
                with self._lock:
                    self._seen[key] = _Layout.of(out)
                    while len(self._seen) > SEEN_PER_GRAPH * self.max_graphs:
                        self._seen.popitem(last=False)
                self.eager_calls += 1
                return out
            with self._capturing:  # waits for a capture aside in progress (perhaps this very bucket's)
                entry = self._graphs.get(key)
                if entry is None:
                    entry = self._capture(key, fn, inputs, layout, torch.cuda.current_stream(self.device))
                    fresh = True
        if not fresh:
            with self._lock:
                if key in self._graphs:
                    self._graphs.move_to_end(key)
            for static, x in zip(entry.inputs, inputs):
                if static.shape != x.shape or static.dtype != x.dtype:
                    raise ValueError(f"graph {key}: input {tuple(x.shape)} {x.dtype} does not match the captured "
                                     f"{tuple(static.shape)} {static.dtype}; the key must cover every shape")
                static.copy_(x, non_blocking=True)
        entry.graph.replay()
        entry.replays += 1
        return entry.outputs[0] if entry.single else entry.outputs

    def capture_aside(self, key: Hashable, fn: Fn, *inputs: torch.Tensor, count: bool = True) -> bool:
        """Queues key's capture on the cache's own thread, unless it is captured or queued already;
        the inputs are copied now, in the calling stream's order (the caller may overwrite them).
        True: the caller must not call this bucket now (BucketNotReady) and computes something
        else (counted in stats' deferred, unless count is False: a launch that asks about several
        buckets counts once). False: call it now (it is captured, aside is off, or its capture
        failed aside: called, it is captured on the caller's thread, where a failure reaches the
        caller)."""
        if not self.aside or key in self._graphs or key in self._failed_aside:
            return False
        with self._lock:
            self.deferred += count
            if key in self._pending:
                return True
            self._pending.add(key)
            if self._worker is None:
                self._jobs = queue.SimpleQueue()
                self._worker = threading.Thread(target=self._capture_aside_loop, name="rtdiff-graph-capture", daemon=True)
                self._worker.start()
        home = torch.cuda.current_stream(self.device)
        static = [x.detach().clone() for x in inputs]
        copied = torch.cuda.Event()
        copied.record(home)
        self._jobs.put((key, fn, static, copied, home))
        return True

    def pending(self) -> int:
        """Captures queued or running aside."""
        return len(self._pending)

    def _capture_aside_loop(self) -> None:
        set_native_name()
        stream = None
        while True:
            key, fn, static, copied, home = self._jobs.get()
            try:
                if stream is None:
                    torch.cuda.set_device(home.device)  # the callers' device, with its index
                    stream = torch.cuda.Stream(home.device)  # warm-ups and set-up off the callers' streams
                # Inference mode is per thread: the callers' launches run in it, and the graph must
                # record what they would.
                with torch.inference_mode(), torch.cuda.stream(stream), self._capturing:
                    stream.wait_event(copied)
                    if key not in self._graphs:
                        self._capture(key, fn, static, None, home, aside=True)
                        self.aside_captures += 1
            except Exception as e:  # noqa: BLE001 - the bucket goes back to its callers, which capture it or run it eagerly
                log.warning("CUDA graph %s failed to capture aside (%s: %s); its callers capture it", key,
                            type(e).__name__, e)
                self._failed_aside.add(key)
            finally:
                with self._lock:
                    self._pending.discard(key)

    def _capture(self, key: Hashable, fn: Fn, inputs: Sequence[torch.Tensor], layout: "_Layout | None",
                 home: torch.cuda.Stream, aside: bool = False) -> _Captured:
        """home: the stream the graph will be replayed on, which its static buffers belong to (the
        allocator may hand a freed block to that stream's next allocation). aside: on the cache's
        capturing thread, whose inputs are the static buffers already (capture_aside copied them on
        home): ASIDE_WARMUP_RUNS, and recorded on this thread's stream without torch.cuda.graph's
        entry synchronize and cache emptying (_recording_aside)."""
        t0 = time.perf_counter()
        self._evict(keep_room_for_one=True)
        static = list(inputs) if aside else [x.detach().clone() for x in inputs]
        if layout is None:
            # No eager call came first: warm-up runs on a side stream do the lazy set-up the graph
            # must not contain (cuBLAS/cuDNN workspaces, Triton compilation and autotuning).
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(max(1, ASIDE_WARMUP_RUNS if aside else self.warmup_runs)):
                    out = fn(*static)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            layout = _Layout.of(out)
            del out
        single = layout.single
        # The outputs' buffers, outside the pool: the graph's last kernels copy into them.
        with torch.cuda.stream(home):
            outputs = layout.empty(self.device)
        if not aside:
            torch.cuda.synchronize(self.device)
            # torch.cuda.graph empties the allocator's cache on entry; doing it first makes the
            # reservation's growth during capture the shared pool's.
            torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local (our default): the replica's other threads keep working while this one
            # captures (the waiter's event syncs, nvJPEG's copies on the legacy stream, host copies,
            # allocations on their own streams). Under torch.cuda.graph's default, "global", any such
            # call during the capture invalidated it and raised in that thread: an SDXL stream lost a
            # frame to it when the capture came right after an eager call
            # (results/stream_serving-2026-11-24-*-race.log). After warm-up runs the other threads are
            # usually done, but nothing waits for them. No other thread touches the capture stream,
            # the one thing thread_local does not guard.
            with self._recording_aside(graph) if aside else torch.cuda.graph(
                    graph, pool=self._pool, capture_error_mode=self.capture_error_mode):
                out = fn(*static)
                for dst, src in zip(outputs, (out,) if single else out):
                    dst.copy_(src)
                del out, src
        except BaseException:
            self._abandon_pool()
            raise
        if not aside:
            torch.cuda.synchronize(self.device)
        self._pool_bytes += max(0, torch.cuda.memory_reserved(self.device) - reserved)
        held = sum(x.numel() * x.element_size() for x in (*static, *outputs))
        entry = _Captured(graph, static, outputs, single, held, time.perf_counter() - t0, fn)
        with self._lock:
            self._graphs[key] = entry
        self.captures += 1
        log.info("captured CUDA graph %s in %.2f s, holding %.0f MiB (%d graphs, %.0f MiB in all)", key, entry.capture_s,
                 held / 2**20, len(self._graphs), self.stats().bytes / 2**20)
        self._evict(keep_room_for_one=False)
        return entry

    @contextlib.contextmanager
    def _recording_aside(self, graph: torch.cuda.CUDAGraph):
        """torch.cuda.graph's recording without what it does first: a device synchronize and the
        allocator's cache emptied. From the capturing thread those would wait for the serving
        stream's queue and send its next allocations back to cudaMalloc. (The reservation's growth
        measured around it then may hold a concurrent allocation of the callers': accounting only.)
        It records on the capturing thread's own stream, which no other thread uses (the one thing
        a thread_local capture does not guard)."""
        graph.capture_begin(self._pool, capture_error_mode=self.capture_error_mode)
        try:
            yield
        finally:
            graph.capture_end()

    def _evict(self, keep_room_for_one: bool) -> None:
        with self._lock:  # callers reorder the dict from their threads (call's move_to_end)
            self._evict_locked(keep_room_for_one)

    def _evict_locked(self, keep_room_for_one: bool) -> None:
        limit = self.max_graphs - (1 if keep_room_for_one else 0)
        while len(self._graphs) > limit:
            key, entry = self._graphs.popitem(last=False)
            self.evictions += 1
            log.info("dropped CUDA graph %s (%d replays): over the count budget of %d", key, entry.replays,
                     self.max_graphs)
        # The pool is shared: a dropped graph's intermediates stay in it. Over the byte budget the
        # whole cache starts over (the graph just captured stays, even alone over the budget).
        if self.stats().bytes > self.max_bytes and (keep_room_for_one or len(self._graphs) > 1):
            kept = None if keep_room_for_one else self._graphs.popitem(last=True)
            log.info("dropped %d CUDA graphs and their pool (%.0f MiB): over the byte budget of %.0f MiB",
                     len(self._graphs), self.stats().bytes / 2**20, self.max_bytes / 2**20)
            self.evictions += len(self._graphs)
            self._graphs.clear()
            if kept is None:
                self._pool, self._pool_bytes = None, 0
                torch.cuda.empty_cache()  # the pool's memory goes back once no graph uses it
            else:  # the pool cannot shrink while the kept graph uses it: the next capture starts over
                self._graphs[kept[0]] = kept[1]

    def _abandon_pool(self) -> None:
        """After a failed capture (fn did something a graph cannot hold, e.g. read a device value on
        the host): PyTorch's capture_end raises before it stops routing the capture stream's
        allocations to the pool, and every later capture into that pool fails ("already recording
        to mempool_id"). The graphs captured so far keep the old pool; later ones get a new one."""
        end = getattr(torch._C, "_cuda_endAllocateToPool", None)  # private: closes the stuck recording where it exists
        if end is not None:
            try:
                end(self.device.index if self.device.index is not None else torch.cuda.current_device(), self._pool)
            except Exception:  # noqa: BLE001 - best effort; the new pool below is what matters
                pass
        self._pool = None
        # PyTorch puts the device's default random generator in capture mode at a capture's start and
        # takes it out only at a successful end: after a failed capture every later draw from it
        # outside a capture raised ("Offset increment outside graph capture encountered
        # unexpectedly"; found when a model was loaded after a failed capture aside). A trivial
        # capture ends that mode.
        try:
            scratch = torch.zeros(1, device=self.device)
            with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
                scratch.add_(1)
        except Exception as e:  # noqa: BLE001 - the generator stays as PyTorch left it
            log.warning("could not reset the CUDA generator after a failed capture: %s: %s", type(e).__name__, e)

    def clear(self) -> None:
        with self._capturing, self._lock:
            self._graphs.clear()
            self._seen.clear()
        self._pool, self._pool_bytes = None, 0
        torch.cuda.empty_cache()
