"""An engine replica: tp x cfg_parallel Ray actors (ranks), one per GPU, that compute each batch
together. Rank 0 leads: it holds the replica link (engine/link.py), the per-stream state and the
image encoder; the other ranks follow.

For every batch the leader's compute thread broadcasts the batch (with its prompts resolved) to the
followers over the gloo control group, then all ranks run the pipeline on it, batch for batch in
the same order: the sharded backbone's all-reduces and the CFG all-gather meet inside it. So a batch's frames cross Ray's object
store never and the network once, from the leader to each follower. Only the leader decodes and
encodes. Every rank counts its GPU's energy during batches (metrics/gpu_sampler.py); the gateway
divides the replica's sum by the frames computed for joules per frame.

The actor is asyncio-based: torch work runs on one compute thread (so batches execute in arrival
order, which keeps each stream's frames in order), image encoding on a small CPU pool. On every
rank the compute thread only queues a plain batch's GPU work (Pipeline.launch) and moves on: the
next batch's host work (its broadcast, upload, noise, launches) overlaps this batch's GPU work, a
waiter thread collects it, and on the leader the encoder pool encodes the images while later
batches compute: JPEG frames through nvJPEG from a device copy of the images (engine/gpu_jpeg.py,
single-GPU replicas), the others with PIL. That thread computes on a CUDA stream of its own. On a
single-GPU replica chunk-cache frames are launched the same way, and regions of several frames
share a launch (stream_frames.RegionBatch); while the GPU has not started the latest launch they
wait, so that the next batches' regions join them (stream_cache.hold_regions). On a sharded
replica chunk-cache frames and region batches are launched too (the regions of one batch from
the gateway share a launch; none are held): the leader plans the next frame while the ranks
compute this one.

Ray carries the control calls (start, info, warmup, stats, lifeline); batches and stream closes
come over the link. run_batch and close_stream stay callable through Ray too, for scripts that
hold only the actor handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from rtdiff_cluster import imaging
from rtdiff_cluster.cache.chunk_cache import CacheCounters, StreamCaches, side_stream
from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.engine.adaptive_steps import StepCalibrator
from rtdiff_cluster.engine.link import LinkAddress, LinkServer, current_peer, new_key, node_host
from rtdiff_cluster.engine.timed_pool import TimedPool
from rtdiff_cluster.fidelity import psnr, ssim
from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline, StageTimes, resize_images
from rtdiff_cluster.engine.stream_frames import CachedFrame, RegionBatch, cache_settings, dit_token_px, run_cached
from rtdiff_cluster.metrics.gpu_sampler import GpuSample, GpuSampler
from rtdiff_cluster.models.base import ModelLimits
from rtdiff_cluster.engine import fastpaths
from rtdiff_cluster.engine.graphs import GraphStats
from rtdiff_cluster.gc_pauses import GcPauses, freeze_startup_objects
from rtdiff_cluster.models.registry import load_model
from rtdiff_cluster.parallel import groups
from rtdiff_cluster.thread_names import set_native_name

log = logging.getLogger("rtdiff.replica")

# A replica forgets the least recently used stream beyond this many; the gateway closes streams
# explicitly, so this only bounds memory if a gateway dies without closing them.
MAX_STREAMS_PER_REPLICA = 4096

# Host threads of a rank whose model is on a GPU: its CPU work is tokenizing, seeding noise and
# copying frames; more intra-op threads only spin there and take cores from the serving path.
CUDA_REPLICA_THREADS = 2


def cpu_threads(ranks: int) -> int:
    """A CPU rank's intra-op threads: the node's cores but one, which the gateway, image encoding
    and Ray need (measured on 2 cores: one thread ran a 64x64 frame in 12 ms, two in 29,
    benchmarks/NOTES.md), shared among the model's ranks."""
    return max(1, ((os.cpu_count() or 1) - 1) // ranks)


class ReplicaBroken(RuntimeError):
    """A collective of this replica failed: one of its ranks died. The gateway answers UNAVAILABLE
    and restarts the group."""


def _is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistBackendError", ())) or any(
        s in text for s in ("connection closed", "connection reset", "broken pipe", "timed out", "gloo", "nccl"))


@contextlib.contextmanager
def _collectives():
    """Around a sharded replica's collectives (the broadcast of a batch, its all-reduces, which on a
    GPU fail when the batch is waited for): a dead or unreachable peer becomes ReplicaBroken."""
    try:
        yield
    except RuntimeError as e:  # gloo/NCCL report a dead or unreachable peer as RuntimeError (DistBackendError)
        if groups.layout().world > 1 and _is_collective_failure(e):
            raise ReplicaBroken(f"a rank of this replica is gone ({type(e).__name__}: {e})") from None
        raise


@dataclass
class FrameResult:
    data: bytes
    width: int
    height: int
    format: int
    seed: int
    encode_s: float
    error: str = ""  # non-empty: this frame failed (the stream's state was lost, its input frame did not decode)
    error_code: str = "UNAVAILABLE"  # the gRPC status code's name the frame's caller gets with `error`
    from_cache: bool = False  # chunk cache: no chunk changed, the cached output was sent
    recomputed_fraction: float = 1.0  # chunk cache: the fraction of the frame's chunks recomputed
    # (text_encode_s, denoise_s, decode_s) of this frame alone, when it ran apart from its batch
    # (chunk-cached stream frames); None: the batch's times are the frame's
    stage_s: tuple[float, float, float] | None = None
    steps: int = 0  # the schedule's length it ran (adaptive steps may have chosen fewer than asked)
    psnr_db: float = 0.0  # adaptive steps: the chosen steps' measured PSNR against 8 steps; 0: not adaptive
    cache_threshold: float = 0.0  # chunk cache: the threshold applied; 0: not cached
    steps_reused: int = 0  # step cache: steps that reused the last prediction
    # (width, height) the frame was computed at when the replica chose another size than the
    # batch's (its graph was capturing aside: engine/stream_frames.run_cached); None: the batch's
    computed_size: tuple[int, int] | None = None


@dataclass
class BatchResult:
    frames: list[FrameResult]
    text_encode_s: float
    denoise_s: float
    decode_s: float
    replica_s: float = 0.0  # run_batch's wall time, handoffs to the compute and encode threads included


@dataclass
class ReplicaInfo:
    limits: ModelLimits
    pid: int
    device: str
    dtype: str
    load_s: float
    parameter_bytes: int  # on this rank; the backbone counts its shard
    gpu_disabled_reason: str
    torch_threads: int
    link: LinkAddress  # where the gateway sends batches (engine/link.py)
    tp: int = 1
    cfg_parallel: int = 1
    backbone_bytes: int = 0  # this rank's share of the backbone
    fast_paths: dict[str, str] = field(default_factory=dict)  # path -> what the leader took, or "off: why"


@dataclass
class ReplicaStats:
    frames_computed: int
    batches: int
    prompt_cache_hits: int
    prompt_cache_misses: int
    prompt_cache_entries: int
    streams: int
    gpus: list[GpuSample] = field(default_factory=list)
    batch_energy_joules: float = 0.0  # this rank's GPU energy during batches, since it started
    graphs: GraphStats | None = None  # the leader's CUDA graph cache, when it has one
    stream_cache: CacheCounters = field(default_factory=CacheCounters)
    stream_cache_bytes: int = 0
    stream_caches: int = 0
    compute_busy_s: dict[str, float] = field(default_factory=dict)  # the compute thread's seconds in jobs, by job
    gc_pause_s: tuple[float, ...] = ()  # this process's seconds in garbage collections, by generation (gc_pauses.py)
    fp8_fidelity: Fp8Fidelity | None = None  # the leader's, measured at warm-up when its linears are FP8


@dataclass
class Fp8Fidelity:
    """The warm-up frame of an FP8 replica against the same frame from the model as loaded (its
    dtype, diffusers' modules, eager): how far FP8 and the fast paths together move what users get."""
    psnr_db: float
    ssim: float
    width: int
    height: int
    steps: int

    def describe(self) -> str:
        return (f"against {self.width}x{self.height}, {self.steps}-step warm-up frame of the model as loaded: "
                f"PSNR {self.psnr_db:.1f} dB, SSIM {self.ssim:.5f}")


@dataclass
class _StreamState:
    prompt: str
    negative_prompt: str
    peer: int | None  # the link connection that opened it: its state goes when that connection closes


@dataclass
class _Queued:
    """A batch's compute as _queue_batch queued it: the batch with its inputs decoded, the frames
    kept (indices into it), those that did not decode, the plain frames (indices into keep) and
    their _run_plain result, the chunk-cache frames and their _run_cached result or error."""

    batch: BatchSpec
    keep: list[int]
    undecoded: dict[int, str]
    plain: list[int]
    plain_run: tuple | None
    cached_frames: list[tuple[int, str, str]]
    cached_run: list = field(default_factory=list)
    cached_error: BaseException | None = None


@dataclass
class _CachedCall:
    """One _run_cached call: the energy marks made for its frames' launches, which its caller
    never collects (so never ends) if the call fails."""

    marked: int = 0


@dataclass
class _RegionTag:
    """A chunk-cache frame's prompts, as its launch gets them, and the call it came in."""

    prompt: str
    negative: str
    call: _CachedCall


@dataclass
class _Work:
    """What the leader broadcasts to the followers for one batch."""

    batch: BatchSpec
    prompts: list[str]
    negatives: list[str]
    warmup: bool = False  # the replica's warm-up frame: its shapes are the ones attention builds kernels for


class EngineRank:
    def __init__(self, config: ModelConfig, rank: int, stats_interval_s: float):
        """Cheap on purpose: Ray restarts call it again; the work happens in start()."""
        self.config = config
        self.rank = rank
        self.layout = groups.Layout(tp=config.tp, cfg=config.cfg_parallel)
        self.stats_interval_s = stats_interval_s
        self.compute = TimedPool(1, thread_name_prefix="rtdiff-compute", initializer=set_native_name)
        self._gc = GcPauses.install()
        self.encoder = ThreadPoolExecutor(2, thread_name_prefix="rtdiff-encode", initializer=set_native_name)
        # Collects launched batches. A chunk-cache frame whose region is held (hold_regions) keeps
        # its collector waiting until the region batch launches: one thread per batch in flight.
        self.waiter = ThreadPoolExecutor(8, thread_name_prefix="rtdiff-wait", initializer=set_native_name)
        self.started: asyncio.Future | None = None
        self.model = self.pipeline = self.gpu = None
        self.streams: OrderedDict[str, _StreamState] = OrderedDict()
        self.stream_caches = StreamCaches(config.stream_cache.memory_mb << 20)  # on the model's device once loaded
        self.calibrator = StepCalibrator(config.adaptive_steps.audit_every_frames, config.adaptive_steps.max_settings)
        self.frames_computed = 0
        self.batches = 0
        self.load_s = 0.0
        self.link = LinkServer({"run_batch": self.run_batch, "close_stream": self.close_stream}, new_key(),
                               on_disconnect=self._drop_peer_streams)
        self._rendezvous: tuple[str, int] | None = None
        self._following = False
        # Single-GPU replicas: the chunk-cache regions queued to share a launch, kept across batches
        # while the GPU is busy (stream_cache.hold_regions), and the thread that notices it is ready.
        self._regions: RegionBatch | None = None
        self._launch_started: torch.cuda.Event | None = None  # compute thread: recorded before its latest launch
        self._busy_until: queue.SimpleQueue[torch.cuda.Event] = queue.SimpleQueue()
        self._watching = False  # compute thread: an event is with the watcher, a flush will follow
        self._holding = False  # stream_cache.hold_regions in effect (single-GPU replicas)
        # FP8 replicas: the warm-up frame computed before the fast paths, then how far the served one is from it.
        self._fp8_reference: np.ndarray | None = None
        self.fp8_fidelity: Fp8Fidelity | None = None

    # ---- start-up (every rank) -------------------------------------------------------------

    async def rendezvous(self) -> tuple[str, int]:
        """The leader's address for torch.distributed (its node IP and a free port); same answer
        until the process restarts."""
        if self._rendezvous is None:
            host = node_host()
            with socket.socket() as s:
                s.bind((host, 0))
                self._rendezvous = (host, s.getsockname()[1])
        return self._rendezvous

    async def start(self, master_addr: str, master_port: int) -> ReplicaInfo | None:
        """Joins the replica's process groups and loads this rank's shard; idempotent. The leader
        returns its ReplicaInfo, followers None. Collective: all ranks are started together."""
        if self.started is None:
            set_native_name("replica-loop")  # Ray's thread that runs this actor's event loop (and its link)
            self.started = asyncio.get_running_loop().run_in_executor(self.compute, self._start, master_addr, master_port)
        await asyncio.shield(self.started)
        if self.rank != 0:
            if not self._following:
                self._following = True
                asyncio.get_running_loop().run_in_executor(self.compute, self._follow)
            return None
        return await self.info()

    def _start(self, master_addr: str, master_port: int) -> None:
        from rtdiff_cluster.models.registry import resolve_device

        t0 = time.perf_counter()
        device, _ = resolve_device(self.config)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # This thread computes on a stream of its own, not on the legacy default stream: work
            # there (nvJPEG's last copy of each frame, engine/gpu_jpeg.py) would wait for every
            # batch already queued here, and batches for it.
            torch.cuda.set_stream(torch.cuda.Stream(device))
        torch.set_num_threads(self.config.torch_threads or cpu_threads(self.config.replicas * self.config.ranks))
        groups.init(self.layout, self.rank, master_addr, master_port, device)
        self.model = load_model(self.config, tp_rank=groups.tp_rank())
        if not self.config.torch_threads and self.model.device.type == "cuda":
            torch.set_num_threads(CUDA_REPLICA_THREADS)
        if self.config.warmup and fastpaths.fp8_applies(self.model, self.config.fast_paths):
            # FP8's cost in quality is reported, not assumed: the warm-up frame from the model as
            # loaded, before apply() converts it, is the reference the served warm-up frame is held
            # to. Every rank computes it (a sharded backbone's collectives run in lockstep).
            images, _ = Pipeline(self.model, 1).run(self._warmup_batch(), ["warm-up"], [""], decode=groups.is_leader())
            self._fp8_reference = images[0] if images is not None else None
        self.fast = fastpaths.apply(self.model, self.config.fast_paths, self.layout.world)
        self.pipeline = Pipeline(self.model, self.config.prompt_cache_size, self.fast.graphs,
                                 self.config.fast_paths.loop_graph_max_steps)
        self.gpu = GpuSampler(self.model.device, self.stats_interval_s)
        self.stream_caches.device = self.model.device
        # Region batches where frames are launched (a GPU, or a sharded replica, whose followers
        # compute each region batch the leader broadcasts); held only on one GPU, where a CUDA
        # event says when the latest launch started.
        if (self.layout.world > 1 or device.type == "cuda") and self.config.stream_cache.region_batch > 1:
            self._regions = RegionBatch(self._launch_frames, self.config.stream_cache.region_batch,
                                        fixed_origin=self.pipeline.family.origin_in_inputs)
            if self.layout.world == 1 and self.config.stream_cache.hold_regions:
                self._holding = True
                threading.Thread(target=self._watch_held_regions, name="rtdiff-regions", daemon=True).start()
        self.load_s = time.perf_counter() - t0
        freeze_startup_objects(f"replica rank {self.rank}")  # what loading left: a full collection walked it ~200 ms

    async def lifeline(self) -> None:
        """Never returns: the supervisor holds this call open, and Ray fails it when the process dies."""
        await asyncio.Event().wait()

    # ---- followers -------------------------------------------------------------------------

    def _follow(self) -> None:
        """A follower's compute thread, for the process's life: the leader's batches, in order,
        each queued on the GPU without waiting for it (a waiter thread does), so that the host
        prepares the next batch while the GPU computes this one, as the leader does.
        When the group breaks (the leader or a peer died) the process exits: it cannot rejoin a
        torch.distributed group, and its restart is what the supervisor waits for."""
        try:
            while True:
                work: _Work = groups.broadcast_object()
                launched = self._launch(work)
                if work.warmup:
                    self._settle(launched, work)
                else:
                    self.waiter.submit(self._settle_following, launched, work)
        except BaseException as e:
            self._leave(e)

    def _leave(self, e: BaseException) -> None:
        log.error("rank %d of %s leaves: its group broke (%s: %s)", self.rank, self.config.served_name,
                  type(e).__name__, e)
        os._exit(1)

    def _settle_following(self, launched, work: _Work) -> None:
        try:
            self._settle(launched, work)
        except BaseException as e:  # a collective of the batch failed on the device
            self._leave(e)

    def _launch(self, work: _Work, **options):
        """Both roles: one batch's work queued through the pipeline (the leader decodes), not
        waited for; the GPU counts as busy until _settle. options: Pipeline.launch's."""
        self.gpu.mark_batch(True)
        try:
            return self.pipeline.launch(work.batch, work.prompts, work.negatives, decode=groups.is_leader(), **options)
        except BaseException:
            self.gpu.mark_batch(False)
            raise

    def _settle(self, launched, work: _Work):
        """Both roles: waits for a launched batch. Returns (images, times); images None off the leader."""
        try:
            return launched.result()
        finally:
            self.gpu.mark_batch(False)
            if work.warmup:
                self.fast.seal_attention()

    # ---- the leader's API --------------------------------------------------------------------

    def _need_started(self) -> None:
        if self.started is None or not self.started.done():
            raise RuntimeError(f"rank {self.rank} of {self.config.served_name} is not started")
        self.started.result()  # re-raises a failed start
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank} is a follower; batches go to rank 0")

    async def info(self) -> ReplicaInfo:
        self._need_started()
        m = self.model
        link = await self.link.start(node_host())
        return ReplicaInfo(m.limits, os.getpid(), str(m.device), str(m.dtype).removeprefix("torch."),
                           self.load_s, m.parameter_bytes(), self.gpu.disabled_reason, torch.get_num_threads(), link,
                           self.layout.tp, self.layout.cfg, m.backbone_bytes(), dict(self.fast.report))

    def _warmup_batch(self) -> BatchSpec:
        lim = self.model.limits
        return BatchSpec(lim.default_width, lim.default_height, lim.default_steps, lim.default_guidance_scale, 0.0,
                         [FrameSpec("warm-up")])

    async def warmup(self) -> tuple[float, str, str]:
        """One frame at the default size through every rank, so the first user request pays no
        one-time costs. Returns its seconds, the attention backends its calls took, and for an FP8
        replica its fidelity against the model as loaded (Fp8Fidelity.describe; else "")."""
        self._need_started()
        t0 = time.perf_counter()
        batch = self._warmup_batch()
        # Where a bucket's first call runs eagerly and its second captures (graph_capture_at_call = 2),
        # two runs leave the default bucket replaying for the first request.
        graphs = self.pipeline.graphs
        loop = asyncio.get_running_loop()
        for _ in range(2 if graphs is not None and graphs.eager_first else 1):
            images, _ = await loop.run_in_executor(self.compute, self._lead, _Work(batch, ["warm-up"], [""], warmup=True))
        while graphs is not None and graphs.pending():  # the default bucket's loop, captured aside
            await asyncio.sleep(0.01)
        took = time.perf_counter() - t0
        if self._fp8_reference is not None and self.fp8_fidelity is None:
            ref, served = self._fp8_reference, np.asarray(images[0])
            self.fp8_fidelity = Fp8Fidelity(psnr(ref, served), ssim(ref, served), batch.width, batch.height, batch.steps)
            self._fp8_reference = None
            self.fast.report["fp8"] += f"; {self.fp8_fidelity.describe()}"
        freeze_startup_objects("replica warm-up")  # and what the warm-up left (compiled kernels, graphs)
        return took, self.fast.attention_choices(), self.fp8_fidelity.describe() if self.fp8_fidelity else ""

    def _lead_launch(self, work: _Work, **options):
        """The leader: sends the batch to the followers and queues it here too (_launch)."""
        with _collectives():
            groups.broadcast_object(work)
            return self._launch(work, **options)

    def _lead(self, work: _Work):
        """The leader: one batch on every rank, waited for. Returns (images, times)."""
        launched = self._lead_launch(work)
        with _collectives():
            return self._settle(launched, work)

    def _resolve_prompts(self, batch: BatchSpec) -> tuple[list[int], list[str], list[str], dict[int, str]]:
        """Applies stream prompt changes in frame order; returns the frames to compute and failures."""
        keep, prompts, negatives, failed = [], [], [], {}
        for i, fr in enumerate(batch.frames):
            state = self.streams.get(fr.stream_id) if fr.stream_id else None
            if fr.stream_id and fr.prompt is not None:
                state = _StreamState(fr.prompt, fr.negative_prompt, current_peer.get())
                self.streams[fr.stream_id] = state
                self.streams.move_to_end(fr.stream_id)
                while len(self.streams) > MAX_STREAMS_PER_REPLICA:
                    self.stream_caches.drop(self.streams.popitem(last=False)[0])
            if fr.prompt is None and state is None:
                failed[i] = "the stream's state was lost (the replica restarted)"
                continue
            keep.append(i)
            prompts.append(fr.prompt if fr.prompt is not None else state.prompt)
            negatives.append(fr.negative_prompt if fr.prompt is not None else state.negative_prompt)
        return keep, prompts, negatives, failed

    def _adapt(self, batch: BatchSpec, prompt: str, negative: str) -> tuple[BatchSpec, float, float]:
        """On the compute thread: the batch with the steps its quality target needs (measured on its
        first frame when the setting is new or due a re-check), the PSNR behind the choice and the
        seconds spent measuring."""
        if batch.target_psnr_db <= 0:
            return batch, 0.0, 0.0
        t0 = time.perf_counter()
        chosen, cal = self.calibrator.choose(batch, lambda b: self._lead(_Work(b, [prompt], [negative]))[0][0])
        return chosen, cal.psnr_db, time.perf_counter() - t0

    def _run_plain(self, batch: BatchSpec, prompts: list[str], negatives: list[str]):
        """On the compute thread: (collect, seconds spent choosing the steps, steps of the schedule,
        their PSNR against 8 steps or 0). collect() returns (images, times); on a GPU it waits for
        work that is still running (on every rank of a sharded replica), so call it off the
        compute thread."""
        batch, psnr_db, measuring_s = self._adapt(batch, prompts[0], negatives[0])
        work = _Work(batch, prompts, negatives)
        self._note_launch()
        launched = self._lead_launch(work, resize_output=True, keep_on_device=self._jpeg_on_gpu(batch))

        def collect():
            with _collectives():
                return self._settle(launched, work)
        return collect, measuring_s, batch.steps, psnr_db

    def _queue_batch(self, batch: BatchSpec, keep: list[int], prompts: list[str], negatives: list[str]) -> _Queued:
        """On the compute thread, one job per batch in arrival order: its JPEG inputs decoded, its
        plain frames launched (_run_plain), then its chunk-cache frames (_run_cached). A failure of
        the plain frames fails the batch with nothing left running; one of the cached frames comes
        back in cached_error, so that the caller still collects the plain frames' launch."""
        undecoded: dict[int, str] = {}
        if any(isinstance(fr.init_image, imaging.EncodedImage) for fr in batch.frames):
            batch, undecoded = self._decode_inputs(batch, keep)
            if undecoded:
                prompts = [p for i, p in zip(keep, prompts) if i not in undecoded]
                negatives = [n for i, n in zip(keep, negatives) if i not in undecoded]
                keep = [i for i in keep if i not in undecoded]
        cached = [self._cached(batch, i) for i in keep]
        plain = [k for k in range(len(keep)) if not cached[k]]
        plain_run = None
        if plain:
            sub = dataclasses.replace(batch, frames=[batch.frames[keep[k]] for k in plain])
            plain_run = self._run_plain(sub, [prompts[k] for k in plain], [negatives[k] for k in plain])
        # Cached stream frames run after the plain ones, in arrival order.
        cached_frames = [(i, prompts[k], negatives[k]) for k, i in enumerate(keep) if cached[k]]
        q = _Queued(batch, keep, undecoded, plain, plain_run, cached_frames)
        try:
            q.cached_run = self._run_cached(batch, cached_frames) if cached_frames else []
        except BaseException as e:
            if plain_run is None:
                raise
            q.cached_error = e
        return q

    def _decode_inputs(self, batch: BatchSpec, keep: list[int]) -> tuple[BatchSpec, dict[int, str]]:
        """On the compute thread, before the batch's compute is queued: the JPEG input frames the
        gateway passed on compressed (imaging.EncodedImage) decoded and brought to the batch's size.
        With nvJPEG (single-GPU replicas) on the GPU: a plain frame on the compute stream, a
        chunk-cached one on the cache's side stream, where it is measured; the host does not wait.
        Elsewhere, and for a frame nvJPEG refuses, with PIL on the host. Returns the batch and
        {frame: why} for the frames that do not decode (the others go on)."""
        frames, failed = list(batch.frames), {}
        decoder = self.fast.jpeg_decoder
        for i in keep:
            img = frames[i].init_image
            if not isinstance(img, imaging.EncodedImage):
                continue
            pixels = None
            if decoder is not None:
                stream = side_stream(self.model.device) if self._cached(batch, i) else torch.cuda.current_stream()
                with torch.cuda.stream(stream):
                    try:
                        pixels = decoder.decode(img.data)
                    except RuntimeError as e:
                        log.info("nvJPEG refused an input frame (%s); decoding it with PIL", str(e).splitlines()[0])
                    if pixels is not None and tuple(pixels.shape[:2]) != (batch.height, batch.width):
                        pixels = resize_images(pixels[None], batch.width, batch.height)[0]
            if pixels is None:
                try:
                    pixels = imaging.decode_encoded(img)
                except imaging.ImageDecodeError as e:
                    failed[i] = f"input_image.data: {e}"
                    continue
                if pixels.shape[:2] != (batch.height, batch.width):
                    pixels = imaging.resize(pixels, batch.width, batch.height)
            frames[i] = dataclasses.replace(frames[i], init_image=pixels)
        return dataclasses.replace(batch, frames=frames), failed

    def _jpeg_on_gpu(self, batch: BatchSpec) -> bool:
        """Whether the batch's images stay on the device for nvJPEG: some of its frames are JPEG."""
        return self.fast.jpeg is not None and any(fr.output_format == imaging.JPEG for fr in batch.frames)

    def _cached(self, batch: BatchSpec, i: int) -> bool:
        """Whether frame i goes through its stream's chunk cache."""
        fr = batch.frames[i]
        return (self.config.stream_cache.enabled and batch.strength > 0 and fr.stream_id is not None
                and fr.init_image is not None and (fr.cache_threshold is None or fr.cache_threshold >= 0))

    @functools.cached_property
    def _token_px(self) -> int:
        """Pixels per image token when a DiT stream's regions attend to recorded keys and values
        (config stream_cache.dit_token_kv, single-rank replicas); else 0. Fixed once the model
        is loaded: read on the first cached frame, not walked per frame."""
        if not self.config.stream_cache.dit_token_kv or groups.layout().world != 1:
            return 0
        return dit_token_px(self.model)

    def _launch_frames(self, b: BatchSpec, tags: list[_RegionTag], defer_capture: bool = True):
        """Compute thread, a GPU replica or a sharded one: chunk-cache frames' work queued, not
        waited for (the paste and the copy out follow in stream order, and the thread goes on to
        the next frame, perhaps this stream's, while the GPU computes). On a sharded replica the
        frames go to the followers first, which queue them like any batch (_follow). BucketNotReady
        (a capture aside, single-rank replicas only): nothing marked; run_cached computes the
        frames another way."""
        prompts, negatives = [t.prompt for t in tags], [t.negative for t in tags]
        with _collectives():
            if self.layout.world > 1:  # it has no graphs, so no BucketNotReady once the followers have the batch
                groups.broadcast_object(_Work(b, prompts, negatives))
            self._note_launch()
            launched = self.pipeline.launch(b, prompts, negatives, copy_out=False, defer_capture=defer_capture)
        for t in tags:  # each frame's collect ends one
            self.gpu.mark_batch(True)
            t.call.marked += 1
        self.stream_caches.count_launch(len(tags))
        return launched

    def _run_cached(self, batch: BatchSpec, frames: list[tuple[int, str, str]]
                    ) -> list[tuple[CachedFrame, int, float, float, float]]:
        """On the compute thread, in arrival order: frames of one stream see each other's commits.
        frames: (index in the batch, prompt, negative prompt). Per frame, returns the frame (on a
        GPU or sharded replica still computing, or waiting for its region batch: collect it with
        _collect_cached), the steps its schedule had, their PSNR against 8 steps (0: not
        adaptive), the chunk threshold applied and the seconds spent choosing the steps. On a
        GPU or sharded replica, regions of one shape and schedule share a launch
        (stream_frames.RegionBatch), up to stream_cache.region_batch; on one GPU with hold_regions
        they wait while the GPU has not started the replica's latest launch, and later batches'
        regions join them."""
        single_gpu = groups.layout().world == 1 and self.model.device.type == "cuda"
        launches = single_gpu or groups.layout().world > 1  # a CPU process computes each frame in turn
        call = _CachedCall()
        regions = self._regions
        out = []
        sizes: dict[str, tuple[object, int]] = {}  # stream -> its cache and the cache's bytes before these frames
        try:
            for i, prompt, negative in frames:
                fr = batch.frames[i]
                one = dataclasses.replace(batch, frames=[fr])
                one, psnr_db, measuring_s = self._adapt(one, prompt, negative)
                settings = cache_settings(self.config.stream_cache, self.model.limits.size_multiple, fr.cache_threshold)
                cache = self.stream_caches.get(fr.stream_id)
                sizes.setdefault(fr.stream_id, (cache, cache.nbytes))
                # The step cache skips steps, whose keys and values then are never recorded.
                token_px = self._token_px if one.step_cache <= 0 else 0
                tag = _RegionTag(prompt, negative, call)

                def launch(b: BatchSpec, defer_capture: bool = False, tag=tag):
                    return self._launch_frames(b, [tag], defer_capture)
                done = run_cached(lambda b, p=prompt, n=negative: self._lead(_Work(b, [p], [n])), cache, one, settings,
                                  token_px, launch if launches else None,
                                  keep_on_device=single_gpu and self._jpeg_on_gpu(one),
                                  graphed_regions=self.pipeline.graphed_region_shapes, regions=regions, tag=tag)
                out.append((done, one.steps, psnr_db, settings.threshold, measuring_s))
            if regions is not None:
                self._flush_regions_unless_busy()
        except BaseException:
            if regions is not None:  # this call's frames still queued: nobody will collect them
                regions.withdraw([done for done, *_ in out])
            for _ in range(call.marked):  # this call's launched frames: nobody will collect them either
                self.gpu.mark_batch(False)
            for sid in sizes:  # their inputs may be taken without their outputs: their next frames start over
                self.stream_caches.drop(sid)
            raise
        for sid, (cache, before) in sizes.items():
            self.stream_caches.account(sid, before, cache.nbytes)
        for done, *_ in out:
            self.stream_caches.count(done.plan)
        return out

    def _note_launch(self) -> None:
        """Compute thread, single-GPU replica, just before a launch is queued: an event the GPU
        reaches when that launch starts (held regions wait for it)."""
        if self._holding:
            self._launch_started = torch.cuda.Event()
            self._launch_started.record()

    def _flush_regions_unless_busy(self) -> None:
        """Compute thread: launches the queued regions, unless (hold_regions) the GPU has not yet
        started this replica's latest launch: then they wait, the regions of batches arriving
        meanwhile join them, and the watcher thread has them launched as it starts, so they are
        queued behind it while it computes and the GPU never waits for them.

        Why: a lone stream's frames reach the replica a batch or two at a time, and launching them
        as they come keeps its region batches at that size. On an H200 (SDXL at 1024, 512x512
        regions) 2 regions took 12.6 ms a launch and 4 took 19.9 ms: 6.3 against 5.0 ms a frame.
        They wait for the latest launch to start, not for the GPU to run dry: then it would idle
        while the flush is prepared (~1-2 ms of host work a launch, benchmarks/region_host.py)."""
        regions = self._regions
        if not len(regions):
            return
        started = self._launch_started
        if not self._holding or started is None or started.query():
            regions.flush()
        elif not self._watching:
            self._watching = True
            self._busy_until.put(started)

    def _watch_held_regions(self) -> None:
        """A thread of its own, for the process's life: waits for the launch that held regions wait
        for to start, then has the compute thread flush them (or hold them again behind a newer
        launch)."""
        set_native_name()
        while True:
            self._busy_until.get().synchronize()
            try:
                self.compute.submit(self._flush_held_regions)
            except RuntimeError:  # the compute pool was shut down: the process is ending
                return

    def _flush_held_regions(self) -> None:
        self._watching = False
        try:
            self._flush_regions_unless_busy()
        except Exception:  # the region batch failed its frames: their batches answer the error
            log.exception("a held region batch failed to launch")

    def _collect_cached(self, done: CachedFrame, measuring_s: float) -> tuple[np.ndarray | torch.Tensor, StageTimes]:
        """Off the compute thread: a chunk-cache frame's pixels and times, once its GPU work is done."""
        try:
            with _collectives():  # a sharded frame's all-reduces fail here on a GPU
                pixels, times = done.result()
        finally:
            if done.launched:
                self.gpu.mark_batch(False)
        return pixels, dataclasses.replace(times, denoise_s=times.denoise_s + measuring_s)

    async def run_batch(self, batch: BatchSpec) -> BatchResult:
        t0 = time.perf_counter()
        self._need_started()
        loop = asyncio.get_running_loop()
        keep, prompts, negatives, failed = self._resolve_prompts(batch)
        # The whole batch is one compute job, queued before the first await: the compute thread runs
        # jobs in arrival order, so a stream's frames see each other's commits without a lock
        # held across an await, and the thread never waits for this loop between a batch's input
        # decode and its compute.
        q: _Queued = await loop.run_in_executor(self.compute, self._queue_batch, batch, keep, prompts, negatives)
        batch, keep, undecoded, cached_frames = q.batch, q.keep, q.undecoded, q.cached_frames
        pixels: dict[int, object] = {}
        cache_info: dict[int, tuple[bool, float, tuple[float, float, float], tuple[int, int] | None]] = {}
        # frame -> steps of its schedule, their PSNR vs 8 steps, chunk threshold, steps the step cache reused
        applied: dict[int, tuple[int, float, float, int]] = {}
        text_s = denoise_s = decode_s = 0.0
        plain = q.plain
        if q.plain_run is not None:
            collect, measuring_s, plain_steps, plain_psnr = q.plain_run
            images, times = await loop.run_in_executor(self.waiter, collect)
            times.denoise_s += measuring_s  # the frames waited for it
            pixels.update((keep[k], img) for k, img in zip(plain, images))
            applied.update((keep[k], (plain_steps, plain_psnr, 0.0, times.steps_reused)) for k in plain)
            text_s, denoise_s, decode_s = times.text_encode_s, times.denoise_s, times.decode_s
            self.frames_computed += len(plain)
            self.batches += 1
        if q.cached_error is not None:
            raise q.cached_error
        cached_done = q.cached_run
        for (i, _, _), (done, steps, psnr_db, threshold, measuring_s) in zip(cached_frames, cached_done):
            pixels[i], t = await loop.run_in_executor(self.waiter, self._collect_cached, done, measuring_s)
            applied[i] = (steps, psnr_db, threshold, t.steps_reused)
            cache_info[i] = (done.plan.kind == "cache", done.plan.recomputed_fraction,
                             (t.text_encode_s, t.denoise_s, t.decode_s), done.computed_size)
            text_s += t.text_encode_s
            denoise_s += t.denoise_s
            decode_s += t.decode_s
            if done.plan.kind != "cache":
                self.frames_computed += 1
                self.batches += 1

        def encode(i: int, image) -> FrameResult:
            fr = batch.frames[i]
            t = time.perf_counter()
            if isinstance(image, torch.Tensor):  # finished on the device (sized there), kept for nvJPEG
                if fr.output_format == imaging.JPEG:
                    data = self.fast.jpeg.encode(image, fr.jpeg_quality)
                else:
                    image = image.cpu().numpy()
                    data = imaging.encode(image, fr.output_format, fr.jpeg_quality)
            else:
                if fr.output_size is not None:  # computed smaller by the governor (a GPU replica resized it already)
                    image = imaging.resize(image, *fr.output_size)
                data = imaging.encode(image, fr.output_format, fr.jpeg_quality)
            from_cache, fraction, stages, computed_size = cache_info.get(i, (False, 1.0, None, None))
            steps, psnr_db, threshold, reused = applied[i]
            return FrameResult(data, image.shape[1], image.shape[0], fr.output_format, fr.seed, time.perf_counter() - t,
                               from_cache=from_cache, recomputed_fraction=fraction, stage_s=stages, steps=steps,
                               psnr_db=psnr_db, cache_threshold=threshold, steps_reused=reused,
                               computed_size=computed_size)

        order = sorted(pixels)
        encoded = await asyncio.gather(*(loop.run_in_executor(self.encoder, encode, i, pixels[i]) for i in order))
        results: list[FrameResult | None] = [None] * len(batch.frames)
        for i, r in zip(order, encoded):
            results[i] = r
        # A lost stream is the replica's failure; an input frame that does not decode, the client's.
        errors = [(i, why, "UNAVAILABLE") for i, why in failed.items()]
        errors += [(i, why, "INVALID_ARGUMENT") for i, why in undecoded.items()]
        for i, why, code in errors:
            fr = batch.frames[i]
            width, height = fr.output_size or (batch.width, batch.height)
            results[i] = FrameResult(b"", width, height, fr.output_format, fr.seed, 0.0, error=why, error_code=code)
        return BatchResult(results, text_s, denoise_s, decode_s, time.perf_counter() - t0)

    async def close_stream(self, stream_id: str) -> bool:
        self.stream_caches.drop(stream_id)
        return self.streams.pop(stream_id, None) is not None

    def _drop_peer_streams(self, peer: int) -> None:
        """A gateway's connection closed (it stopped or died): its streams can never continue."""
        for sid in [sid for sid, st in self.streams.items() if st.peer == peer]:
            del self.streams[sid]
            self.stream_caches.drop(sid)

    async def stats(self) -> ReplicaStats:
        """Any rank: its GPU samples; the leader adds the replica's counters."""
        if self.started is None or not self.started.done() or self.started.exception() is not None:
            return ReplicaStats(0, 0, 0, 0, 0, 0)
        p = self.pipeline.prompts
        graphs = self.fast.graphs.stats() if self.fast.graphs is not None else None
        c = self.stream_caches
        return ReplicaStats(self.frames_computed, self.batches, p.hits, p.misses, len(p), len(self.streams),
                            self.gpu.latest(), self.gpu.batch_energy_joules, graphs, c.snapshot(), c.nbytes, len(c),
                            self.compute.busy_seconds(), tuple(self._gc.seconds), self.fp8_fidelity)
