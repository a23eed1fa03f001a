"""Bounded queue, deadlines, cancellation, draining: every accepted request gets one terminal status.

A "blocker" is a request large enough (768x768, 10 steps: about 2 s on 2 cores) to hold the only
batch slot of the gateway under test while the test arranges the queue behind it.
"""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import TINY, metric, wait_until
from rtdiff_cluster.client.client import RtdiffClient
from rtdiff_cluster.config import BatchingConfig
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

SMALL = dict(prompt="small", width=64, height=64, steps=1)
BLOCKER = pb.GenerateRequest(prompt="blocker", width=768, height=768, steps=10, output_format=pb.IMAGE_FORMAT_RAW_RGB8)


def one_slot(**kw) -> BatchingConfig:
    return BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_inflight_batches_per_replica=1, **kw)


def computed(ray, replicas) -> int:
    return sum(ray.get(g.leader.stats.remote()).frames_computed for g in replicas)


def start_blocker(gw, c: RtdiffClient):
    fut = c.generate_future(BLOCKER, timeout_s=120)
    wait_until(lambda: gw.call(lambda: gw.gateway.models[TINY].replicas.handles[0].inflight_batches == 1),
               what="blocker dispatched")
    return fut


def test_full_queue_answers_resource_exhausted_at_once(make_gateway):
    gw = make_gateway(batching=one_slot(max_queue_size=2))
    with RtdiffClient(gw.target, timeout_s=120) as c:
        blocker = start_blocker(gw, c)
        queued = [c.generate_future(pb.GenerateRequest(**SMALL, seed=i), timeout_s=120) for i in range(2)]
        wait_until(lambda: metric(gw.metrics(), "rtdiff_queue_depth", model=TINY) == 2, what="queue full")
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(pb.GenerateRequest(**SMALL, seed=9), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.perf_counter() - t0 < 1.0, "overload is answered at once, not after queueing"
        # A request that would not fit whole is refused whole.
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(pb.GenerateRequest(**SMALL, num_images=2), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert blocker.result().images[0].width == 768
        assert [q.result().images[0].seed for q in queued] == [0, 1]
        assert len(c.stub.Generate(pb.GenerateRequest(**SMALL), timeout=60).images) == 1
    # A call is counted just after its answer leaves: wait for the last one's count.
    m = wait_until(lambda: (s := gw.metrics()) and metric(s, "rtdiff_requests_total", code="OK") >= 4 and s,
                   what="the requests counted")
    assert metric(m, "rtdiff_requests_total", code="RESOURCE_EXHAUSTED") == 2
    assert metric(m, "rtdiff_requests_total", code="OK") == 4


def test_request_past_its_deadline_in_queue_is_never_computed(make_gateway, ray_cluster, tiny_actors):
    gw = make_gateway(batching=one_slot())
    with RtdiffClient(gw.target, timeout_s=120) as c:
        before = computed(ray_cluster, tiny_actors)
        blocker = start_blocker(gw, c)
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(pb.GenerateRequest(**SMALL, seed=77), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.perf_counter() - t0 < 1.5
        blocker.result()
        wait_until(lambda: gw.call(lambda: gw.gateway.models[TINY].scheduler.outstanding() == 0), what="idle")
        assert computed(ray_cluster, tiny_actors) - before == 1, "only the blocker was computed"
    # The server's own queue-time bound answers too, with no client deadline at all.
    gw2 = make_gateway(batching=one_slot(max_queue_time_s=0.3))
    with RtdiffClient(gw2.target, timeout_s=120) as c:
        blocker = start_blocker(gw2, c)
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(pb.GenerateRequest(**SMALL), timeout=60)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "never computed" in err.value.details()
        blocker.result()
    wait_until(lambda: metric(gw.metrics(), "rtdiff_requests_total", code="DEADLINE_EXCEEDED") == 1,
               what="deadline counted")


def test_cancelled_call_frees_its_queue_slot(make_gateway, ray_cluster, tiny_actors):
    gw = make_gateway(batching=one_slot(max_queue_size=1))
    with RtdiffClient(gw.target, timeout_s=120) as c:
        before = computed(ray_cluster, tiny_actors)
        blocker = start_blocker(gw, c)
        doomed = c.generate_future(pb.GenerateRequest(**SMALL, seed=1), timeout_s=120)
        wait_until(lambda: metric(gw.metrics(), "rtdiff_queue_depth", model=TINY) == 1, what="queued")
        doomed.cancel()
        wait_until(lambda: metric(gw.metrics(), "rtdiff_queue_depth", model=TINY) == 0, what="slot freed")
        # The freed slot takes a new request (the queue holds one frame).
        replacement = c.generate_future(pb.GenerateRequest(**SMALL, seed=2), timeout_s=120)
        blocker.result()
        assert replacement.result().images[0].seed == 2
        assert computed(ray_cluster, tiny_actors) - before == 2, "the cancelled frame was never computed"
    wait_until(lambda: metric(gw.metrics(), "rtdiff_requests_total", code="CANCELLED") == 1, what="cancel counted")


def test_drain_goes_not_serving_and_finishes_queued_work(make_gateway):
    gw = make_gateway(batching=one_slot())
    with RtdiffClient(gw.target, timeout_s=120) as c:
        health = health_pb2_grpc.HealthStub(c.channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        blocker = start_blocker(gw, c)
        queued = c.generate_future(pb.GenerateRequest(**SMALL, seed=3), timeout_s=120)
        wait_until(lambda: metric(gw.metrics(), "rtdiff_queue_depth", model=TINY) == 1, what="queued")
        gw.loop.call_soon_threadsafe(lambda: gw.loop.create_task(gw.gateway.drain()))
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING,
                   what="NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(pb.GenerateRequest(**SMALL), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert blocker.result().images[0].width == 768
        assert queued.result().images[0].seed == 3
