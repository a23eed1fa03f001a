"""StreamGenerate: in-order frames, prompt changes held on the replica, errors, cancellation."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest

from conftest import TINY, metric, wait_until
from rtdiff_cluster.client.client import RtdiffClient, image_pixels
from rtdiff_cluster.config import BatchingConfig
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

RAW = pb.IMAGE_FORMAT_RAW_RGB8
# Frames computed in a batch of several may differ from the same frame computed alone by float
# rounding in batched matmuls (measured: at most 1 of 255 on this CPU); 2 leaves a margin.
BATCHED_TOLERANCE = 2


def frame(i: int, prompt: str = "", **kw) -> pb.FrameRequest:
    fields = dict(frame_id=1000 + i, prompt=prompt, width=64, height=64, steps=2, seed=i, output_format=RAW)
    return pb.FrameRequest(**{**fields, **kw})


def test_frames_come_back_in_order_with_prompt_changes(shared_gateway, client):
    frames = [frame(0, "a forest"), frame(1), frame(2), frame(3, "a desert"), frame(4), frame(5)]
    responses = list(client.stream(frames, timeout_s=120))
    assert [r.frame_id for r in responses] == [1000 + i for i in range(6)]
    assert all(r.replica == f"{TINY}/0" and r.image.width == 64 for r in responses)
    assert all(r.timing.total_ms > 0 and r.timing.denoise_ms > 0 for r in responses)
    # A frame without a prompt uses the stream's current prompt, held by its replica.
    for i, prompt in [(2, "a forest"), (5, "a desert")]:
        ref = client.generate(prompt, width=64, height=64, steps=2, seed=i, output_format="raw").images[0]
        diff = np.abs(image_pixels(responses[i].image).astype(int) - image_pixels(ref).astype(int)).max()
        assert diff <= BATCHED_TOLERANCE, f"frame {i} differs from its unary twin by {diff}"


def test_image_to_image_stream(client):
    init = pb.Image(format=RAW, data=np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8).tobytes(),
                    width=64, height=64)
    frames = [frame(0, "ink", input_image=init, strength=0.5), frame(1, input_image=init, strength=0.5)]
    out = list(client.stream(frames, timeout_s=120))
    plain = list(client.stream([frame(0, "ink")], timeout_s=120))
    assert len(out) == 2
    assert not np.array_equal(image_pixels(out[0].image), image_pixels(plain[0].image))


def test_first_frame_needs_a_prompt(client):
    with pytest.raises(grpc.RpcError) as err:
        list(client.stream([frame(0)], timeout_s=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("prompt:")


def test_bad_frame_ends_stream_after_earlier_frames_are_answered(client):
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for r in client.stream([frame(0, "ok"), frame(1), frame(2, width=100)], timeout_s=60):
            got.append(r.frame_id)
    assert got == [1000, 1001], "frames before the bad one are answered, in order"
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("width:")
    with pytest.raises(grpc.RpcError) as err:
        list(client.stream([frame(0, "ok"), frame(1, model="other")], timeout_s=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("model:")
    assert len(list(client.stream([frame(0, "still serving")], timeout_s=60))) == 1


def test_cancelled_stream_frees_queue_and_replica_state(make_gateway, ray_cluster, tiny_actors):
    gw = make_gateway(batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, stream_max_inflight=4,
                                              max_inflight_batches_per_replica=1))
    baseline = ray_cluster.get(tiny_actors[0].leader.stats.remote()).streams
    feed: queue.Queue = queue.Queue()

    def frames():
        while (f := feed.get()) is not None:
            yield f

    with RtdiffClient(gw.target, timeout_s=120) as c:
        call = c.stream(frames(), timeout_s=120)
        feed.put(frame(0, "kept on the replica"))
        first = next(call)
        assert first.frame_id == 1000
        assert ray_cluster.get(tiny_actors[0].leader.stats.remote()).streams == baseline + 1
        assert metric(gw.metrics(), "rtdiff_streams_active", model=TINY) == 1
        for i in range(1, 4):
            feed.put(frame(i, width=256, height=256, steps=8))
        # Cancel while those frames are in the gateway (two queued behind one computing), so the
        # cancel, not the end of the client's requests, is what ends the call.
        wait_until(lambda: metric(gw.metrics(), "rtdiff_queue_depth", model=TINY) >= 1, what="frames queued")
        call.cancel()
        feed.put(None)
        wait_until(lambda: ray_cluster.get(tiny_actors[0].leader.stats.remote()).streams == baseline, what="replica state freed")
        wait_until(lambda: metric(gw.metrics(), "rtdiff_streams_active", model=TINY) == 0
                   and metric(gw.metrics(), "rtdiff_queue_depth", model=TINY) == 0, what="gateway state freed")
        wait_until(lambda: metric(gw.metrics(), "rtdiff_requests_total", method="StreamGenerate") == 1,
                   what="the stream's end counted")
        codes = {dict(labels)["code"]: v for (name, labels), v in gw.metrics().items()
                 if name == "rtdiff_requests_total" and dict(labels)["method"] == "StreamGenerate" and v}
        assert codes == {"CANCELLED": 1}, codes


def test_stream_flow_control_bounds_frames_in_flight(make_gateway):
    # The client offers 12 frames at once; the server reads at most stream_max_inflight ahead.
    gw = make_gateway(batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, stream_max_inflight=2,
                                              max_inflight_batches_per_replica=1))
    depths = []
    with RtdiffClient(gw.target, timeout_s=120) as c:
        for r in c.stream([frame(0, "flow")] + [frame(i) for i in range(1, 12)], timeout_s=120):
            depths.append(metric(gw.metrics(), "rtdiff_queue_depth", model=TINY))
    assert len(depths) == 12 and max(depths) <= 2


def test_lone_stream_frames_do_not_wait_for_a_batch_that_cannot_fill(make_gateway):
    # A long max_queue_delay and a busy replica: a batch may wait to fill, but with no other
    # caller sending frames nothing could join it, so each frame of the stream goes at once.
    delay_ms = 3000
    gw = make_gateway(batching=BatchingConfig(max_batch_size=4, max_queue_delay_ms=delay_ms, stream_max_inflight=2,
                                              max_inflight_batches_per_replica=2))
    with RtdiffClient(gw.target, timeout_s=120) as c:
        # Frames long enough (256 px, 8 steps) that each arrives while the one before computes.
        big = dict(width=256, height=256, steps=8)
        out = list(c.stream([frame(0, "alone", **big)] + [frame(i, **big) for i in range(1, 6)], timeout_s=120))
    assert [r.frame_id for r in out] == [1000 + i for i in range(6)]
    # Before: a frame waited until the frame ahead of it finished (188-251 ms here), since the
    # replica counted as busy; now it is sent as it is admitted (20 ms: slack for a slow host).
    waits = [r.timing.batch_wait_ms for r in out]
    assert max(waits) < 20, f"frames waited {waits} ms for a batch only they could fill"
