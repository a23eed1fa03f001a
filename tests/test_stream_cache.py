"""The chunk cache through the server: a real local Ray replica, real gRPC over loopback."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from conftest import FINE_CHUNKS, TINY, metric, wait_until
from rtdiff_cluster import clips
from rtdiff_cluster.client.client import RtdiffClient, image_pixels
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

RAW = pb.IMAGE_FORMAT_RAW_RGB8
SIZE = 512
CACHE = FINE_CHUNKS


@pytest.fixture(scope="module")
def gateway(fine_chunks_gateway):
    return fine_chunks_gateway


def request(i: int, img: np.ndarray, **kw) -> pb.FrameRequest:
    fields = dict(frame_id=i, prompt="a stream" if i == 0 else "", width=SIZE, height=SIZE, steps=2, seed=5,
                  output_format=RAW, strength=0.5,
                  input_image=pb.Image(format=RAW, data=img.tobytes(), width=SIZE, height=SIZE))
    return pb.FrameRequest(**{**fields, **kw})


def test_stream_reuses_chunks_and_frees_its_cache_when_it_ends(gateway):
    moving = list(clips.moving(SIZE, SIZE, 3, area=0.1, step_px=8))
    frames = [moving[0], moving[0], moving[1], moving[2], moving[2]]
    before = gateway.metrics()
    with RtdiffClient(gateway.target, timeout_s=120) as c:
        out = list(c.stream([request(i, f) for i, f in enumerate(frames)], timeout_s=120))
        whole = list(c.stream([request(0, moving[2], cache_threshold=-1)], timeout_s=120))
    assert [r.frame_id for r in out] == [0, 1, 2, 3, 4]
    assert [r.from_cache for r in out] == [False, True, False, False, True]
    assert out[0].recomputed_fraction == 1.0 and out[1].recomputed_fraction == 0.0
    assert all(0 < r.recomputed_fraction < 0.3 for r in out[2:4])
    # From the cache: the same pixels as the frame that computed them, with no compute time.
    assert np.array_equal(image_pixels(out[1].image), image_pixels(out[0].image)) and out[1].timing.denoise_ms == 0
    assert np.array_equal(image_pixels(out[4].image), image_pixels(out[3].image))
    assert whole[0].recomputed_fraction == 1.0 and not whole[0].from_cache

    after = wait_until(lambda: (m := gateway.metrics()) and metric(m, "rtdiff_stream_frames_from_cache_total")
                       >= metric(before, "rtdiff_stream_frames_from_cache_total") + 2 and m, what="cache counters polled")
    reused = metric(after, "rtdiff_stream_chunks_total", outcome="reused") - metric(before, "rtdiff_stream_chunks_total", outcome="reused")
    recomputed = (metric(after, "rtdiff_stream_chunks_total", outcome="recomputed")
                  - metric(before, "rtdiff_stream_chunks_total", outcome="recomputed"))
    chunks = (SIZE // 32) ** 2
    # Frames 1 and 4 reused everything, 2 and 3 most; frame 0 and the cache-off stream's frame
    # (which never touches the cache) computed everything, and only frame 0 counts.
    assert reused > 2 * chunks + chunks and chunks < recomputed < 2 * chunks
    # Both streams ended: their caches are gone from the replica.
    wait_until(lambda: metric(gateway.metrics(), "rtdiff_stream_cache_bytes", model=TINY) == 0
               and metric(gateway.metrics(), "rtdiff_stream_caches", model=TINY) == 0, what="stream caches freed")


def test_cancelled_stream_frees_its_cache(gateway):
    img = clips.texture(SIZE, SIZE, 4)
    with RtdiffClient(gateway.target, timeout_s=120) as c:
        call = c.stub.StreamGenerate(iter([request(0, img)] + [request(i, img) for i in range(1, 1000)]), timeout=120)
        first = next(call)
        assert first.frame_id == 0
        wait_until(lambda: metric(gateway.metrics(), "rtdiff_stream_cache_bytes", model=TINY) > 0, what="cache held")
        call.cancel()
    wait_until(lambda: metric(gateway.metrics(), "rtdiff_stream_cache_bytes", model=TINY) == 0, what="cache freed")


@pytest.mark.parametrize("value", [float("nan"), 256.0, float("inf")])
def test_bad_cache_threshold_is_rejected_and_the_server_keeps_serving(gateway, value):
    img = clips.texture(SIZE, SIZE, 2)
    with RtdiffClient(gateway.target, timeout_s=120) as c:
        with pytest.raises(grpc.RpcError) as err:
            list(c.stream([request(0, img, cache_threshold=value)], timeout_s=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("cache_threshold:")
        assert len(list(c.stream([request(0, img)], timeout_s=120))) == 1
