"""Chunk-based caching of a live stream's frames: recompute only what changed.

A stream that sends input frames (image-to-image) mostly repeats itself: a speaker moves in front
of a static background. Each stream keeps, per chunk of the frame (a square of `chunk_px` pixels),
the input it was last computed from and the output it gave. For a new input frame:

  - every chunk's change is the mean absolute difference (in 0-255 levels) between its new input
    and the input it was last computed from, so slow drift accumulates until it crosses the
    threshold instead of being forgiven frame by frame;
  - no chunk over the threshold: the frame is answered from the cache (StreamDiffusion's
    similarity filter is this case);
  - some chunks: one region covering them plus a halo (context for the convolutions and the
    attention at the region's edge) is computed, and only the changed chunks are pasted into
    the cached output; the static ones keep their cached pixels;
  - too large a region, a first frame, or a new size: the whole frame is computed.

Why one region and not a gather of tiles: a live stream's motion is mostly one connected area (a
person, a hand), whose tiles would each carry their own halo; one box pays the halo once. The
region's size is rounded up to one of `region_buckets` steps per axis so that a moving object
reuses a few shapes (each a CUDA graph) rather than capturing a new one every frame.

Outputs of recomputed chunks differ from the uncached frame's only by the context outside the
region (halo cut-off, and GroupNorm/attention statistics over the region instead of the frame);
tests/test_chunk_cache.py and benchmarks/stream_cache.py measure it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rtdiff_cluster.pinned import PinnedUploads

# Frames decoded from a request are read-only arrays; the cache never writes into them (commit builds
# new tensors), so PyTorch's warning about wrapping non-writable arrays does not apply. Set once
# here: warnings.catch_warnings() per frame would race with the replica's other threads.
warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)


@dataclass(frozen=True)
class Region:
    """A pixel box of the frame: rows top..top+height, columns left..left+width."""

    top: int
    left: int
    height: int
    width: int

    def crop(self, a: np.ndarray) -> np.ndarray:
        return a[self.top:self.top + self.height, self.left:self.left + self.width]


@dataclass
class Plan:
    """What a frame needs. kind: `cache` (answer from the cache), `region` or `full`."""

    kind: str
    changed: np.ndarray  # [rows, cols] bool: chunks over the threshold
    region: Region | None = None
    frame: torch.Tensor | None = None  # the new input on the cache's device, for commit

    @property
    def recomputed_fraction(self) -> float:
        if self.kind == "full":
            return 1.0
        return float(self.changed.mean()) if self.changed.size else 0.0


@dataclass
class CacheSettings:
    chunk_px: int
    threshold: float  # mean absolute change, 0-255 levels
    halo_px: int
    max_region_fraction: float  # a region over this fraction of the frame: compute the whole frame
    region_buckets: int
    multiple: int  # region edges and sizes: multiples of the model's size_multiple


def _chunk_change(new: torch.Tensor, ref: torch.Tensor, chunk: int) -> np.ndarray:
    """Mean absolute difference per chunk, [rows, cols] float32 (edge chunks may be smaller).

    In torch on the cache's device: on a GPU replica this is a fraction of a millisecond, where
    NumPy on the host took 21 ms for a 1024x1024 frame (a frame's whole budget at 60 fps)."""
    diff = (new.to(torch.int16) - ref.to(torch.int16)).abs_().sum(dim=2, dtype=torch.int32)  # [H, W]
    # count_include_pad=False: an edge chunk averages over its own pixels only.
    pooled = F.avg_pool2d(diff[None].float(), chunk, ceil_mode=True, count_include_pad=False)[0] / new.shape[2]
    return pooled.cpu().numpy()


def _span(lo: int, hi: int, size: int, s: CacheSettings) -> tuple[int, int]:
    """[lo, hi) widened by the halo, snapped to the model's multiple and rounded up to a bucket
    size, kept inside [0, size). Returns (start, length)."""
    m = s.multiple
    step = -(-size // (s.region_buckets * m)) * m  # bucket step: a multiple of m
    lo, hi = max(0, lo - s.halo_px), min(size, hi + s.halo_px)
    lo, hi = lo // m * m, min(size, -(-hi // m) * m)
    length = min(size, -(-(hi - lo) // step) * step)
    centre = (lo + hi) // 2
    start = min(max(0, (centre - length // 2) // m * m), size - length)
    return start, length


@functools.lru_cache(maxsize=None)
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """Where a GPU's stream frames are planned (and their JPEG inputs decoded: engine/replica.py)."""
    return torch.cuda.Stream(device)


class StreamFrameCache:
    """One stream's reference inputs (on `device`, where changes are measured) and outputs, whole
    frames of uint8 RGB. The output lives where the computed frames arrive: on the device when
    the replica hands over its graphs' outputs (launched frames, engine/stream_frames.py), in
    host memory when it hands over finished images.

    On a GPU the planning (the frame's upload, the change measure, whose result the host must
    read) and the reference inputs' updates run on a side stream: on the compute stream they
    would wait for every frame still queued there, so a stream's next frame could not be planned
    while its last one computes."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.ref_input: torch.Tensor | None = None  # per chunk: the input it was last computed from
        self.output: np.ndarray | torch.Tensor | None = None
        self._uploads = PinnedUploads(self.device, 1)  # the frame, uploaded to measure its changes
        self.kv = None  # a DiT stream's recorded image-token keys and values (cache/token_kv.py)

    @property
    def nbytes(self) -> int:
        n = self.ref_input.numel() if self.ref_input is not None else 0
        n += self._uploads.nbytes + (self.kv.nbytes if self.kv is not None else 0)
        return n + (self.output.nbytes if self.output is not None else 0)

    def _side(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        # No wait for the compute stream: the side stream's inputs (the uploads, the reference
        # inputs) are written on the side stream only, and the allocator keeps each stream's
        # blocks apart.
        return torch.cuda.stream(side_stream(self.device))

    def plan(self, new: np.ndarray | torch.Tensor, s: CacheSettings) -> Plan:
        """new: the frame, [H, W, 3] uint8, in host memory or already on the device (decoded there on
        the side stream: engine/replica.py)."""
        h, w = new.shape[:2]
        grid = (-(-h // s.chunk_px), -(-w // s.chunk_px))
        with self._side():
            frame = new.to(self.device) if isinstance(new, torch.Tensor) else self._uploads.upload([new])[0]
            if self.ref_input is None or tuple(self.ref_input.shape) != new.shape:
                plan = Plan("full", np.ones(grid, dtype=bool), frame=frame)
            else:
                plan = self._plan_change(frame, new, grid, s)
        if self.device.type == "cuda":  # the compute stream reads the frame after its upload
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(side_stream(self.device))
            frame.record_stream(main)
        return plan

    def _plan_change(self, frame: torch.Tensor, new: np.ndarray, grid, s: CacheSettings) -> Plan:
        h, w = new.shape[:2]
        changed = _chunk_change(frame, self.ref_input, s.chunk_px) > s.threshold
        if not changed.any():
            return Plan("cache", changed)
        ys, xs = np.nonzero(changed)
        top, height = _span(int(ys.min()) * s.chunk_px, min(h, (int(ys.max()) + 1) * s.chunk_px), h, s)
        left, width = _span(int(xs.min()) * s.chunk_px, min(w, (int(xs.max()) + 1) * s.chunk_px), w, s)
        if height * width > s.max_region_fraction * h * w:
            return Plan("full", np.ones(grid, dtype=bool), frame=frame)
        return Plan("region", changed, Region(top, left, height, width), frame)

    def forget(self) -> None:
        """The next frame is computed whole: a frame took its input (take_input) and its output
        will never be pasted (its batch failed), so the reference no longer matches the output."""
        self.ref_input = None
        self.kv = None

    def take_input(self, plan: Plan, s: CacheSettings) -> None:
        """The plan's computed chunks take its frame as their reference input: the stream's next
        frame measures its change against that. commit() does it; a batch of regions
        (engine/stream_frames.RegionBatch) does it as each frame joins, before any is computed,
        so that the stream's next frame, planned meanwhile, does not count the same change again."""
        if plan.kind == "full":
            self.ref_input = plan.frame
            return
        assert plan.kind == "region" and self.ref_input is not None
        r = s.chunk_px
        h, w = self.ref_input.shape[:2]
        with self._side():
            # The chunk grid is widened to pixels where it is used: on the device for the reference
            # input (only the [rows, cols] grid crosses), on the host for the region alone.
            grid = torch.from_numpy(plan.changed).to(self.device)
            pixels = grid.repeat_interleave(r, 0).repeat_interleave(r, 1)[:h, :w]  # [H, W]: pixels of changed chunks
            self.ref_input = torch.where(pixels[..., None], plan.frame, self.ref_input)

    def commit(self, plan: Plan, new: np.ndarray, computed: np.ndarray | torch.Tensor,
               s: CacheSettings, input_taken: bool = False) -> np.ndarray | torch.Tensor:
        """Stores a computed frame (plan `full`) or region (plan `region`: `computed` is the
        region's output) and returns the frame's output. computed: a host array (the returned
        output is a copy: the next frame updates the cache while this one is still being
        encoded), or a tensor on the device (the returned output is the cache's own tensor: the
        caller copies it out in stream order, before the next frame's commit is queued).
        input_taken: take_input(plan) ran already (and later frames may have taken theirs since)."""
        on_device = isinstance(computed, torch.Tensor)
        if not input_taken:
            self.take_input(plan, s)
        if plan.kind == "full":
            self.output = computed.clone() if on_device else computed.copy()
            return self.output if on_device else computed
        assert plan.kind == "region" and plan.region is not None and self.output is not None
        if on_device and not isinstance(self.output, torch.Tensor):
            self.output = torch.from_numpy(self.output).to(self.device)
        elif not on_device and isinstance(self.output, torch.Tensor):
            self.output = self.output.cpu().numpy()
        r, c = s.chunk_px, plan.region
        h, w = new.shape[:2]
        # The changed chunks are pasted as runs of a chunk row, slice copies (a masked copy of the
        # region measured 3 ms per 1024 frame on the H200's host); the region covers them all.
        for row, (start, stop) in _runs(plan.changed):
            y0, y1, x0, x1 = row * r, min(h, (row + 1) * r), start * r, min(w, stop * r)
            self.output[y0:y1, x0:x1] = computed[y0 - c.top:y1 - c.top, x0 - c.left:x1 - c.left]
        return self.output if on_device else self.output.copy()


def _runs(changed: np.ndarray):
    """(row, (first, last + 1)) for each run of consecutive True chunks in each row of the grid."""
    for row in np.flatnonzero(changed.any(axis=1)):
        cols = np.flatnonzero(changed[row])
        breaks = np.flatnonzero(np.diff(cols) > 1)
        for a, b in zip(np.r_[0, breaks + 1], np.r_[breaks, len(cols) - 1]):
            yield int(row), (int(cols[a]), int(cols[b]) + 1)


@dataclass
class CacheCounters:
    chunks_reused: int = 0
    chunks_recomputed: int = 0
    frames_from_cache: int = 0
    frames_region: int = 0
    frames_full: int = 0
    launches: int = 0  # GPU launches that computed stream frames (a frame, a region, or a batch of regions)
    launched_frames: int = 0  # the frames those launches computed: over launches, the mean region batch


class StreamCaches:
    """All streams' caches of one replica, least recently used evicted beyond `max_bytes`.

    An evicted stream is not an error: its next frame is computed whole and starts a new cache.
    """

    def __init__(self, max_bytes: int, device: torch.device | str = "cpu"):
        self.max_bytes = max_bytes
        self.device = torch.device(device)
        self._caches: OrderedDict[str, StreamFrameCache] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the compute thread writes, the stats call reads
        self.counters = CacheCounters()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._caches)

    def get(self, stream_id: str) -> StreamFrameCache:
        with self._lock:
            cache = self._caches.get(stream_id)
            if cache is None:
                cache = self._caches[stream_id] = StreamFrameCache(self.device)
            self._caches.move_to_end(stream_id)
            return cache

    def account(self, stream_id: str, before: int, after: int) -> None:
        """A cache grew or shrank from `before` to `after` bytes; evicts others beyond the bound."""
        with self._lock:
            if stream_id in self._caches:
                self._bytes += after - before
            # Least recently used first; the stream being served stays.
            for sid in [sid for sid in self._caches if sid != stream_id]:
                if self._bytes <= self.max_bytes:
                    break
                self._bytes -= self._caches.pop(sid).nbytes

    def count(self, plan: Plan) -> None:
        with self._lock:
            c = self.counters
            n = plan.changed.size
            if plan.kind == "cache":
                c.frames_from_cache += 1
                c.chunks_reused += n
            elif plan.kind == "region":
                c.frames_region += 1
                k = int(plan.changed.sum())
                c.chunks_recomputed += k
                c.chunks_reused += n - k
            else:
                c.frames_full += 1
                c.chunks_recomputed += n

    def count_launch(self, frames: int) -> None:
        with self._lock:
            self.counters.launches += 1
            self.counters.launched_frames += frames

    def snapshot(self) -> CacheCounters:
        with self._lock:
            return dataclasses.replace(self.counters)

    def drop(self, stream_id: str) -> bool:
        with self._lock:
            cache = self._caches.pop(stream_id, None)
            if cache is not None:
                self._bytes -= cache.nbytes
            return cache is not None
