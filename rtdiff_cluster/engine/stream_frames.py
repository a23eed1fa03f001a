"""One image-to-image stream frame against its chunk cache (cache/chunk_cache.py): answered from
the cache, computed on the region of changed chunks, or computed whole.

Shared by the replica and benchmarks/stream_cache.py, so the benchmark measures what is served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable

import numpy as np
import torch

from rtdiff_cluster.cache import token_kv
from rtdiff_cluster.cache.chunk_cache import CacheSettings, Plan, Region, StreamFrameCache, side_stream
from rtdiff_cluster.config import StreamCacheConfig
from rtdiff_cluster.engine.graphs import BucketNotReady
from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Launched, StageTimes, copy_images_out, resize_images

Compute = Callable[[BatchSpec], tuple[np.ndarray, StageTimes]]  # a batch -> images [B, H, W, 3], times
# A batch -> its work queued (Pipeline.launch(..., copy_out=False)); with defer_capture=True it may
# raise BucketNotReady instead, its graph being captured aside (Pipeline.launch's defer_capture).
Launch = Callable[..., Launched]
# A region batch -> (height, width) of the regions of its frame size and schedule that ran on
# captured graphs (Pipeline.graphed_region_shapes).
GraphedRegions = Callable[[BatchSpec], set[tuple[int, int]]]


class CachedFrame:
    """A chunk-cache frame: its plan, and its pixels and stage times from result(). A frame
    launched on a GPU (run_cached's launch) is still computing when run_cached returns; its
    output is being copied to pinned host memory (or, keep_on_device, to a device tensor), and
    result() waits for that copy. A frame of a region batch (waiting=True) is answered later, by
    the batch's launch (adopt) or its failure (fail); result() waits for that too, from any
    thread."""

    def __init__(self, plan: Plan, pixels: np.ndarray | None = None, times: StageTimes | None = None,
                 launched: Launched | None = None, copied: torch.cuda.Event | None = None, waiting: bool = False):
        self.plan = plan
        self._pixels, self._times, self._launched, self._copied = pixels, times or StageTimes(), launched, copied
        # Whether a batch was launched for it: its collector ends that batch (the energy marks). It
        # stays set after result(), which drops the launch itself.
        self.launched = launched is not None
        self.computed_size: tuple[int, int] | None = None  # (width, height) it was computed at, when not the asked one
        self._error: BaseException | None = None
        self._answered = threading.Event()
        if not waiting:
            self._answered.set()

    def adopt(self, other: CachedFrame) -> None:
        """Takes other's pixels and pending work: a frame of a region batch, answered when its
        batch is launched (RegionBatch.flush)."""
        self._pixels, self._times, self._launched, self._copied = other._pixels, other._times, other._launched, other._copied
        self.plan, self.launched, self.computed_size = other.plan, other.launched, other.computed_size
        self._answered.set()

    def fail(self, error: BaseException) -> None:
        """A waiting frame whose batch failed to launch: result() raises error."""
        self._error = error
        self._answered.set()

    @property
    def answered(self) -> bool:
        return self._answered.is_set()

    @property
    def pixels(self) -> np.ndarray | torch.Tensor:
        return self.result()[0]

    def result(self) -> tuple[np.ndarray | torch.Tensor, StageTimes]:
        """([H, W, 3] uint8 at the frame's output size, stage times); waits for the frame's
        batch to be launched, and for launched work. The pixels are a host array, or a finished
        device tensor where they were kept there."""
        self._answered.wait()
        if self._error is not None:
            raise self._error
        if self._launched is not None:
            self._times = self._launched.result()[1]
            self._launched = None
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        pixels = self._pixels
        if isinstance(pixels, torch.Tensor) and pixels.device.type == "cpu":
            pixels = pixels.numpy()
        return pixels, self._times


def cache_settings(config: StreamCacheConfig, size_multiple: int, threshold: float | None = None) -> CacheSettings:
    """The model's settings; a frame's own threshold (None: the model's) replaces the default."""
    return CacheSettings(config.chunk_px, config.threshold if threshold is None else threshold, config.halo_px,
                         config.max_region_fraction, config.region_buckets, size_multiple)


def dit_token_px(model) -> int:
    """Pixels per image token of a DiT whose attention runs through our processor (the hook that
    records and extends keys and values, cache/token_kv.py); 0 for anything else (a UNet, or
    diffusers' own processor as a CPU replica keeps)."""
    from rtdiff_cluster.ops.processors import FluxAttnProcessor

    if model.kind != "flux":
        return 0
    if not any(isinstance(getattr(m, "processor", None), FluxAttnProcessor) for m in model.backbone.modules()):
        return 0
    return model.limits.vae_scale_factor * 2  # Flux packs 2x2 latent patches into a token


def run_cached(compute: Compute | None, cache: StreamFrameCache, batch: BatchSpec, settings: CacheSettings,
               token_px: int = 0, launch: Launch | None = None, keep_on_device: bool = False,
               graphed_regions: GraphedRegions | None = None, regions: RegionBatch | None = None,
               tag: object = None) -> CachedFrame:
    """batch: one frame of a stream, with its init_image (strength > 0). The output has the
    frame's output_size where it has one and the cache is on a GPU (else the caller resizes).

    compute runs a batch to the end; launch (a GPU or sharded replica, in place of compute) queues
    it and leaves its images on the device, where the cache pastes them: the frame comes back still
    computing, its pixels on their way to the host (keep_on_device: to a device tensor of their
    own, for nvJPEG), so the caller can plan and launch the stream's next frame meanwhile
    (CachedFrame.result() collects it).

    With launch, a frame whose graph is being captured aside (the pipeline's graph cache with
    fast_paths.graph_capture_aside) is not held up by the capture:
      - a region is computed as a larger region whose graphs are ready (graphed_regions says
        which shapes ran on captured graphs), else as a whole frame; a region at a step count
        new to its shape runs step by step instead, on its shape's step and decode graphs where
        they are ready (Pipeline.launch);
      - a frame at a new size (the governor's size rungs) is computed at the size the stream's
        cache has, its input resized there on the device, and the output resized to the asked
        size (CachedFrame.computed_size says so).
    A whole frame at the cache's own size is captured on the spot if it must be (a stream's first
    frame).

    token_px > 0 (a DiT whose image tokens cover token_px x token_px pixels, its attention through
    our processor): whole frames record their image tokens' keys and values, and a region's
    attention also sees the static tokens' (cache/token_kv.py). A region whose stream has no
    record on its schedule is computed whole, to make one.

    regions (with launch, token_px 0): a region joins that batch of regions of its shape and
    schedule (with tag, which the batch's launch gets), and the frame comes back waiting until the
    batch is launched (RegionBatch.flush: the caller runs it after its last frame, or later, as
    a replica does while its GPU is busy; a frame that is not such a region runs it first)."""
    frame = batch.frames[0]
    new = frame.init_image
    plan = cache.plan(new, settings)
    computed_size = None
    if (plan.kind == "full" and launch is not None and not token_px and cache.ref_input is not None
            and tuple(cache.ref_input.shape) != tuple(new.shape)):  # a new size for this stream: its graphs may be capturing aside
        if regions is not None:
            regions.flush()
        try:
            done = launch(batch, defer_capture=True)
        except BucketNotReady:
            height, width = cache.ref_input.shape[:2]
            asked = frame.output_size or (batch.width, batch.height)
            new = _resized_like_the_plan(plan.frame, width, height, cache.device)
            frame = dataclasses.replace(frame, init_image=new, output_size=asked)
            batch = dataclasses.replace(batch, width=width, height=height, frames=[frame])
            plan = cache.plan(new, settings)
            computed_size = (width, height)
        else:
            return _committed(cache, plan, new, done, frame, settings, keep_on_device)
    if regions is not None and launch is not None and not token_px and plan.kind == "region":
        return regions.add(cache, plan, batch, new, _region_of(batch, plan, new), settings, keep_on_device,
                           lambda: _computed(compute, cache, plan, batch, new, settings, 0, launch, keep_on_device,
                                             graphed_regions), tag)
    if regions is not None:  # this frame's output may build on theirs (one stream), and launches keep arrival order
        regions.flush()
    done = _computed(compute, cache, plan, batch, new, settings, token_px, launch, keep_on_device, graphed_regions)
    done.computed_size = computed_size
    return done


def _region_of(batch: BatchSpec, plan: Plan, new) -> BatchSpec:
    """The one-frame batch of plan's region. Cut from the frame the plan uploaded to measure
    changes: no second upload."""
    r, frame = plan.region, batch.frames[0]
    return dataclasses.replace(batch, width=r.width, height=r.height, crop=(new.shape[0], new.shape[1], r.top, r.left),
                               frames=[dataclasses.replace(frame, init_image=r.crop(plan.frame))])


class RegionBatch:
    """Chunk-cache regions queued to be computed together: one launch per shape and schedule
    (one stream's consecutive frames, or several streams'). The queue may outlive a batch: a
    single-GPU replica keeps adding its next batches' regions while its GPU has not started its
    latest launch, and flushes as it starts (engine/replica.py, stream_cache.hold_regions).

    Regions of several shapes wait together, each shape a group: a moving object's region
    alternates between a few bucket sizes from frame to frame (on the 10%-moving clip at 1024,
    512x512 and 768x512), and launching what was queued at every change of shape left 223 of 387
    launches with one frame (an H200 trace at window 16, benchmarks/NOTES.md).

    Why: at SDXL's region sizes the backbone is bound by its launches and its occupancy, not by
    its arithmetic: on an H200 a 1024 frame's 512x512 region took 9.2 ms alone and 12.6, 16.0
    and 19.9 ms for 2, 3 and 4 of them in one launch (results/region_batch-2026-11-25-*.md).

    Each frame takes its input as it joins (StreamFrameCache.take_input), so the stream's next
    frame measures its change against it before either is computed. flush() launches them and
    pastes each region into its stream's cache in arrival order across the groups (a stream's
    later frame pastes over its earlier one). The groups' launches are all queued before the
    pastes: each launch of two or more frames writes its own graph's output buffers, and the
    frames computed alone (groups of one) use other graphs, so no launch overwrites another's
    output before it is pasted. A batch whose graphs are not captured yet (captures aside) runs its
    frames one by one the usual way meanwhile: their own graphs, a larger region, or the whole
    frame (run_cached)."""

    def __init__(self, launch: Callable[[BatchSpec, list], Launched], max_frames: int, fixed_origin: bool = False):
        """launch(region batch, its frames' tags as add() took them): queues the batch like
        Pipeline.launch with copy_out=False and defer_capture=True (it may raise BucketNotReady).
        fixed_origin: only regions at the same place share a batch (a DiT's token positions are
        one input)."""
        self._launch, self.max_frames, self.fixed_origin = launch, max_frames, fixed_origin
        self._pending: list[_PendingRegion] = []
        self.launches = 0  # batched launches made (frames computed one by one are not counted)

    def _key(self, region: BatchSpec) -> tuple:
        place = tuple(region.crop[2:]) if self.fixed_origin else ()
        return (dataclasses.replace(region, frames=[], crop=region.crop[:2] + (0, 0), origins=()), place)

    def add(self, cache: StreamFrameCache, plan: Plan, batch: BatchSpec, new, region: BatchSpec,
            settings: CacheSettings, keep_on_device: bool, alone: Callable[[], CachedFrame],
            tag: object = None) -> CachedFrame:
        """Queues a frame's region (alone() computes it by itself, committed; tag goes to launch,
        the caller's prompts for it) and returns its frame, answered at flush()."""
        key = self._key(region)
        if sum(p.key == key for p in self._pending) >= self.max_frames:
            self.flush()
        cache.take_input(plan, settings)
        waiting = CachedFrame(plan, waiting=True)
        self._pending.append(_PendingRegion(cache, plan, batch.frames[0], new, region, settings, keep_on_device,
                                            alone, waiting, tag, key))
        return waiting

    def flush(self) -> None:
        """Launches the queued regions (the frames they came from then have their pixels coming).
        If that fails, every frame still waiting fails with the error (their collectors get it),
        their streams' caches start over with a whole frame, and the error is raised."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        launched: dict[int, tuple[Launched, int]] = {}  # index into pending -> its launch and place in it
        try:
            groups: list[tuple[tuple, list[int]]] = []  # (shape and schedule, indices into pending in arrival order)
            for i, p in enumerate(pending):  # keys are not hashable (a BatchSpec): found by equality among a few
                members = next((m for k, m in groups if k == p.key), None)
                if members is None:
                    groups.append((p.key, members := []))
                members.append(i)
            for _, members in groups:
                if len(members) < 2:
                    continue  # a lone region is computed alone, in its turn below
                first = pending[members[0]].region
                batch = dataclasses.replace(first, frames=[pending[i].region.frames[0] for i in members],
                                            origins=tuple((pending[i].plan.region.top, pending[i].plan.region.left)
                                                          for i in members))
                try:
                    done = self._launch(batch, [pending[i].tag for i in members])
                except BucketNotReady:  # its graphs are capturing aside: each frame the usual way meanwhile
                    continue
                self.launches += 1
                launched.update((i, (done, j)) for j, i in enumerate(members))
            for i, p in enumerate(pending):
                if i not in launched:
                    p.waiting.adopt(p.alone())
                    continue
                done, j = launched[i]
                p.waiting.adopt(_committed(p.cache, p.plan, p.new, done, p.asked, p.settings, p.keep_on_device,
                                           index=j, input_taken=True))
        except BaseException as e:
            for i, p in enumerate(pending):
                if not p.waiting.answered:
                    p.cache.forget()  # its input was taken, its output never pasted
                    # A launch was made for it (its group's, before a later one failed): its
                    # collector still ends that launch (the replica's energy marks).
                    p.waiting.launched = i in launched
                    p.waiting.fail(e)
            raise

    def withdraw(self, frames) -> None:
        """Takes these frames (add()'s answers) out of the queue unlaunched: their caller gave up
        on them (it failed before collecting them). Their streams' caches start over."""
        gone = {id(f) for f in frames}
        for p in [p for p in self._pending if id(p.waiting) in gone]:
            self._pending.remove(p)
            p.cache.forget()
            p.waiting.fail(RuntimeError("withdrawn from its region batch"))

    def __len__(self) -> int:
        return len(self._pending)


@dataclasses.dataclass
class _PendingRegion:
    cache: StreamFrameCache
    plan: Plan
    asked: FrameSpec  # the frame as the stream sent it (its output size, format)
    new: object  # the frame's input, [H, W, 3] uint8
    region: BatchSpec  # its region alone
    settings: CacheSettings
    keep_on_device: bool
    alone: Callable[[], CachedFrame]
    waiting: CachedFrame
    tag: object
    key: tuple  # RegionBatch._key(region): the regions with equal keys share a launch


def _computed(compute: Compute | None, cache: StreamFrameCache, plan: Plan, batch: BatchSpec, new,
              settings: CacheSettings, token_px: int, launch: Launch | None, keep_on_device: bool,
              graphed_regions: GraphedRegions | None) -> CachedFrame:
    frame = batch.frames[0]
    if plan.kind == "cache":
        if isinstance(cache.output, torch.Tensor):
            return _copied_out(plan, cache.output, frame, None, keep_on_device)
        return CachedFrame(plan, _sized(cache.output.copy(), frame, cache.device))
    schedule = (batch.steps, batch.strength, batch.sampler)
    grid = (new.shape[0] // token_px, new.shape[1] // token_px) if token_px else None
    if plan.kind == "region" and token_px and (cache.kv is None or (cache.kv.grid, cache.kv.schedule) != (grid, schedule)):
        plan = _whole(plan)
    if plan.kind == "region":
        attempt = plan
        while attempt is not None:
            r = attempt.region
            region = _region_of(batch, attempt, new)
            extend = contextlib.nullcontext()
            if token_px:
                index = token_kv.region_index(grid, r.top // token_px, r.left // token_px, r.height // token_px,
                                              r.width // token_px, cache.device)
                extend = token_kv.extending(cache.kv, index)
            try:
                with extend:
                    done = _run(compute, launch, region, defer_capture=True)
                return _committed(cache, attempt, new, done, frame, settings, keep_on_device)
            except BucketNotReady:  # its graphs are capturing aside: a larger region that has them, else the whole frame
                attempt = _grown(attempt, region, graphed_regions, settings) if attempt is plan else None
        plan = _whole(plan)
    kv = token_kv.TokenKV(grid, schedule) if token_px else None
    cache.kv = None  # a record stands only once its frame computed (or was queued) to the end
    with token_kv.recording(kv) if kv is not None else contextlib.nullcontext():
        done = _run(compute, launch, batch)
    cache.kv = kv
    return _committed(cache, plan, new, done, frame, settings, keep_on_device)


def _whole(plan: Plan) -> Plan:
    return dataclasses.replace(plan, kind="full", changed=np.ones_like(plan.changed), region=None)


def _grown(plan: Plan, region: BatchSpec, graphed_regions: GraphedRegions | None, s: CacheSettings) -> Plan | None:
    """The plan with its region grown to the smallest shape of this frame size and schedule that
    ran on captured graphs and holds it (within max_region_fraction), or None. Only the changed
    chunks are pasted, so a larger region changes nothing else; it costs less than the whole
    frame a missing graph otherwise falls back to (about 2x a region's GPU time at 1024)."""
    if graphed_regions is None:
        return None
    r, (frame_h, frame_w) = plan.region, region.crop[:2]
    shapes = [(h, w) for h, w in graphed_regions(region)
              if h >= r.height and w >= r.width and h * w <= s.max_region_fraction * frame_h * frame_w]
    if not shapes:
        return None
    h, w = min(shapes, key=lambda hw: hw[0] * hw[1])
    grown = Region(_placed(r.top, r.height, h, frame_h, s.multiple), _placed(r.left, r.width, w, frame_w, s.multiple), h, w)
    return dataclasses.replace(plan, region=grown)


def _placed(start: int, length: int, grown: int, size: int, multiple: int) -> int:
    """Where a span of `grown` starts that holds [start, start + length) inside [0, size): centred
    on it, on the model's multiple, where the frame's edges allow (start, length, grown and size
    are multiples of it)."""
    lo, hi = max(0, start + length - grown), min(start, size - grown)
    return min(max((start - (grown - length) // 2) // multiple * multiple, lo), hi)


def _resized_like_the_plan(uploaded: torch.Tensor, width: int, height: int, device: torch.device) -> torch.Tensor:
    """The frame the plan uploaded, resized on the stream the cache plans on (the next plan reads
    it there; the compute stream waits for that stream after each plan)."""
    with torch.cuda.stream(side_stream(device)):
        return resize_images(uploaded[None], width, height)[0]


def _run(compute: Compute | None, launch: Launch | None, batch: BatchSpec,
         defer_capture: bool = False) -> Launched | tuple[np.ndarray, StageTimes]:
    if launch is not None:
        return launch(batch, defer_capture=defer_capture)
    return compute(batch)


def _committed(cache: StreamFrameCache, plan: Plan, new: np.ndarray, done, frame: FrameSpec,
               settings: CacheSettings, keep_on_device: bool, index: int = 0, input_taken: bool = False) -> CachedFrame:
    """The frame's output once its computed images (done: launched, or finished) are in its cache;
    index: its image in done's batch."""
    if isinstance(done, Launched):
        output = cache.commit(plan, new, done.output[index], settings, input_taken)
        if isinstance(output, torch.Tensor):
            return _copied_out(plan, output, frame, done, keep_on_device)
        return CachedFrame(plan, _sized(output, frame, cache.device), launched=done)  # a CPU pipeline's finished array
    images, times = done
    return CachedFrame(plan, _sized(cache.commit(plan, new, images[0], settings), frame, cache.device), times)


def _copied_out(plan: Plan, output: torch.Tensor, frame: FrameSpec, launched: Launched | None,
                keep_on_device: bool) -> CachedFrame:
    """The cache's device output (at the frame's output size) copied out in stream order, to
    pinned host memory or a device tensor of its own: the next frame's paste, queued after it,
    cannot change this frame's pixels."""
    if frame.output_size is not None and tuple(output.shape[:2]) != (frame.output_size[1], frame.output_size[0]):
        output = resize_images(output[None], *frame.output_size)[0]
    copy = copy_images_out(output, keep_on_device)
    copied = torch.cuda.Event()
    copied.record()
    return CachedFrame(plan, copy, launched=launched, copied=copied)


def _sized(pixels: np.ndarray, frame: FrameSpec, device: torch.device) -> np.ndarray:
    """The output at the size the client asked for, when the governor computed it smaller.

    Resized on the GPU: on the host (PIL) it took ~16 ms of a 1024 frame's encode time on the
    H200 host (22 ms against 6 ms at the asked size), a frame's budget. The cache keeps the
    computed size; only this copy is resized."""
    if frame.output_size is None or device.type != "cuda":
        return pixels
    width, height = frame.output_size
    if pixels.shape[:2] == (height, width):
        return pixels
    return resize_images(torch.from_numpy(pixels).to(device)[None], width, height)[0].cpu().numpy()
