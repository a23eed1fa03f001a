"""The stream frame-rate governor, samplers and adaptive steps through the server (real Ray, real gRPC)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from conftest import FINE_CHUNKS
from rtdiff_cluster import clips
from rtdiff_cluster.client.client import FrameWindow, RtdiffClient, image_pixels
from rtdiff_cluster.gateway.governor import PATIENCE, SIZE_WARMUP, FrameRateGovernor, GovernorLimits, Rung, ladder
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

RAW = pb.IMAGE_FORMAT_RAW_RGB8


def limits(**kw) -> GovernorLimits:
    base = dict(target_fps=10.0, steps=4, min_steps=2, cache_threshold=None, base_threshold=2.0,
                max_cache_threshold=8.0, cache_on=True)
    return GovernorLimits(**{**base, **kw})


# ---- the governor alone ---------------------------------------------------------------------

def test_ladder_lowers_steps_first_then_raises_the_threshold_within_limits():
    assert ladder(limits()) == [Rung(4, None), Rung(3, None), Rung(2, None), Rung(2, 4.0), Rung(2, 8.0)]
    assert ladder(limits(max_cache_threshold=6.0))[-2:] == [Rung(2, 4.0), Rung(2, 6.0)]
    assert ladder(limits(cache_on=False)) == [Rung(4, None), Rung(3, None), Rung(2, None)]
    assert ladder(limits(max_cache_threshold=0.0, min_steps=4)) == [Rung(4, None)]
    assert ladder(limits(min_scale=0.5))[-3:] == [Rung(2, 8.0), Rung(2, 8.0, 0.75), Rung(2, 8.0, 0.5)]
    assert ladder(limits(min_scale=0.6, cache_on=False))[-2:] == [Rung(2, None), Rung(2, None, 0.75)]


def test_governor_degrades_one_rung_per_change_and_recovers_with_headroom():
    g = FrameRateGovernor()
    lim = limits()  # 100 ms per frame
    rung, governed, epoch = g.settings(lim)
    assert rung == Rung(4, None) and not governed
    g.observe(0.25, epoch)  # too slow: one rung down
    rung, governed, epoch2 = g.settings(lim)
    assert rung == Rung(3, None) and governed and epoch2 == epoch + 1
    g.observe(0.25, epoch)  # a frame admitted before the change says nothing about the new settings
    assert g.settings(lim)[0] == Rung(3, None)
    for _ in range(3):
        g.observe(0.25, g.settings(lim)[2])
    assert g.settings(lim)[0] == Rung(2, 8.0) and g.changes == 4
    g.observe(0.25, g.settings(lim)[2])  # at the bottom of the client's limits it stays there
    assert g.settings(lim)[0] == Rung(2, 8.0)
    for _ in range(PATIENCE - 1):  # fast frames: back up only after PATIENCE in a row
        g.observe(0.01, g.settings(lim)[2])
    assert g.settings(lim)[0] == Rung(2, 8.0)
    g.observe(0.01, g.settings(lim)[2])
    assert g.settings(lim)[0] == Rung(2, 4.0)
    g.observe(0.09, g.settings(lim)[2])  # within the interval but without headroom: hold
    for _ in range(PATIENCE):
        g.observe(0.01, g.settings(lim)[2])
    assert g.settings(lim)[0] == Rung(2, None)


def test_failed_steps_back_need_longer_calm_and_new_sizes_warm_up_unjudged():
    g = FrameRateGovernor()
    lim = limits(max_cache_threshold=0.0, min_steps=3)  # rungs: 4 steps, 3 steps
    observe = lambda latency: g.observe(latency, g.settings(lim)[2])  # noqa: E731
    observe(0.25)
    assert g.settings(lim)[0] == Rung(3, None)
    for _ in range(PATIENCE):
        observe(0.01)
    assert g.settings(lim)[0] == Rung(4, None)  # stepped back...
    observe(0.25)
    assert g.settings(lim)[0] == Rung(3, None)  # ...and it did not hold:
    for _ in range(2 * PATIENCE - 1):  # the next step back waits twice as long
        observe(0.01)
    assert g.settings(lim)[0] == Rung(3, None) and g.patience == 2 * PATIENCE
    observe(0.01)
    assert g.settings(lim)[0] == Rung(4, None)

    g = FrameRateGovernor()
    lim = limits(max_cache_threshold=0.0, min_steps=4, min_scale=0.5)  # rungs: full size, 3/4, 1/2
    observe(0.25)
    assert g.settings(lim)[0].scale == 0.75
    for _ in range(SIZE_WARMUP):  # the new size's first frames (a capture, a whole frame) are not judged
        observe(5.0)
    assert g.settings(lim)[0].scale == 0.75
    observe(0.25)
    assert g.settings(lim)[0].scale == 0.5


# ---- through the server ---------------------------------------------------------------------

SIZE = 256
CACHE = FINE_CHUNKS


@pytest.fixture(scope="module")
def gateway(fine_chunks_gateway):
    return fine_chunks_gateway


def frame(i: int, img: np.ndarray | None = None, **kw) -> pb.FrameRequest:
    fields = dict(frame_id=i, prompt="a stream" if i == 0 else "", width=SIZE, height=SIZE, steps=4, seed=5,
                  output_format=RAW)
    if img is not None:
        fields.update(strength=0.5, input_image=pb.Image(format=RAW, data=img.tobytes(), width=SIZE, height=SIZE))
    return pb.FrameRequest(**{**fields, **kw})


def stream_one_in_flight(gateway, frames: int, **fields) -> list:
    """The moving clip as one stream with one frame in flight, as a live client keeps it: each frame
    is judged on the settings it had."""
    moving = clips.moving(SIZE, SIZE, frames, area=0.1, step_px=8)
    window = FrameWindow((frame(i, f, **fields) for i, f in enumerate(moving)), window=1)
    out = []
    with RtdiffClient(gateway.target, timeout_s=120) as c:
        for r in c.stream(window.requests(), timeout_s=120):
            window.done()
            out.append(r)
    return out


def test_governor_lowers_steps_and_raises_the_threshold_when_a_stream_falls_behind(gateway):
    # 1000 fps is out of reach on CPU: every judged frame is too slow, so the governor walks the whole
    # ladder the client allowed (4 -> 2 steps, then the threshold 2 -> 4 -> 8) and stays at its bottom.
    out = stream_one_in_flight(gateway, 8, target_fps=1000, min_steps=2, max_cache_threshold=8)
    applied = [(r.applied.steps, r.applied.cache_threshold) for r in out]
    assert applied[0] == (4, CACHE.threshold) and not out[0].applied.governed
    assert applied[-1] == (2, 8.0) and out[-1].applied.governed
    steps = [s for s, _ in applied]
    assert steps == sorted(steps, reverse=True)  # never back up: it never had headroom
    assert {a.sampler for a in (r.applied for r in out)} == {"default"}


def test_governor_leaves_a_stream_with_headroom_alone(gateway):
    with RtdiffClient(gateway.target, timeout_s=120) as c:
        out = list(c.stream([frame(i, target_fps=0.01, min_steps=1) for i in range(4)], timeout_s=120))
    assert [(r.applied.steps, r.applied.governed) for r in out] == [(4, False)] * 4


@pytest.mark.parametrize("fields,name", [
    (dict(target_fps=10, min_scale=1.5), "min_scale"),
    (dict(min_scale=0.5), "min_scale"),
    (dict(target_fps=10, min_steps=5), "min_steps"),
    (dict(min_steps=2), "min_steps"),
    (dict(max_cache_threshold=4), "max_cache_threshold"),
    (dict(target_fps=float("inf")), "target_fps"),
    (dict(target_fps=-1), "target_fps"),
])
def test_bad_governor_fields_name_the_field(gateway, fields, name):
    with RtdiffClient(gateway.target, timeout_s=60) as c:
        with pytest.raises(grpc.RpcError) as err:
            list(c.stream([frame(0, **fields)], timeout_s=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(f"{name}:")
        assert len(list(c.stream([frame(0)], timeout_s=60))) == 1


def test_list_models_offers_samplers_and_generate_uses_the_one_asked(gateway):
    with RtdiffClient(gateway.target, timeout_s=120) as c:
        (info,) = c.list_models()
        assert list(info.samplers) == ["default", "euler", "ddim", "dpmpp", "lcm"]
        euler = c.generate("a harbour", width=64, height=64, steps=3, seed=4, output_format="raw", sampler="euler")
        dpm = c.generate("a harbour", width=64, height=64, steps=3, seed=4, output_format="raw", sampler="dpmpp")
    assert (euler.applied.sampler, euler.applied.steps, dpm.applied.sampler) == ("euler", 3, "dpmpp")
    assert not np.array_equal(image_pixels(euler.images[0]), image_pixels(dpm.images[0]))


def test_adaptive_steps_through_the_server_match_the_explicit_steps(gateway):
    target = 35.0
    with RtdiffClient(gateway.target, timeout_s=120) as c:
        adaptive = c.generate("a harbour", width=64, height=64, seed=8, output_format="raw", target_psnr_db=target)
        a = adaptive.applied
        assert 1 <= a.steps <= 8 and a.psnr_db_vs_reference >= target
        explicit = c.generate("a harbour", width=64, height=64, steps=a.steps, seed=8, output_format="raw")
        reference = c.generate("a harbour", width=64, height=64, steps=8, seed=8, output_format="raw")
    from rtdiff_cluster.fidelity import psnr

    assert np.array_equal(image_pixels(adaptive.images[0]), image_pixels(explicit.images[0]))
    if a.steps < 8:
        assert psnr(image_pixels(adaptive.images[0]), image_pixels(reference.images[0])) == pytest.approx(
            a.psnr_db_vs_reference, abs=0.01)


def test_step_cache_through_the_server_reports_the_steps_it_reused(gateway):
    with RtdiffClient(gateway.target, timeout_s=120) as c:
        exact = c.generate("a harbour", width=64, height=64, steps=4, seed=8, output_format="raw")
        none = c.generate("a harbour", width=64, height=64, steps=4, seed=8, output_format="raw",
                          step_cache_threshold=1e-9)
        loose = c.generate("a harbour", width=64, height=64, steps=4, seed=8, output_format="raw",
                           step_cache_threshold=0.99)
    assert exact.applied.steps_reused == none.applied.steps_reused == 0
    assert np.array_equal(image_pixels(none.images[0]), image_pixels(exact.images[0]))
    assert 1 <= loose.applied.steps_reused <= 3


def test_governor_shrinks_the_computed_size_last_and_returns_the_asked_size(gateway):
    # Out of reach again, with one rung of steps and none of threshold: 4 -> 3 steps, then the frame
    # computed at 3/4 and 1/2 of 256 (192, 128), each new size's first SIZE_WARMUP frames unjudged;
    # every image still comes back 256x256.
    out = stream_one_in_flight(gateway, 9, target_fps=1000, min_steps=3, min_scale=0.5, cache_threshold=-1)
    computed = [(r.applied.steps, r.applied.width) for r in out]
    at_192 = [(3, 192)] * (SIZE_WARMUP + 1)
    assert computed[:3 + SIZE_WARMUP] == [(4, 256), (3, 256)] + at_192 and computed[-1] == (3, 128)
    assert all(image_pixels(r.image).shape == (SIZE, SIZE, 3) for r in out)


def test_device_resize_of_a_smaller_computed_frame_matches_the_host_resize():
    """A plain frame computed at a governor's smaller size comes back at its asked size, resampled
    where it was computed; the host's PIL bilinear is the reference (rounding differs by a level)."""
    from rtdiff_cluster import fidelity, imaging
    from rtdiff_cluster.config import ModelConfig
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
    from rtdiff_cluster.models.registry import load_model

    pipe = Pipeline(load_model(ModelConfig(source="synthetic:tiny-sdxl", device="cpu")), 4)
    for out_size in ((96, 80), (48, 40)):  # up and down from the computed 64x64
        batch = BatchSpec(64, 64, 2, 0.0, 0.0, [FrameSpec("a fox", seed=3, output_size=out_size)])
        small, _ = pipe.run(batch, ["a fox"], [""])
        resized, _ = pipe.launch(batch, ["a fox"], [""], resize_output=True).result()
        assert small.shape == (1, 64, 64, 3) and resized.shape == (1, out_size[1], out_size[0], 3)
        want = imaging.resize(small[0], *out_size)
        assert np.abs(resized[0].astype(int) - want.astype(int)).max() <= 3
        assert fidelity.psnr(resized[0], want) >= 45.0
