"""Sharded replicas through the whole server: a replica of tp=2 (two gloo ranks on CPU), and of
cfg-parallel 2, answers the same request with the same image as a replica of one process, for
every supported family; a dead follower takes its replica down with UNAVAILABLE, and the whole
group comes back.

Tolerance: sharding reorders float32 sums (about 1e-6 relative); after the VAE that moves a pixel
by far less than one level, but a value sitting on a rounding boundary can land one level over.
So at most 1 of 255 on any pixel.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from conftest import GatewayThread, gateway_config, metric, spawn, wait_until
from rtdiff_cluster.client.client import RtdiffClient, image_pixels
from rtdiff_cluster.config import BatchingConfig, ModelConfig

SHARDING_TOLERANCE = 1


def serve(groups, source: str, **model_kw) -> GatewayThread:
    model = ModelConfig(source=source, warmup=False, **model_kw)
    return GatewayThread(gateway_config(model=model, batching=BatchingConfig(max_queue_delay_ms=0)), {source: groups})


def assert_as_one_process(ref: list[np.ndarray], got: list[np.ndarray], what: str) -> None:
    """Each image a sharded replica made (got) within SHARDING_TOLERANCE of one process's (ref)."""
    assert len(ref) == len(got), (len(ref), len(got))
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.std() > 1
        assert np.abs(a - b).max() <= SHARDING_TOLERANCE, f"{what}: image {i} differs from one process"


def stop(gws: list[GatewayThread], groups: list) -> None:
    for gw in gws:
        gw.stop()
    for g in groups:
        g.kill()


def images(gw: GatewayThread, source: str, guidance: float, strength: float = 0.0) -> list[np.ndarray]:
    init = None
    if strength:
        from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

        pixels = np.random.default_rng(5).integers(0, 255, (128, 128, 3), np.uint8)
        init = pb.Image(format=pb.IMAGE_FORMAT_RAW_RGB8, data=pixels.tobytes(), width=128, height=128)
    with RtdiffClient(gw.target, timeout_s=300) as c:
        resp = c.generate("a lighthouse at dusk", model=source, width=128, height=128, steps=3, seed=11, num_images=2,
                          guidance_scale=guidance, output_format="raw", input_image=init, strength=strength)
    return [image_pixels(i).astype(int) for i in resp.images]


@pytest.mark.parametrize("source, guidance, layout", [
    ("synthetic:tiny", 0.0, dict(tp=2)),
    ("synthetic:tiny", 5.0, dict(cfg_parallel=2)),
    ("synthetic:tiny-sdxl", 5.0, dict(tp=2)),
    ("synthetic:tiny-flux", 3.5, dict(tp=2)),
])
def test_sharded_replica_matches_single_process(ray_cluster, source, guidance, layout):
    single, sharded = spawn(1, source=source), spawn(1, source=source, **layout)
    gws = [serve(single, source), serve(sharded, source, **layout)]
    try:
        info = gws[1].call(lambda: gws[1].gateway.models[source].replicas.handles[0].info)
        assert (info.tp, info.cfg_parallel) == (layout.get("tp", 1), layout.get("cfg_parallel", 1))
        strengths = (0.0, 0.5) if source == "synthetic:tiny" else (0.0,)
        for strength in strengths:
            ref, got = (images(gw, source, guidance, strength) for gw in gws)
            assert_as_one_process(ref, got, f"{layout}, strength {strength}")
    finally:
        stop(gws, single + sharded)


def test_sharded_replica_with_batches_in_flight_answers_each_as_one_process(ray_cluster):
    """The leader and the followers queue a batch and go on to the next before it finishes (their
    waiter threads collect it): concurrent requests, each its own batch, still get their own
    images, as a replica of one process computes them."""
    source = "synthetic:tiny"
    single, sharded = spawn(1, source=source), spawn(1, source=source, tp=2)
    gws = [serve(single, source), serve(sharded, source, tp=2)]

    def one(gw: GatewayThread, seed: int) -> np.ndarray:
        with RtdiffClient(gw.target, timeout_s=300) as c:
            resp = c.generate(f"request {seed}", model=source, width=64, height=64, steps=2, seed=seed,
                              output_format="raw")
        return image_pixels(resp.images[0]).astype(int)
    try:
        seeds = list(range(6))
        with ThreadPoolExecutor(len(seeds)) as pool:
            got = list(pool.map(lambda seed: one(gws[1], seed), seeds))
        assert_as_one_process([one(gws[0], seed) for seed in seeds], got, "concurrent requests")
        assert len({img.tobytes() for img in got}) == len(seeds)  # each request got its own image
    finally:
        stop(gws, single + sharded)


def test_sharded_replica_streams_chunk_cached_frames_as_one_process(ray_cluster):
    """A stream through the chunk cache on a tp=2 replica: the leader launches each frame and
    plans the next while the ranks compute (every frame of the stream is sent at once, so they
    are in flight together). Each frame is reused, recomputed in part or whole as on one process,
    with its pixels."""
    from rtdiff_cluster import clips
    from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

    from conftest import FINE_CHUNKS

    source, size, raw = "synthetic:tiny", 256, pb.IMAGE_FORMAT_RAW_RGB8
    moving = list(clips.moving(size, size, 4, area=0.1, step_px=8))
    frames = [moving[0], moving[0], moving[1], moving[2], moving[2], moving[3]]
    single, sharded = spawn(1, stream_cache=FINE_CHUNKS), spawn(1, stream_cache=FINE_CHUNKS, tp=2)
    gws = [serve(single, source, stream_cache=FINE_CHUNKS), serve(sharded, source, stream_cache=FINE_CHUNKS, tp=2)]

    def stream(gw: GatewayThread) -> list:
        requests = [pb.FrameRequest(frame_id=i, prompt="a stream" if i == 0 else "", width=size, height=size, steps=2,
                                    seed=5, output_format=raw, strength=0.5,
                                    input_image=pb.Image(format=raw, data=f.tobytes(), width=size, height=size))
                    for i, f in enumerate(frames)]
        with RtdiffClient(gw.target, timeout_s=300) as c:
            return list(c.stream(requests, timeout_s=300))
    try:
        ref, got = (stream(gw) for gw in gws)
        assert [r.frame_id for r in got] == list(range(len(frames)))
        assert [r.from_cache for r in got] == [r.from_cache for r in ref] == [False, True, False, False, True, False]
        assert [r.recomputed_fraction for r in got] == [r.recomputed_fraction for r in ref]
        assert all(0 < r.recomputed_fraction < 1 for r in got[2:4]), [r.recomputed_fraction for r in got]  # regions
        pixels = lambda rs: [image_pixels(r.image).astype(int) for r in rs]  # noqa: E731
        assert_as_one_process(pixels(ref), pixels(got), "stream frames")
    finally:
        stop(gws, single + sharded)


def test_sharded_replica_launches_two_streams_regions_together_as_one_process_computes_them(ray_cluster):
    """Two streams' frames in one batch, straight to the replica's leader: their first frames
    whole, then a region of each. A tp=2 replica launches the two regions as one region batch
    (its stats count one launch of two frames) and each frame equals a single-process replica's,
    which computes them one by one. Tolerance: SHARDING_TOLERANCE (batch 2 also sums in another
    order)."""
    from rtdiff_cluster import clips, imaging
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec

    from conftest import FINE_CHUNKS

    size = 256
    moving = list(clips.moving(size, size, 2, area=0.1, step_px=8))
    streams = {"a": moving, "b": [np.ascontiguousarray(f[:, ::-1]) for f in moving]}  # its region elsewhere
    single, sharded = spawn(1, stream_cache=FINE_CHUNKS), spawn(1, stream_cache=FINE_CHUNKS, tp=2)

    def frames(group) -> tuple[list[np.ndarray], object]:
        leader, out = group.leader, []
        for i in range(2):
            batch = BatchSpec(size, size, 2, 0.0, 0.5, [
                FrameSpec("a stream" if i == 0 else None, seed=5, init_image=streams[sid][i], output_format=imaging.RAW,
                          stream_id=sid) for sid in streams])
            result = ray_cluster.get(leader.run_batch.remote(batch), timeout=300)
            assert all(not r.error for r in result.frames), [r.error for r in result.frames]
            assert [r.recomputed_fraction < 1 for r in result.frames] == [i == 1] * 2  # regions the second time
            out += [np.frombuffer(r.data, np.uint8).reshape(size, size, 3).astype(int) for r in result.frames]
        return out, ray_cluster.get(leader.stats.remote()).stream_cache
    try:
        (ref, _), (got, counters) = frames(single[0]), frames(sharded[0])
        assert_as_one_process(ref, got, "two streams' frames")
        # Two whole frames launched one by one, then both regions in one launch.
        assert (counters.launches, counters.launched_frames) == (3, 4), counters
    finally:
        stop([], single + sharded)


def test_backbone_shard_is_half_on_each_rank(ray_cluster):
    single, sharded = spawn(1, source="synthetic:tiny-flux"), spawn(1, source="synthetic:tiny-flux", tp=2)
    try:
        one = ray_cluster.get(single[0].leader.info.remote())
        two = ray_cluster.get(sharded[0].leader.info.remote())
        # Everything planned is split in two; the AdaLN modulation, embedders and norms stay whole.
        assert 0.5 * one.backbone_bytes < two.backbone_bytes < 0.75 * one.backbone_bytes
    finally:
        stop([], single + sharded)


def test_dead_follower_takes_the_replica_down_and_it_comes_back(ray_cluster):
    groups = spawn(1, tp=2)
    gw = serve(groups, "synthetic:tiny", tp=2)
    try:
        handle = gw.call(lambda: gw.gateway.models["synthetic:tiny"].replicas.handles[0])
        follower_pid = ray_cluster.get(groups[0].actors[1].__ray_call__.remote(lambda self: os.getpid()))
        with RtdiffClient(gw.target, timeout_s=120) as c:
            assert c.generate("before", width=64, height=64, steps=1).images[0].width == 64
            os.kill(follower_pid, signal.SIGKILL)
            wait_until(lambda: metric(gw.metrics(), "rtdiff_replica_up", replica="synthetic:tiny/0") == 0,
                       what="replica marked down")
            with pytest.raises(grpc.RpcError) as err:
                c.generate("while down", width=64, height=64, steps=1, timeout_s=5)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            t0 = time.monotonic()
            wait_until(lambda: metric(gw.metrics(), "rtdiff_replica_up", replica="synthetic:tiny/0") == 1, timeout=180,
                       interval=0.5, what="the group restarted")
            assert c.generate("after", width=64, height=64, steps=1).images[0].width == 64
            assert time.monotonic() - t0 < 180
        new_pid = ray_cluster.get(groups[0].actors[1].__ray_call__.remote(lambda self: os.getpid()))
        assert new_pid != follower_pid
        assert gw.call(lambda: handle.info.pid) != 0
    finally:
        stop([gw], groups)
