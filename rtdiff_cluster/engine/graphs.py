"""CUDA graphs per shape bucket: a bounded LRU of captured calls with the memory each holds.

At batch 1 an SDXL step is ~1,500 kernel launches and a 1-step frame with a tiny VAE a few hundred
more; launched from Python one by one the GPU idles between them (DESIGN.md: 93 ms eager at 512x512
for 2 ms of work). Replaying a captured graph launches them all at once. A graph is fixed to its
input shapes, so the cache is keyed by the bucket (what the shapes depend on: batch, latent height
and width, and for a captured loop the schedule); a new resolution costs one capture (warm-up
runs plus the capture, seconds at most), not a recompilation.

All graphs share one memory pool. Inside each graph its outputs are copied into buffers allocated
outside the pool, so what the pool holds is only intermediates, dead after every replay: any
graph may reuse another's, whatever the order of replays (they never run concurrently: one stream).
The pool then grows to about the largest graph's working set, not the sum of them all, so a
stream whose governor walks sizes, step counts and chunk-cache regions can keep every graph it
needs (with a pool per graph and at most 16 graphs, a governed SDXL stream allowed down to half
size recaptured 20 graphs in 240 measured frames, p99 1.0 s). The least recently used graph is
dropped beyond the count budget; beyond the byte budget (the pool plus every graph's static
inputs and outputs) all are dropped and the pool starts over.

A call is captured as a chain of graphs, cut where the backbone enters its top-level blocks
(segment_at): the host's cudaGraphLaunch of one graph takes about 1 us per node (1.3-1.6 ms for a
1-step SDXL frame's ~1,500, benchmarks/results/unet_profile-*-frame-1-step-host.md), and the GPU
idles until it returns. With a short first segment the GPU starts after a few dozen nodes and
the host launches each later segment while the GPU runs the ones before it. Only the first
backbone call of a capture is cut block by block; later calls (a captured loop's later steps)
start one segment each, already launched behind the first step's work.

`torch.cuda.graphs.make_graphed_callables` targets autograd training steps (it captures a
backward too); inference needs only capture and replay, with the inputs copied into static
buffers, which is what this does.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

log = logging.getLogger("rtdiff.graphs")

Fn = Callable[..., "torch.Tensor | tuple[torch.Tensor, ...]"]


@dataclass
class _Captured:
    graphs: list[torch.cuda.CUDAGraph]  # segments, replayed in order
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]
    single: bool  # fn returned one tensor, not a tuple
    bytes: int
    capture_s: float
    fn: Fn  # kept alive with the graph: what it closes over (a schedule the graph copies from) is read by every replay
    replays: int = 0


@dataclass
class GraphStats:
    graphs: int
    bytes: int
    captures: int
    evictions: int
    replays: int


class GraphCache:
    """`call(key, fn, *inputs)` runs fn(*inputs) as a captured graph. fn must be a pure function of
    its tensor inputs on the cache's device: anything else it reads (Python numbers, module weights,
    the schedule) is frozen into the graph, so it must be part of the key, and device tensors it
    closes over are read again at every replay (the cache keeps fn, and so them, alive). The outputs are the
    graph's static buffers: a later replay of the same key overwrites them, so a caller that keeps
    them across calls clones them."""

    def __init__(self, device: torch.device, max_graphs: int, max_bytes: int, warmup_runs: int = 2,
                 segments: bool = True):
        """segments: cut captures where segment_at's modules start (see the module's docstring)."""
        if device.type != "cuda":
            raise ValueError(f"GraphCache: CUDA graphs need a CUDA device, got {device}")
        self.device = device
        self.max_graphs = max_graphs
        self.max_bytes = max_bytes
        self.warmup_runs = warmup_runs
        self.segments = segments
        self._cut = None  # during a segmented capture: cut(backbone_start) ends one graph, begins the next
        self._hooked: set[int] = set()  # ids of the modules segment_at hooked
        self._capture_stream: torch.cuda.Stream | None = None
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self._pool = None  # the shared pool's handle, made at the first capture
        self._pool_bytes = 0  # what the captures grew the device reservation by
        self.captures = 0
        self.evictions = 0

    def segment_at(self, backbone: torch.nn.Module, blocks: Sequence[torch.nn.Module]) -> None:
        """Captures from now on are cut where backbone starts (from its second call in a capture)
        and, inside its first call, where each of blocks starts. Outside a capture the hooks do
        nothing. A module already hooked by this cache is not hooked again."""
        if not self.segments:
            return
        me = weakref.ref(self)  # the hooks must not keep a discarded cache and its graphs alive

        def hook(backbone_start: bool):
            def pre_hook(module, args):
                cache = me()
                if cache is not None and cache._cut is not None:
                    cache._cut(backbone_start)
            return pre_hook

        for module, is_backbone in ((backbone, True), *((b, False) for b in blocks)):
            if id(module) not in self._hooked:
                self._hooked.add(id(module))
                module.register_forward_pre_hook(hook(is_backbone))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def stats(self) -> GraphStats:
        g = list(self._graphs.values())  # a snapshot: the replica's stats call reads it from another thread
        return GraphStats(len(g), self._pool_bytes + sum(c.bytes for c in g), self.captures, self.evictions,
                          sum(c.replays for c in g))

    def call(self, key: Hashable, fn: Fn, *inputs: torch.Tensor):
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, fn, inputs)
        else:
            self._graphs.move_to_end(key)
            for static, x in zip(entry.inputs, inputs):
                if static.shape != x.shape or static.dtype != x.dtype:
                    raise ValueError(f"graph {key}: input {tuple(x.shape)} {x.dtype} does not match the captured "
                                     f"{tuple(static.shape)} {static.dtype}; the key must cover every shape")
                static.copy_(x, non_blocking=True)
        for graph in entry.graphs:
            graph.replay()
        entry.replays += 1
        return entry.outputs[0] if entry.single else entry.outputs

    def _capture(self, key: Hashable, fn: Fn, inputs: Sequence[torch.Tensor]) -> _Captured:
        t0 = time.perf_counter()
        self._evict(keep_room_for_one=True)
        static = [x.detach().clone() for x in inputs]
        # Warm-up on a side stream, as capture requires: it also triggers every lazy set-up the
        # graph must not contain (cuBLAS/cuDNN workspaces, Triton compilation and autotuning).
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(max(1, self.warmup_runs)):
                out = fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        single = isinstance(out, torch.Tensor)
        # The outputs' buffers, outside the pool: the graph's last kernels copy into them.
        outputs = tuple(torch.empty_like(o) for o in ((out,) if single else out))
        del out
        torch.cuda.synchronize(self.device)
        # Emptied first, as torch.cuda.graph does on entry: the reservation's growth during the
        # capture is then the shared pool's.
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graphs = self._capture_segments(fn, static, outputs, single)
        torch.cuda.synchronize(self.device)
        self._pool_bytes += max(0, torch.cuda.memory_reserved(self.device) - reserved)
        held = sum(x.numel() * x.element_size() for x in (*static, *outputs))
        entry = _Captured(graphs, static, outputs, single, held, time.perf_counter() - t0, fn)
        self._graphs[key] = entry
        self.captures += 1
        log.info("captured CUDA graph %s (%d segments) in %.2f s, holding %.0f MiB (%d graphs, %.0f MiB in all)", key,
                 len(graphs), entry.capture_s, held / 2**20, len(self._graphs), self.stats().bytes / 2**20)
        self._evict(keep_room_for_one=False)
        return entry

    def _capture_segments(self, fn: Fn, static: list[torch.Tensor], outputs: tuple[torch.Tensor, ...],
                          single: bool) -> list[torch.cuda.CUDAGraph]:
        """fn(*static) captured into one pool as a chain of graphs, its outputs copied into
        outputs by the last. What torch.cuda.graph does around one capture_begin/capture_end
        pair, with the pair repeated at each cut. A tensor made in one segment and used in a
        later one stays allocated in the pool, as a forward graph's activations do for the
        backward's in make_graphed_callables: the segments replay in capture order, one after
        the other, so the pool's reuse across them is the capture's own."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        graphs: list[torch.cuda.CUDAGraph] = []
        graph = torch.cuda.CUDAGraph()
        backbone_calls = 0

        def cut(backbone_start: bool) -> None:
            nonlocal graph, backbone_calls
            if backbone_start:
                backbone_calls += 1
                if backbone_calls == 1:
                    return  # its first call's blocks cut it; before it, a segment of a few ops at most
            elif backbone_calls != 1:
                return  # a later call's blocks (launched behind work already queued), or a block called on its own
            graph.capture_end()
            graphs.append(graph)
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self._pool)

        with torch.cuda.stream(self._capture_stream):
            graph.capture_begin(pool=self._pool)
            self._cut = cut if self.segments else None
            try:
                out = fn(*static)
                for dst, src in zip(outputs, (out,) if single else out):
                    dst.copy_(src)
                del out, src
            except BaseException:
                self._cut = None
                try:
                    graph.capture_end()  # leaves the stream out of capture mode; the capture itself is lost
                except Exception:  # noqa: BLE001 - an invalidated capture raises here too
                    pass
                self._abandon_pool()
                raise
            self._cut = None
            graph.capture_end()
        graphs.append(graph)
        return graphs

    def _evict(self, keep_room_for_one: bool) -> None:
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

    def clear(self) -> None:
        self._graphs.clear()
        self._pool, self._pool_bytes = None, 0
        torch.cuda.empty_cache()
