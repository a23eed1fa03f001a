"""Unary Generate and ListModels end to end: real Ray replica, real gRPC over loopback."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, metric, wait_until
from rtdiff_cluster.client.client import RtdiffClient, image_pixels
from rtdiff_cluster.config import BatchingConfig
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb


@pytest.mark.parametrize("fmt,width,height", [("png", 256, 256), ("jpeg", 128, 64), ("raw", 64, 192)])
def test_generate_returns_image_of_requested_size_and_format(client, fmt, width, height):
    resp = client.generate("a red bicycle", width=width, height=height, steps=2, seed=7, output_format=fmt)
    assert resp.model == TINY and resp.synthetic
    (img,) = resp.images
    assert (img.width, img.height, img.channels, img.seed) == (width, height, 3, 7)
    if fmt == "raw":
        assert img.format == pb.IMAGE_FORMAT_RAW_RGB8 and len(img.data) == width * height * 3
    else:
        decoded = Image.open(io.BytesIO(img.data))
        assert decoded.format == fmt.upper() and decoded.size == (width, height) and decoded.mode == "RGB"
    pixels = image_pixels(img)
    assert pixels.std() > 1.0, "a computed image is not flat"
    t = resp.timing
    assert t.denoise_ms > 0 and t.decode_ms > 0 and t.encode_ms > 0
    assert t.total_ms >= t.denoise_ms + t.decode_ms


def test_num_images_gives_consecutive_seeds_and_distinct_images(client):
    resp = client.generate("three apples", width=64, height=64, steps=1, seed=100, num_images=3, output_format="raw")
    assert [i.seed for i in resp.images] == [100, 101, 102]
    pixels = [image_pixels(i) for i in resp.images]
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[1], pixels[2])


def test_same_seed_same_image_and_other_seed_differs(client):
    kw = dict(width=128, height=128, steps=3, output_format="raw")
    a = image_pixels(client.generate("a lighthouse", seed=42, **kw).images[0])
    b = image_pixels(client.generate("a lighthouse", seed=42, **kw).images[0])
    c = image_pixels(client.generate("a lighthouse", seed=43, **kw).images[0])
    d = image_pixels(client.generate("a lighthouse at night", seed=42, **kw).images[0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d), "the prompt reaches the model"


def test_guidance_and_image_to_image(client):
    base = client.generate("a house", width=64, height=64, steps=4, seed=1, output_format="raw").images[0]
    cfg = client.generate("a house", width=64, height=64, steps=4, seed=1, guidance_scale=5.0,
                          negative_prompt="blurry", output_format="raw").images[0]
    assert not np.array_equal(image_pixels(base), image_pixels(cfg))
    init = pb.Image(format=pb.IMAGE_FORMAT_RAW_RGB8, data=bytes(range(256)) * (64 * 64 * 3 // 256), width=64, height=64)
    i2i = [client.generate("a house", width=64, height=64, steps=4, seed=1, input_image=init, strength=0.5,
                           output_format="raw").images[0] for _ in range(2)]
    assert np.array_equal(image_pixels(i2i[0]), image_pixels(i2i[1]))
    assert not np.array_equal(image_pixels(i2i[0]), image_pixels(base))


def test_list_models_reports_limits(client):
    (m,) = client.list_models()
    assert m.name == TINY and m.family == "unet" and m.synthetic
    assert (m.size_multiple, m.min_size, m.max_size) == (64, 64, 1024)
    assert (m.min_steps, m.max_steps, m.default_steps) == (1, 50, 4)
    assert m.replicas == 1 and m.replicas_ready == 1


def test_concurrent_requests_form_batches(make_gateway):
    # One batch slot and a generous delay: requests arriving together must share a batch.
    gw = make_gateway(batching=BatchingConfig(max_batch_size=4, max_queue_delay_ms=300,
                                              max_inflight_batches_per_replica=1))
    before = gw.metrics()
    results, errors = [], []

    def one(seed):
        try:
            with RtdiffClient(gw.target, timeout_s=60) as c:
                results.append(c.generate("batch me", width=64, height=64, steps=1, seed=seed, output_format="raw"))
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 6
    after = gw.metrics()
    batches = metric(after, "rtdiff_batch_size_count") - metric(before, "rtdiff_batch_size_count")
    frames = metric(after, "rtdiff_batch_size_sum") - metric(before, "rtdiff_batch_size_sum")
    assert frames == 6 and batches < 6, f"6 frames in {batches} batches: no batch larger than one"
    assert metric(after, "rtdiff_batch_size_bucket", le="1.0") - metric(before, "rtdiff_batch_size_bucket", le="1.0") < batches
    # Each image is still its own seed's image, whatever it was batched with.
    assert sorted(r.images[0].seed for r in results) == list(range(6))


def test_metrics_endpoint_moves(shared_gateway, client):
    before = shared_gateway.metrics()
    client.generate("count me", width=64, height=64, steps=1, num_images=2)
    after = wait_until(lambda: (s := shared_gateway.metrics()) and
                       metric(s, "rtdiff_replica_frames_computed_total") > metric(before, "rtdiff_replica_frames_computed_total") and s,
                       what="replica stats poll")
    assert metric(after, "rtdiff_frames_total", model=TINY) - metric(before, "rtdiff_frames_total", model=TINY) == 2
    ok = dict(model=TINY, method="Generate", code="OK")
    assert metric(after, "rtdiff_requests_total", **ok) - metric(before, "rtdiff_requests_total", **ok) == 1
    assert metric(after, "rtdiff_frame_latency_seconds_count") - metric(before, "rtdiff_frame_latency_seconds_count") == 2
    for stage in ("queue", "batch_wait", "text_encode", "denoise", "decode", "encode"):
        assert metric(after, "rtdiff_frame_stage_seconds_count", stage=stage) >= 2
    assert metric(after, "rtdiff_frames_per_second", model=TINY) > 0
    assert metric(after, "rtdiff_replica_up", model=TINY) == 1
    assert metric(after, "rtdiff_queue_depth", model=TINY) == 0
    assert metric(after, "rtdiff_prompt_cache_hits_total") + metric(after, "rtdiff_prompt_cache_misses_total") > 0
    # The compute thread's time in the batch's job (on CPU it computes the frames itself: far above 0).
    busy = "rtdiff_replica_compute_busy_seconds_total"
    assert metric(after, busy, job="queue_batch") - metric(before, busy, job="queue_batch") > 1e-3
    # Each process's garbage collections, counted from start-up: the collection before the
    # freeze of the start-up heap (gc_pauses.py) is a full one, in the replica and the gateway.
    assert metric(after, "rtdiff_replica_gc_pause_seconds_total", model=TINY, generation="2") > 0
    assert metric(after, "rtdiff_gateway_gc_pause_seconds_total", generation="2") > 0
    # No GPU here: the GPU series are absent rather than zero.
    assert not any(name.startswith("rtdiff_gpu_") for name, _ in after)
