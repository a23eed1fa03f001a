"""The denoising pipeline of one replica rank: text encoding (LRU), few-step loop, decode.

Written over diffusers components instead of a diffusers Pipeline class because the server needs
what those classes do not offer together: batches of frames with their own seeds (so an image does
not depend on what it was batched with), per-stage timing, a backbone sharded across ranks with
classifier-free guidance split over two more, and, later, CUDA graphs per shape. What differs
between model kinds lives in engine/families.py.

Every rank of a replica launches the same batches in the same order (the backbone's all-reduces
and the CFG all-gather meet inside them); only the leader decodes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rtdiff_cluster.cache import token_kv
from rtdiff_cluster.cache.prompt_cache import PromptCache
from rtdiff_cluster.engine.families import family_for
from rtdiff_cluster.engine.graphs import BucketNotReady, GraphCache
from rtdiff_cluster.engine.samplers import scheduler_for
from rtdiff_cluster.engine.step_cache import StepCache
from rtdiff_cluster.models.base import LoadedModel
from rtdiff_cluster.ops.processors import held_across_forwards
from rtdiff_cluster.parallel import groups
from rtdiff_cluster.pinned import PinnedUploads, to_device_async

log = logging.getLogger("rtdiff.pipeline")


@dataclass
class FrameSpec:
    """One image of a batch, as the gateway sends it."""

    prompt: str | None  # None: the stream's current prompt
    negative_prompt: str = ""
    seed: int = 0
    # [H, W, 3] uint8 for image-to-image: a host array, or a tensor already on the model's device
    # (a chunk-cache region, cut from the frame the cache uploaded to measure its changes).
    init_image: np.ndarray | torch.Tensor | None = None
    output_format: int = 1
    jpeg_quality: int = 90
    stream_id: str | None = None
    cache_threshold: float | None = None  # chunk cache of a stream frame: None the model's threshold, < 0 off
    output_size: tuple[int, int] | None = None  # (width, height) to resize the output to; None: the batch's size


@dataclass
class BatchSpec:
    """Frames that share everything the computation's shape depends on."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float  # 0: text-to-image; else every frame has an init_image
    frames: list[FrameSpec] = field(default_factory=list)
    # A region of a larger frame (chunk cache): (frame height, frame width, top, left) in pixels;
    # width and height above are the region's. Its noise is the frame's noise cut to the region,
    # so a region agrees with the whole frame computed at once wherever context does not reach.
    crop: tuple[int, int, int, int] | None = None
    # Regions of several frames (stream_frames.RegionBatch): each frame's (top, left) in its frame,
    # in pixels; crop's top and left are the first frame's. Empty: every frame's region is crop's.
    origins: tuple[tuple[int, int], ...] = ()
    sampler: str = ""  # engine/samplers.py; "": the checkpoint's own scheduler
    target_psnr_db: float = 0.0  # > 0: the replica picks the fewest steps, up to `steps`, within this PSNR of 8 steps
    step_cache: float = 0.0  # > 0: skip a step's backbone call when its probe changed less than this (step_cache.py)

    def region_origins(self) -> list[tuple[int, int]]:
        """Each frame's region (top, left) in its whole frame, in pixels (a region batch)."""
        assert self.crop is not None
        if self.origins:
            assert len(self.origins) == len(self.frames) and self.origins[0] == tuple(self.crop[2:]), self.origins
            return list(self.origins)
        return [tuple(self.crop[2:])] * len(self.frames)


@dataclass
class StageTimes:
    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    steps_reused: int = 0  # step cache: steps that took the last prediction instead of calling the backbone


# Input shapes whose pinned staging buffers a pipeline keeps: a stream alternates between its
# whole frame and a few chunk-cache region buckets; pinning a buffer costs milliseconds.
PINNED_SHAPES = 8
# Initial noise kept on the device per (seed, latent shape): a stream's frames share one seed, and
# drawing a 1024 frame's noise on the host and uploading it took 0.3-0.4 ms per frame (H200 host).
NOISE_ENTRIES = 16
SCHEDULER_ENTRIES = 256  # configured schedulers kept, per (sampler, steps, latent size): a few KiB each


def _noise_free_step(scheduler) -> bool:
    """Whether the scheduler's step adds no noise to its result, so that running it without the
    frames' generators gives the same numbers (and the whole loop can be captured: noise drawn
    from CPU generators cannot be). Known classes are named; an unknown one qualifies only when
    its step takes no generator at all."""
    name, c = type(scheduler).__name__, scheduler.config
    if name == "FlowMatchEulerDiscreteScheduler":
        return not c.get("stochastic_sampling", False)
    if name in ("EulerDiscreteScheduler", "DDIMScheduler"):  # s_churn and eta default to 0: no noise added
        return True
    if name == "DPMSolverMultistepScheduler":
        return "sde" not in c.get("algorithm_type", "")
    return "generator" not in inspect.signature(scheduler.step).parameters


@functools.cache
def _step_takes_generator(scheduler_class: type) -> bool:
    return "generator" in inspect.signature(scheduler_class.step).parameters


def _shapes(tensors) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


def resize_images(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, H, W, 3] uint8 resampled to [B, height, width, 3]: bilinear with PIL's antialiasing when
    shrinking, as imaging.resize does on the host."""
    x = images.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def copy_images_out(images: torch.Tensor, keep_on_device: bool) -> torch.Tensor:
    """A copy of a device tensor of images, queued on the current stream: in pinned host memory
    (for the host's encoder), or on the device (for nvJPEG's). Valid once the stream gets past
    it; the original may be overwritten after (a graph's output by its next replay)."""
    if keep_on_device:
        return images.clone()
    host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
    host.copy_(images, non_blocking=True)
    return host


class _Marks:
    """Stage boundaries of one batch: CUDA events on a GPU (read once the batch is done, so that
    the host never waits for a stage), the wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points[name] = event
        else:
            self.points[name] = time.perf_counter()

    def wait(self, name: str) -> None:
        if self.cuda:
            self.points[name].synchronize()

    def seconds(self, a: str, b: str) -> float:
        if a not in self.points or b not in self.points:
            return 0.0
        if self.cuda:
            return self.points[a].elapsed_time(self.points[b]) / 1e3
        return self.points[b] - self.points[a]


class Launched:
    """A batch whose work is queued on the device; result() waits for it.

    output: the images as the batch left them, [B, H, W, 3] uint8, before result(): on a GPU
    launched with copy_out=False the graph's own output tensor, valid only until the next launch
    (whose replay overwrites it), so the caller reads it in stream order right away; on a CPU
    the finished array."""

    def __init__(self, images: torch.Tensor | np.ndarray | None, marks: _Marks, times: StageTimes,
                 output: torch.Tensor | np.ndarray | None = None):
        self._images, self._marks, self._times = images, marks, times
        self.output = output if output is not None else images
        self._marks.mark("done")

    def result(self) -> tuple[np.ndarray | torch.Tensor | None, StageTimes]:
        """Images [B, H, W, 3] uint8 (None when the batch was not decoded; a finished device
        tensor when launched with keep_on_device) and its stage times: on a GPU the device's
        time between the stages' boundaries."""
        self._marks.wait("done")
        m, t = self._marks, self._times
        t.text_encode_s = m.seconds("start", "text")
        t.denoise_s = m.seconds("text", "denoise")
        t.decode_s = m.seconds("denoise", "done")
        images = self._images
        if isinstance(images, torch.Tensor) and images.device.type == "cpu":
            images = images.numpy()
        return images, t


class _Joined:
    """A batch run as consecutive sub-batches (Pipeline._captured_parts): their images in frame
    order, their stage times added up (they ran one after the other)."""

    def __init__(self, parts: list[Launched]):
        self.parts = parts

    def result(self) -> tuple[np.ndarray | torch.Tensor | None, StageTimes]:
        done = [p.result() for p in self.parts]
        images = [img for img, _ in done]
        times = StageTimes(sum(t.text_encode_s for _, t in done), sum(t.denoise_s for _, t in done),
                           sum(t.decode_s for _, t in done), sum(t.steps_reused for _, t in done))
        if any(img is None for img in images):
            return None, times
        return (np.concatenate(images) if isinstance(images[0], np.ndarray) else torch.cat(images)), times


# A batch size with no graph yet, where smaller captured sizes can cover it, runs as their replays
# (no capture on the serving path: 0.23-0.46 s for an SDXL frame at 1024 on an H200, its warm-up
# runs included, benchmarks/results/new_bucket-2026-11-24-*.md) until it came
# this often: then its own graph, which pays where launches bound the replays (a 512 SDXL frame:
# 11.9 ms as one replay, most of it launch-bound; one capture is worth about 30 such frames).
SPLITS_BEFORE_CAPTURE = 32
MAX_SIGNATURES = 1024  # batch signatures whose captured sizes are remembered (beyond: forgotten, captures go on)


class Pipeline:
    def __init__(self, model: LoadedModel, prompt_cache_size: int, graphs: GraphCache | None = None,
                 loop_graph_max_steps: int = 8, splits_before_capture: int = SPLITS_BEFORE_CAPTURE):
        """graphs: where CUDA graphs of the step, the decode and (for schedules of at most
        loop_graph_max_steps noise-free steps) the whole loop with decode are kept; None: eager.
        splits_before_capture: how often a batch size without a graph runs as replays of smaller
        captured sizes before it is captured itself."""
        self.model = model
        self.family = family_for(model)
        self.prompts = PromptCache(prompt_cache_size)
        self.graphs = graphs
        self.loop_graph_max_steps = loop_graph_max_steps
        self.splits_before_capture = splits_before_capture
        # Per batch signature (all that a graph's key holds but the batch size): the sizes that ran
        # graphed, and how often each uncaptured size was split.
        self._graphed_sizes: dict[tuple, set[int]] = {}
        self._splits: dict[tuple, int] = {}
        # Per frame size and schedule (_region_signature): the (height, width) of chunk-cache
        # regions that ran on captured graphs, where a region whose own are not ready can grow.
        self._graphed_regions: dict[tuple, set[tuple[int, int]]] = {}
        self._launch_graphed: bool | None = None  # this launch's calls all replayed or captured a graph
        self._defer = False  # this launch raises BucketNotReady where a graph is not ready (launch's defer_capture)
        self._eager_keys: set = set()  # buckets whose capture failed: they run eagerly from then on
        # Samplers whose step cannot be captured (DDIM reads the timestep on the host): their loops
        # run step by step, each backbone call still a captured graph.
        self._uncapturable_loops: set[str] = set()
        self._uploads = PinnedUploads(model.device, PINNED_SHAPES)  # input frames' staging buffers
        self._noise: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (seed, c, h, w) -> [1, c, h, w] on the device
        # (sampler, steps, latent h, w) -> (a scheduler with its timesteps set, never stepped; what copies
        # share; {begin step: its image-to-image mix (init, noise) coefficients})
        self._schedulers: OrderedDict[tuple, tuple] = OrderedDict()

    def initial_noise(self, seeds: list[int], latent_hw: tuple[int, int],
                      windows: list[tuple[int, int, int, int]] | None = None) -> torch.Tensor:
        """Per-frame noise from a CPU generator: the same seed gives the same image on any device.
        windows, one (top, left, height, width) per seed in latent pixels: that part of each
        frame's latent_hw noise (chunk-cache regions)."""
        h, w = latent_hw
        c = self.family.latent_channels()
        draws = [self._noise_of(s, (1, c, h, w)) for s in seeds]
        if windows is not None:
            draws = [d[:, :, top:top + wh, left:left + ww] for d, (top, left, wh, ww) in zip(draws, windows, strict=True)]
        noise = draws[0] if len(draws) == 1 else torch.cat(draws)
        return noise.clone(memory_format=torch.contiguous_format)  # [B, C, h, w]; the cached draws stay untouched

    def _noise_of(self, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        key = (seed, *shape)
        noise = self._noise.pop(key, None)
        if noise is None:
            noise = to_device_async(torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)),
                                    self.model.device, self.model.dtype)
            if len(self._noise) >= NOISE_ENTRIES:
                self._noise.popitem(last=False)  # the least recently used
        self._noise[key] = noise
        return noise

    def _upload(self, images: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Input frames as [B, H, W, 3] uint8 on the model's device, through pinned staging
        buffers (rtdiff_cluster/pinned.py). Frames already on the device (chunk-cache regions,
        JPEG inputs decoded there) are only stacked there."""
        on_host = [i for i, img in enumerate(images) if not isinstance(img, torch.Tensor)]
        if len(on_host) == len(images):
            return self._uploads.upload(images)
        parts = list(images)
        if on_host:
            for i, up in zip(on_host, self._uploads.upload([images[i] for i in on_host])):
                parts[i] = up
        return torch.stack([img.to(self.model.device) for img in parts])

    def _scheduler(self, sampler: str, steps: int, h: int, w: int):
        """A fresh scheduler for the sampler with its timesteps set for steps at latent size h x w:
        a copy of one configured once.
        - Building one from its config walks inspect.signature, 2.5-3.5 ms of host time per frame on
          the H200's host while the GPU waited for the graph's replay
          (benchmarks/results/unet_profile-*-frame-1-step.md).
        - set_timesteps copies the timesteps to the device with a blocking copy, which waits for
          every batch still running on the stream: once per configuration, not once per batch,
          lets the next batch's host work overlap this one's GPU work (launch())."""
        key = (sampler, steps, h, w)
        entry = self._schedulers.pop(key, None)
        if entry is None:
            m = self.model
            template = scheduler_for(sampler, m.scheduler_class, m.scheduler_config)
            self.family.set_timesteps(template, steps, h, w)
            # Shared by every copy: the frozen config and the tensors as set (betas, alphas,
            # sigmas, timesteps), which diffusers' schedulers replace, never write in place;
            # copying them was most of a deep copy's 0.1 ms (tests/test_samplers.py checks that
            # no state crosses from one batch to the next).
            shared = {id(v): v for k, v in vars(template).items() if k == "_internal_dict" or isinstance(v, torch.Tensor)}
            entry = (template, shared, {})
            if len(self._schedulers) >= SCHEDULER_ENTRIES:
                self._schedulers.popitem(last=False)
        self._schedulers[key] = entry
        template, shared, _ = entry
        return copy.deepcopy(template, dict(shared))

    def _noised_input(self, sched_key: tuple, scheduler, begin: int, noise: torch.Tensor, init: torch.Tensor,
                      t0: torch.Tensor) -> torch.Tensor:
        """Image-to-image's first latents, the scheduler's mix of the input's latents and the noise at
        t0, as a * init + b * noise. Every sampler's mix is linear with per-timestep scalars; a and
        b are found once per configuration by mixing ones and zeros through the scheduler in the
        latents' dtype (its add_noise copies CPU tables to the device, blocking). With a and b
        those rounded values, each product and the sum round as the scheduler's own would."""
        mixes = self._schedulers[sched_key][2]
        mix = mixes.get((begin, init.dtype))
        if mix is None:
            one = torch.ones((1,) * init.dim(), device=init.device, dtype=init.dtype)
            zero = torch.zeros_like(one)
            mix = mixes[(begin, init.dtype)] = (
                self.family.initial_latents(scheduler, zero, one, t0).item(),
                self.family.initial_latents(scheduler, one, zero, t0).item())
        a, b = mix
        return init * a + noise * b

    def uses_cfg(self, guidance_scale: float) -> bool:
        return self.family.uses_cfg and guidance_scale > 1.0

    def _ready_aside(self, key, fn, *inputs) -> bool:
        """Under defer_capture: whether the bucket can be called now; if not, its capture is queued
        aside (not counted as a deferral: the launch that asks was counted once already)."""
        return key in self._eager_keys or not self.graphs.capture_aside(key, fn, *inputs, count=False)

    def _graphed(self, key, fn, *inputs):
        """fn(*inputs) through the graph cache when there is one and this bucket captures; else eager."""
        if self.graphs is None or key in self._eager_keys or (key[0] == "step" and token_kv.active()):
            self._launch_graphed = False
            return fn(*inputs)
        if self._defer and self.graphs.capture_aside(key, fn, *inputs):
            raise BucketNotReady(key)
        try:
            out = self.graphs.call(key, fn, *inputs)
            self._launch_graphed = self._launch_graphed is not False
            return out
        except Exception as e:  # a capture that fails (an op that syncs, a CPU copy) leaves this bucket eager
            log.warning("CUDA graph for %s failed to capture (%s: %s); running it eagerly", key, type(e).__name__, e)
            self._eager_keys.add(key)
            self._launch_graphed = False
            torch.cuda.synchronize(self.model.device)
            return fn(*inputs)

    def _signature(self, batch: BatchSpec) -> tuple:
        """What a batch's graphs depend on besides its size."""
        return (batch.width, batch.height, batch.steps, batch.strength, batch.crop, batch.sampler,
                self.uses_cfg(batch.guidance_scale), batch.step_cache > 0)

    def _captured_parts(self, batch: BatchSpec) -> tuple[list[int] | None, bool]:
        """Sub-batch sizes, largest first, that cover this batch with sizes already captured at its
        signature, when its own size has none (else None: run it whole); and whether it came often
        enough (splits_before_capture) for a graph of its own."""
        n = len(batch.frames)
        if self.graphs is None or n == 1:
            return None, False
        sig = self._signature(batch)
        sizes = self._graphed_sizes.get(sig)
        if not sizes or n in sizes:
            return None, False
        parts, rest = [], n
        while rest:
            size = max((k for k in sizes if k <= rest), default=0)
            if size == 0:
                return None, False
            parts.append(size)
            rest -= size
        count = self._splits[(sig, n)] = self._splits.get((sig, n), 0) + 1
        if count == 1:
            log.info("a batch of %d at %dx%d runs as replays of captured batch sizes %s; its own graph is captured "
                     "once %d such batches came", n, batch.width, batch.height, parts, self.splits_before_capture)
        return parts, count > self.splits_before_capture

    def run(self, batch: BatchSpec, prompts: list[str], negative_prompts: list[str],
            decode: bool = True) -> tuple[np.ndarray | None, StageTimes]:
        """Images [B, H, W, 3] uint8 (None when decode is False) and the stage times of the batch."""
        return self.launch(batch, prompts, negative_prompts, decode).result()

    @torch.inference_mode()
    def launch(self, batch: BatchSpec, prompts: list[str], negative_prompts: list[str],
               decode: bool = True, resize_output: bool = False, copy_out: bool = True,
               keep_on_device: bool = False, defer_capture: bool = False) -> Launched | _Joined:
        """Queues the batch's GPU work and returns without waiting for it (where nothing in the
        schedule needs a value on the host): the caller may prepare and launch the next batch
        while this one runs, and collects this one's images with result().

        resize_output: frames computed smaller than their output_size (the governor's size rungs)
        come back at that size, resampled on the device (PIL's bilinear on the host took 17 ms per
        1024 frame on the H200's host). Not for chunk-cache frames: their cache holds the
        computed size. copy_out=False (a GPU): the images stay on the device, as Launched.output,
        and result() returns None for them (the chunk cache pastes them there). keep_on_device
        (a GPU, with copy_out): the copy out is a device tensor, for an encoder on the GPU
        (engine/gpu_jpeg.py), and result() returns it finished. A batch whose size has no graph
        yet may run as replays of smaller captured sizes (SPLITS_BEFORE_CAPTURE).

        defer_capture (a graph cache capturing aside): where one of the batch's graphs is not
        captured, its capture is queued off this thread and BucketNotReady raised, before any of
        the batch's results exist (work queued before it, such as the upload, is simply dropped);
        the caller computes the frame another way meanwhile (stream_frames.run_cached)."""
        parts, due = self._captured_parts(batch) if decode and copy_out else (None, False)
        if parts and due:
            # Its own graph: captured aside where the cache can (the split goes on until it is
            # ready), else on this thread now.
            try:
                return self._launch_whole(batch, prompts, negative_prompts, decode, resize_output, copy_out,
                                          keep_on_device, defer_capture=self.graphs.aside)
            except BucketNotReady:
                pass
        if parts:
            launched, at = [], 0
            for size in parts:
                sub = dataclasses.replace(batch, frames=batch.frames[at:at + size])
                launched.append(self.launch(sub, prompts[at:at + size], negative_prompts[at:at + size], decode,
                                            resize_output, copy_out, keep_on_device))
                at += size
            return _Joined(launched)
        return self._launch_whole(batch, prompts, negative_prompts, decode, resize_output, copy_out, keep_on_device,
                                  defer_capture)

    def _launch_whole(self, batch: BatchSpec, prompts: list[str], negative_prompts: list[str], decode: bool,
                      resize_output: bool, copy_out: bool, keep_on_device: bool, defer_capture: bool) -> Launched:
        self._launch_graphed = None
        self._defer = defer_capture
        try:
            launched = self._launch(batch, prompts, negative_prompts, decode, resize_output, copy_out, keep_on_device)
        finally:
            self._defer = False
        if self._launch_graphed and batch.crop is None:  # a chunk-cache region is one frame: never split
            if len(self._graphed_sizes) >= MAX_SIGNATURES:
                self._graphed_sizes.clear()
                self._splits.clear()
            self._graphed_sizes.setdefault(self._signature(batch), set()).add(len(batch.frames))
        elif self._launch_graphed:
            if len(self._graphed_regions) >= MAX_SIGNATURES:
                self._graphed_regions.clear()
            self._graphed_regions.setdefault(self._region_signature(batch), set()).add((batch.height, batch.width))
        return launched

    def _region_signature(self, batch: BatchSpec) -> tuple:
        """What a chunk-cache region's graphs depend on besides its shape (not where it lies)."""
        return (batch.crop[0], batch.crop[1], batch.steps, batch.strength, batch.sampler,
                self.uses_cfg(batch.guidance_scale), batch.step_cache > 0, len(batch.frames))

    def graphed_region_shapes(self, region: BatchSpec) -> set[tuple[int, int]]:
        """(height, width) of the regions of this region's frame size and schedule that ran on
        captured graphs (and so run at once, unless their graphs were evicted since)."""
        return set(self._graphed_regions.get(self._region_signature(region), ()))

    def _launch(self, batch: BatchSpec, prompts: list[str], negative_prompts: list[str], decode: bool,
                resize_output: bool, copy_out: bool, keep_on_device: bool) -> Launched:
        m, fam = self.model, self.family
        times = StageTimes()
        marks = _Marks(m.device)
        marks.mark("start")
        n = len(batch.frames)
        cfg = self.uses_cfg(batch.guidance_scale)
        cfg_split = cfg and groups.cfg_size() == 2  # this rank computes one branch; the other rank the other
        if not cfg:
            cond = self.prompts.get_many(prompts, fam.encode)
        elif cfg_split:
            branch = negative_prompts if groups.cfg_rank() == 0 else prompts
            cond = self.prompts.get_many(branch, fam.encode)
        else:
            neg, pos = self.prompts.get_many(negative_prompts, fam.encode), self.prompts.get_many(prompts, fam.encode)
            cond = tuple(torch.cat([a, b]) for a, b in zip(neg, pos))  # [2B, ...]: unconditional first
        marks.mark("text")

        f = m.limits.vae_scale_factor
        h, w = batch.height // f, batch.width // f
        # A chunk-cache region follows its whole frame's schedule: Flux shifts its sigmas by the
        # token count, and the region's pixels are pasted among the whole frame's.
        sched_h, sched_w = (batch.crop[0] // f, batch.crop[1] // f) if batch.crop is not None else (h, w)
        sched_key = (batch.sampler, batch.steps, sched_h, sched_w)
        scheduler = self._scheduler(*sched_key)
        timesteps = scheduler.timesteps
        begin = 0
        seeds = [fr.seed for fr in batch.frames]
        if batch.crop is None:
            noise = self.initial_noise(seeds, (h, w))
        else:
            full_h, full_w = batch.crop[:2]
            origins = batch.region_origins()
            if fam.origin_in_inputs and len(set(origins)) > 1:
                raise ValueError(f"{self.model.kind} regions at different places cannot share a batch: their token "
                                 f"positions are one input (origins {origins})")
            noise = self.initial_noise(seeds, (full_h // f, full_w // f),
                                       [(top // f, left // f, h, w) for top, left in origins])
        noise = fam.to_model_layout(noise)
        init = None
        if batch.strength > 0:
            # Image-to-image: start part-way down the schedule from the noised input latents.
            begin = batch.steps - min(int(batch.steps * batch.strength), batch.steps)
            timesteps = timesteps[begin * scheduler.order:]
            pixels = self._upload([fr.init_image for fr in batch.frames])

            def encode_of(p):
                x = p.permute(0, 3, 1, 2).to(m.dtype) / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]
                return fam.to_model_layout(fam.encode_image(x))

            # A graph: the encoder's dozens of small eager launches held the GPU idle on the host.
            init = self._graphed(("encode", tuple(pixels.shape)), encode_of, pixels)
        if hasattr(scheduler, "set_begin_index"):
            # A known start spares the scheduler a search of its timesteps (a device sync, which
            # a captured graph cannot contain).
            scheduler.set_begin_index(begin * scheduler.order)
        if init is None:
            latents = fam.initial_latents(scheduler, noise, None, timesteps[:1])
        else:
            latents = self._noised_input(sched_key, scheduler, begin, noise, init, timesteps[:1])
        origin = (batch.crop[2] // f, batch.crop[3] // f) if batch.crop is not None else (0, 0)
        extra = fam.extra_inputs(n, batch.width, batch.height, batch.guidance_scale, h, w, origin)
        names = sorted(extra)
        guidance = torch.full((), batch.guidance_scale, device=m.device, dtype=torch.float32)  # a fill: no blocking copy
        mode = "split" if cfg_split else "cfg" if cfg else "plain"

        def eps_of(x, t, g, *tensors):
            """The backbone's guided prediction for scaled latents x [B, ...] at timestep t."""
            c, ex = tensors[:len(cond)], dict(zip(names, tensors[len(cond):]))
            if mode == "split":
                uncond, cond_out = groups.all_gather_cfg(fam.forward(x, t, c, ex))
            elif mode == "cfg":
                uncond, cond_out = fam.forward(torch.cat([x, x]), t, c, ex).chunk(2)
            else:
                return fam.forward(x, t, c, ex)
            # In float32, as a Python-number guidance scale would be applied: g in bf16 would round 3.3 to 3.297.
            return (uncond.float() + g * (cond_out.float() - uncond.float())).to(uncond.dtype)

        def decode_of(x):
            images = fam.decode(fam.to_vae_layout(x, h, w))  # [B, 3, H, W] in [-1, 1]
            images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            return images.permute(0, 2, 3, 1).contiguous()  # [B, H, W, 3]

        takes_generator = _step_takes_generator(type(scheduler))

        def step_kwargs(stochastic: bool) -> dict:
            if stochastic and takes_generator:  # ancestral samplers draw fresh noise each step: per frame, seeded
                return {"generator": [torch.Generator("cpu").manual_seed(fr.seed ^ 0x5EED) for fr in batch.frames]}
            return {}

        inputs = (*cond, *(extra[k] for k in names))
        shapes = (_shapes((latents, *inputs)), mode, h, w)  # what a captured step depends on
        whole_loop = (decode and self.graphs is not None and mode != "split" and len(timesteps) <= self.loop_graph_max_steps
                      and _noise_free_step(scheduler) and batch.sampler not in self._uncapturable_loops
                      and batch.step_cache <= 0  # the step cache decides on the host between steps
                      and not token_kv.active())  # a stream's recorded K/V: graphs would freeze one stream's
        template = scheduler

        def loop_of(x, g, *tensors):
            # Each run (warm-ups, capture) walks a fresh copy of the schedule; a replay copies
            # it again from this template, which the graph cache keeps alive with loop_of.
            s = copy.deepcopy(template)
            with held_across_forwards(m.backbone):  # the same text states every step: projected once
                for t in s.timesteps[begin * s.order:]:
                    x = s.step(eps_of(fam.scale_input(s, x, t), t, g, *tensors), t, x).prev_sample
            return decode_of(x)

        # The schedule is frozen into the loop: the key holds what it depends on (a region's
        # follows its whole frame's size).
        key = ("loop", batch.sampler, batch.steps, begin, sched_h, sched_w) + shapes
        if (whole_loop and key not in self._eager_keys
                and self.graphs.capture_aside(key, loop_of, latents, guidance, *inputs)):
            # A schedule new at this size (the governor's step rungs): its loop is captured aside
            # while this batch runs step by step, on the step and decode graphs, which every
            # schedule of this size shares. It steps a copy: the capture aside walks copies of
            # the template, which must stay unstepped.
            whole_loop = False
            scheduler = copy.deepcopy(template)
            if self._defer:
                # Those graphs are queued aside too (else captured here, at most once per size),
                # and the batch is turned back until they are ready: a chunk-cache region that
                # met one schedule then waits for no loop at the next. Their inputs' values do
                # not matter to a capture, only their shapes.
                steps_ready = self._ready_aside(("step", timesteps.dtype) + shapes, eps_of, latents, timesteps[0],
                                                guidance, *inputs)
                decode_ready = self._ready_aside(("decode", tuple(latents.shape), h, w), decode_of, latents)
                if not (steps_ready and decode_ready):
                    raise BucketNotReady(key)
        if whole_loop:
            images = self._graphed(key, loop_of, latents, guidance, *inputs)
            if key in self._eager_keys:
                self._uncapturable_loops.add(batch.sampler)
            marks.mark("denoise")  # one graph: the decode's share is not separable (decode_s is the copy out)
        else:
            stochastic = not _noise_free_step(scheduler)
            # Single-rank replicas only: each rank would decide on its own probe, and they must agree.
            cache = StepCache(batch.step_cache) if batch.step_cache > 0 and groups.layout().world == 1 else None
            # The probe sees the conditional branch only: under CFG the second half of each tensor.
            probe_cond = tuple(c[n:] for c in cond) if mode == "cfg" else cond
            for i, t in enumerate(timesteps):
                token_kv.set_step(i)
                x = fam.scale_input(scheduler, latents, t)
                probe = fam.first_block(x, t, probe_cond, extra) if cache is not None else None
                if cache is not None and cache.reuse(probe):
                    eps = cache.prediction
                    times.steps_reused += 1
                else:
                    # The timestep's dtype is part of the graph's inputs: DDIM's are integers, Euler's floats.
                    eps = self._graphed(("step", t.dtype) + shapes, eps_of, x, t, guidance, *inputs)
                    if cache is not None:
                        cache.store(probe, eps)
                latents = scheduler.step(eps, t, latents, **step_kwargs(stochastic)).prev_sample
            marks.mark("denoise")
            if not decode:
                return Launched(None, marks, times)
            images = self._graphed(("decode", tuple(latents.shape), h, w), decode_of, latents)
        sizes = {fr.output_size for fr in batch.frames}
        if resize_output and len(sizes) == 1 and None not in sizes and sizes != {(batch.width, batch.height)}:
            images = resize_images(images, *sizes.pop())
        if m.device.type != "cuda":
            return Launched(images.numpy(), marks, times)
        if not copy_out:
            return Launched(None, marks, times, output=images)
        # Copied out now, in stream order: the next batch's replay of this graph overwrites its output.
        return Launched(copy_images_out(images, keep_on_device), marks, times)
