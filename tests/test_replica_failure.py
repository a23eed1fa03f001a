"""A replica process that dies fails its in-flight work with UNAVAILABLE, never a hang; the
gateway serves on the other replica meanwhile, and Ray's restart brings the dead one back."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from conftest import TINY, metric, spawn, wait_until
from rtdiff_cluster.client.client import RtdiffClient
from rtdiff_cluster.config import BatchingConfig, ModelConfig
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

SMALL = pb.GenerateRequest(prompt="survivor", width=64, height=64, steps=1)
LONG = pb.GenerateRequest(prompt="doomed", width=768, height=768, steps=10)


@pytest.fixture
def two_replicas(ray_cluster):
    groups = spawn(2)
    yield groups
    for g in groups:
        g.kill()


def test_killed_replica_gives_unavailable_and_comes_back(make_gateway, two_replicas):
    gw = make_gateway(actors=two_replicas, model=ModelConfig(source=TINY, replicas=2, warmup=False),
                      batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_inflight_batches_per_replica=1))
    handles = gw.call(lambda: gw.gateway.models[TINY].replicas.handles)
    with RtdiffClient(gw.target, timeout_s=120) as c:
        assert c.list_models()[0].replicas_ready == 2
        # With both idle, the tie goes to replica 0: the long request lands there.
        doomed = c.generate_future(LONG)
        wait_until(lambda: gw.call(lambda: handles[0].inflight_batches == 1), what="long batch on replica 0")
        stream = c.stream([pb.FrameRequest(prompt="pinned", width=64, height=64, steps=1)])
        assert next(stream).replica == f"{TINY}/1"
        os.kill(handles[0].info.pid, signal.SIGKILL)
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            doomed.result()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "died" in err.value.details()
        assert time.perf_counter() - t0 < 30, "the failure is reported, not hung"
        # The other replica keeps serving while the dead one restarts.
        for i in range(3):
            assert c.stub.Generate(SMALL, timeout=60).images[0].width == 64
        assert metric(gw.metrics(), "rtdiff_replica_up", replica=f"{TINY}/1") == 1
        # Ray restarts the actor; the gateway reloads it and routes to it again.
        wait_until(lambda: metric(gw.metrics(), "rtdiff_replica_up", replica=f"{TINY}/0") == 1, timeout=120,
                   interval=0.5, what="replica 0 back")
        assert c.list_models()[0].replicas_ready == 2
        new_pid = gw.call(lambda: handles[0].info.pid)
        assert new_pid != 0
        # Fill replica 1 with a long batch: the next small request must go to the restarted replica 0.
        busy = c.generate_future(LONG)
        wait_until(lambda: gw.call(lambda: sum(h.inflight_batches for h in handles)) == 1, what="long batch placed")
        small = c.stub.Generate(SMALL, timeout=60)
        assert small.images[0].width == 64
        assert busy.result().images[0].width == 768
    m = gw.metrics()
    assert metric(m, "rtdiff_frames_total", replica=f"{TINY}/0") >= 1, "the restarted replica served again"
    assert metric(m, "rtdiff_requests_total", code="UNAVAILABLE") == 1
