"""An engine replica: one Ray actor that holds a model and turns batches into encoded frames.

The actor is asyncio-based: torch work runs on one compute thread (so batches execute in arrival
order, which keeps each stream's frames in order), image encoding on a small CPU pool. With two
batches in flight the next batch computes while the previous one encodes.

Ray carries the control calls (info, warmup, stats); batches and stream closes come over the
replica link (engine/link.py), whose address and key `info()` hands out. run_batch and
close_stream stay callable through Ray too, for scripts that hold only the actor handle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from rtdiff_cluster import imaging
from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.engine.link import LinkAddress, LinkServer, current_peer, new_key, node_host
from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
from rtdiff_cluster.metrics.gpu_sampler import GpuSample, GpuSampler
from rtdiff_cluster.models.base import ModelLimits
from rtdiff_cluster.models.registry import load_model

log = logging.getLogger("rtdiff.replica")

# A replica forgets the least recently used stream beyond this many; the gateway closes streams
# explicitly, so this only bounds memory if a gateway dies without closing them.
MAX_STREAMS_PER_REPLICA = 4096


# Host threads of a replica whose model is on a GPU: its CPU work is tokenizing, seeding noise and
# copying frames; more intra-op threads only spin there and take cores from the serving path.
CUDA_REPLICA_THREADS = 2


def cpu_threads(replicas: int) -> int:
    """A CPU replica's intra-op threads: the node's cores but one, which the gateway, image
    encoding and Ray need (measured on 2 cores: one thread ran a 64x64 frame in 12 ms, two in 29,
    benchmarks/NOTES.md), shared among the model's replicas."""
    return max(1, ((os.cpu_count() or 1) - 1) // replicas)


class StreamStateLost(Exception):
    """A stream frame relies on state this replica does not hold (it restarted)."""


@dataclass
class FrameResult:
    data: bytes
    width: int
    height: int
    format: int
    seed: int
    encode_s: float
    error: str = ""  # non-empty: this frame failed (the stream's state was lost)


@dataclass
class BatchResult:
    frames: list[FrameResult]
    text_encode_s: float
    denoise_s: float
    decode_s: float
    joules_per_frame: float | None
    replica_s: float = 0.0  # run_batch's wall time, handoffs to the compute and encode threads included


@dataclass
class ReplicaInfo:
    limits: ModelLimits
    pid: int
    device: str
    dtype: str
    load_s: float
    parameter_bytes: int
    gpu_disabled_reason: str
    torch_threads: int
    link: LinkAddress  # where the gateway sends batches (engine/link.py)


@dataclass
class ReplicaStats:
    frames_computed: int
    batches: int
    prompt_cache_hits: int
    prompt_cache_misses: int
    prompt_cache_entries: int
    streams: int
    gpus: list[GpuSample] = field(default_factory=list)


@dataclass
class _StreamState:
    prompt: str
    negative_prompt: str
    peer: int | None  # the link connection that opened it: its state goes when that connection closes


class EngineReplica:
    def __init__(self, config: ModelConfig, stats_interval_s: float):
        t0 = time.perf_counter()
        torch.set_num_threads(config.torch_threads or cpu_threads(config.replicas))  # loading is CPU work
        self.model = load_model(config)
        if not config.torch_threads and self.model.device.type == "cuda":
            torch.set_num_threads(CUDA_REPLICA_THREADS)
        self.pipeline = Pipeline(self.model, config.prompt_cache_size)
        self.load_s = time.perf_counter() - t0
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="rtdiff-compute")
        self.encoder = ThreadPoolExecutor(2, thread_name_prefix="rtdiff-encode")
        self.gpu = GpuSampler(self.model.device, stats_interval_s)
        self.streams: OrderedDict[str, _StreamState] = OrderedDict()
        self.frames_computed = 0
        self.batches = 0
        self.link = LinkServer({"run_batch": self.run_batch, "close_stream": self.close_stream}, new_key(),
                               on_disconnect=self._drop_peer_streams)

    async def info(self) -> ReplicaInfo:
        m = self.model
        link = await self.link.start(node_host())
        return ReplicaInfo(m.limits, os.getpid(), str(m.device), str(m.dtype).removeprefix("torch."),
                           self.load_s, m.parameter_bytes(), self.gpu.disabled_reason, torch.get_num_threads(), link)

    async def warmup(self) -> float:
        """One frame at the default size, so the first user request pays no one-time costs."""
        lim = self.model.limits
        t0 = time.perf_counter()
        batch = BatchSpec(lim.default_width, lim.default_height, lim.default_steps, lim.default_guidance_scale, 0.0,
                          [FrameSpec("warm-up")])
        await asyncio.get_running_loop().run_in_executor(self.compute, self.pipeline.run, batch, ["warm-up"], [""])
        return time.perf_counter() - t0

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
                    self.streams.popitem(last=False)
            if fr.prompt is None and state is None:
                failed[i] = "the stream's state was lost (the replica restarted)"
                continue
            keep.append(i)
            prompts.append(fr.prompt if fr.prompt is not None else state.prompt)
            negatives.append(fr.negative_prompt if fr.prompt is not None else state.negative_prompt)
        return keep, prompts, negatives, failed

    async def run_batch(self, batch: BatchSpec) -> BatchResult:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        keep, prompts, negatives, failed = self._resolve_prompts(batch)
        images, times, joules = [], None, None
        if keep:
            sub = BatchSpec(batch.width, batch.height, batch.steps, batch.guidance_scale, batch.strength,
                            [batch.frames[i] for i in keep])
            e0 = self.gpu.energy_joules()
            images, times = await loop.run_in_executor(self.compute, self.pipeline.run, sub, prompts, negatives)
            e1 = self.gpu.energy_joules()
            if e0 is not None and e1 is not None:
                joules = (e1 - e0) / len(keep)
            self.frames_computed += len(keep)
            self.batches += 1

        def encode(i: int, pixels) -> FrameResult:
            fr = batch.frames[i]
            t = time.perf_counter()
            data = imaging.encode(pixels, fr.output_format, fr.jpeg_quality)
            return FrameResult(data, batch.width, batch.height, fr.output_format, fr.seed, time.perf_counter() - t)

        encoded = await asyncio.gather(*(loop.run_in_executor(self.encoder, encode, i, img) for i, img in zip(keep, images)))
        results: list[FrameResult | None] = [None] * len(batch.frames)
        for i, r in zip(keep, encoded):
            results[i] = r
        for i, why in failed.items():
            fr = batch.frames[i]
            results[i] = FrameResult(b"", batch.width, batch.height, fr.output_format, fr.seed, 0.0, error=why)
        return BatchResult(results, times.text_encode_s if times else 0.0, times.denoise_s if times else 0.0,
                           times.decode_s if times else 0.0, joules, time.perf_counter() - t0)

    async def close_stream(self, stream_id: str) -> bool:
        return self.streams.pop(stream_id, None) is not None

    def _drop_peer_streams(self, peer: int) -> None:
        """A gateway's connection closed (it stopped or died): its streams can never continue."""
        for sid in [sid for sid, st in self.streams.items() if st.peer == peer]:
            del self.streams[sid]

    async def stats(self) -> ReplicaStats:
        p = self.pipeline.prompts
        return ReplicaStats(self.frames_computed, self.batches, p.hits, p.misses, len(p), len(self.streams),
                            self.gpu.latest())
