"""On a CUDA machine (the device run): the replica runs on the GPU in bf16 and exports NVML series.

Skipped where there is no GPU; CI has none, the device machine runs these with `-m gpu`.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, GatewayThread, gateway_config, metric, spawn, wait_until
from rtdiff_cluster.client.client import RtdiffClient, image_pixels
from rtdiff_cluster.config import FastPathConfig, ModelConfig, StreamCacheConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_replica_exports_power_energy_and_joules_per_frame(ray_cluster):
    actors = spawn(1, device="cuda", num_gpus=1)
    gw = GatewayThread(gateway_config(model=ModelConfig(source=TINY, device="cuda", warmup=True)), {TINY: actors})
    try:
        info = gw.call(lambda: gw.gateway.models[TINY].replicas.handles[0].info)
        assert info.device.startswith("cuda") and info.dtype == "bfloat16" and not info.gpu_disabled_reason
        with RtdiffClient(gw.target, timeout_s=120) as c:
            for seed in range(20):
                img = c.generate("on the gpu", width=512, height=512, steps=4, seed=seed, output_format="raw").images[0]
                assert image_pixels(img).std() > 1.0
        m = wait_until(lambda: (s := gw.metrics()) and metric(s, "rtdiff_gpu_power_watts") > 0 and s,
                       what="GPU series polled")
        assert metric(m, "rtdiff_gpu_energy_joules_total") > 0
        # Joules per frame come from the energy counted during batches, polled: wait for the poll after the last frame.
        m = wait_until(lambda: (s := gw.metrics()) and metric(s, "rtdiff_frame_energy_joules_count", model=TINY) >= 20 and s,
                       what="joules per frame observed")
        assert metric(m, "rtdiff_gpu_memory_used_bytes") > 0 and metric(m, "rtdiff_gpu_memory_total_bytes") > 0
        # The sampled draw sits under the enforced limit (transients above it are short and rare).
        assert 0 < metric(m, "rtdiff_gpu_power_watts") <= 1.2 * metric(m, "rtdiff_gpu_power_limit_watts")
        assert 0 <= metric(m, "rtdiff_gpu_utilization_ratio") <= 1
        assert metric(m, "rtdiff_frame_energy_joules_count", model=TINY) >= 20
        assert metric(m, "rtdiff_frame_energy_joules_sum", model=TINY) > 0
        # The fast paths are on by default: 512x512 frames ran from a captured graph whose memory is counted.
        assert metric(m, "rtdiff_cuda_graphs") >= 1 and metric(m, "rtdiff_cuda_graph_memory_bytes") > 0
        assert metric(m, "rtdiff_cuda_graph_captures_total") >= 1
    finally:
        gw.stop()
        for g in actors:
            g.kill()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability 8.9+")
def test_fp8_replica_reports_its_fidelity_against_the_model_as_loaded(ray_cluster):
    # Every linear of the tiny model in FP8 (its widest has 1280 outputs, under the default 2048).
    fast = FastPathConfig(quantization="fp8", fp8_min_features=16)
    actors = spawn(1, device="cuda", num_gpus=1, fast_paths=fast)
    gw = GatewayThread(gateway_config(model=ModelConfig(source=TINY, device="cuda", warmup=True, fast_paths=fast)),
                       {TINY: actors})
    try:
        info = gw.call(lambda: gw.gateway.models[TINY].replicas.handles[0].info)
        assert info.fast_paths["fp8"].startswith("on: "), info.fast_paths
        m = wait_until(lambda: (s := gw.metrics()) and metric(s, "rtdiff_fp8_fidelity_ssim") > 0 and s,
                       what="FP8 fidelity polled")
        psnr_db, ssim = metric(m, "rtdiff_fp8_fidelity_psnr_db"), metric(m, "rtdiff_fp8_fidelity_ssim")
        # FP8 changes the frame (its 3 mantissa bits round every weight and activation), so the two
        # frames differ: PSNR is finite and SSIM under 1. They stay the same picture: FP8 against
        # bf16 measured 62-64 dB on SDXL and Flux frames (benchmarks/knobs.py); on the tiny model's
        # noise images, whose every pixel is detail, 20 dB is the floor we accept.
        assert 20.0 < psnr_db < 200.0 and 0.5 < ssim < 1.0, (psnr_db, ssim)
        with RtdiffClient(gw.target, timeout_s=120) as c:
            img = c.generate("fp8 serves", width=256, height=256, steps=2, seed=3, output_format="raw").images[0]
            assert image_pixels(img).shape == (256, 256, 3)
    finally:
        gw.stop()
        for g in actors:
            g.kill()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_replica_on_two_gpus_matches_one_gpu_and_reports_both(ray_cluster):
    """NCCL between two GPUs: a tp=2 replica of tiny-flux gives the image one GPU gives (bf16: a
    few levels, the spread bf16 itself shows between batch sizes), and GPU series for both GPUs.
    One replica at a time: on a 2-GPU host the tp=2 replica needs both GPUs (with the one-GPU
    replica still holding one, its placement group would wait forever)."""
    import numpy as np

    source = "synthetic:tiny-flux"
    out = []
    for kw in ({}, {"tp": 2}):
        groups = spawn(1, source=source, device="cuda", num_gpus=1, **kw)
        gw = GatewayThread(gateway_config(model=ModelConfig(source=source, device="cuda", **kw)), {source: groups})
        try:
            with RtdiffClient(gw.target, timeout_s=120) as c:
                out.append(image_pixels(c.generate("two gpus", model=source, width=256, height=256, steps=4, seed=3,
                                                   output_format="raw").images[0]).astype(int))
            if kw:
                m = wait_until(lambda: (s := gw.metrics()) and len({dict(ls).get("gpu") for (n, ls), v in s.items()
                                                                     if n == "rtdiff_gpu_power_watts"}) == 2 and s,
                               what="both GPUs of the tp=2 replica polled")
                assert metric(m, "rtdiff_gpu_memory_used_bytes") > 0
        finally:
            gw.stop()
            for g in groups:
                g.kill()
    assert np.abs(out[0] - out[1]).mean() < 2 and np.abs(out[0] - out[1]).max() <= 24


@pytest.mark.parametrize("source, vae", [("synthetic:sdxl", ""), ("synthetic:flux-dev", ""), ("synthetic:flux-dev", "tiny")])
def test_full_size_preset_makes_a_frame_at_1024(source, vae):
    """The real architectures end to end on one GPU (text encoders, backbone, VAE): a finite,
    non-constant 1024x1024 image in 2 steps."""
    import numpy as np

    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
    from rtdiff_cluster.models.registry import load_model
    from rtdiff_cluster.parallel import groups

    groups.init_single(torch.device("cuda"))
    try:
        model = load_model(ModelConfig(source=source, device="cuda", vae=vae))
        pipe = Pipeline(model, prompt_cache_size=2)
        guidance = model.limits.default_guidance_scale or 5.0
        images, times = pipe.run(BatchSpec(1024, 1024, 2, guidance, 0.0, [FrameSpec("a lighthouse", seed=1)]),
                                 ["a lighthouse"], [""])
        assert images.shape == (1, 1024, 1024, 3) and images.dtype == np.uint8
        assert images.std() > 1.0, "a constant image: NaN or overflow on the way"
        assert times.denoise_s > 0 and times.decode_s > 0
    finally:
        groups.destroy()
        torch.cuda.empty_cache()


def _jpeg_error(jpeg: bytes, raw) -> float:
    """Mean absolute difference, in levels of 255, between a JPEG file and the pixels it encodes."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as img:
        decoded = np.asarray(img.convert("RGB"))
    assert decoded.shape == raw.shape
    return float(np.abs(decoded.astype(int) - raw.astype(int)).mean())

def _pil_jpeg(raw, quality: int = 90, subsampling: int = -1) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


# Tolerance policy for nvJPEG: its error against the exact pixels may be at most 1.5x (+0.5 level)
# that of libjpeg (PIL) on the same pixels at the same quality and the same 4:4:4 sampling. Both
# quantise with the standard tables scaled by quality; measured on the clip frame at 1024 and
# quality 90: 4.3 levels for nvJPEG (benchmarks/image_codec.py, H200).
JPEG_ERROR_RATIO = 1.5


def test_gpu_jpeg_encodes_within_libjpegs_error():
    from rtdiff_cluster import clips
    from rtdiff_cluster.engine.gpu_jpeg import GpuJpeg

    enc, why = GpuJpeg.probe(torch.device("cuda"))
    assert enc is not None, why
    for size in (1024, 200):  # 200: not a multiple of JPEG's 8 or 16 pixel blocks
        raw = next(clips.moving(size, size + 24, 1))
        for quality in (90, 60):
            data = enc.encode(torch.from_numpy(raw).cuda(), quality)
            assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
            ours, pil = _jpeg_error(data, raw), _jpeg_error(_pil_jpeg(raw, quality, subsampling=0), raw)
            assert ours <= JPEG_ERROR_RATIO * pil + 0.5, f"{size} q{quality}: nvJPEG {ours:.2f} vs libjpeg {pil:.2f} levels"


# Graphs captured on the spot: captured aside (the default), a short stream's first frames run
# whole while its regions' graphs land, and these tests compare streams that must reach regions.
ON_THE_SPOT = FastPathConfig(graph_capture_aside=False)


def test_jpeg_frames_of_a_gpu_replica_come_from_nvjpeg_and_match_its_raw_frames(ray_cluster):
    """Unary frames and a stream's launched chunk-cache frames (several in flight, so a frame is
    encoded while the next ones compute): each JPEG decodes to its RAW twin within JPEG's error."""
    from rtdiff_cluster import clips
    from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

    actors = spawn(1, device="cuda", num_gpus=1, fast_paths=ON_THE_SPOT)
    gw = GatewayThread(gateway_config(model=ModelConfig(source=TINY, device="cuda", warmup=True)), {TINY: actors})
    try:
        info = gw.call(lambda: gw.gateway.models[TINY].replicas.handles[0].info)
        assert info.fast_paths["jpeg"].startswith("nvJPEG"), info.fast_paths
        with RtdiffClient(gw.target, timeout_s=120) as c:
            for seed in range(3):
                kw = dict(width=512, height=384, steps=4, seed=seed)
                raw = image_pixels(c.generate("jpeg", output_format="raw", **kw).images[0])
                jpeg = c.generate("jpeg", output_format="jpeg", **kw).images[0]
                assert jpeg.format == pb.IMAGE_FORMAT_JPEG and (jpeg.width, jpeg.height) == (512, 384)
                assert _jpeg_error(jpeg.data, raw) <= JPEG_ERROR_RATIO * _jpeg_error(_pil_jpeg(raw, 90, subsampling=0), raw) + 0.5

            clip = list(clips.moving(512, 512, 8))

            def frames(fmt):
                for i, px in enumerate(clip):
                    yield pb.FrameRequest(frame_id=i, prompt="a stream" if i == 0 else "", width=512, height=512, steps=4,
                                          seed=5, strength=0.5, output_format=fmt,
                                          input_image=pb.Image(format=pb.IMAGE_FORMAT_RAW_RGB8, data=px.tobytes(),
                                                               width=512, height=512))
            raws = [image_pixels(r.image) for r in c.stream(frames(pb.IMAGE_FORMAT_RAW_RGB8), timeout_s=120)]
            jpegs = list(c.stream(frames(pb.IMAGE_FORMAT_JPEG), timeout_s=120))
            assert [r.frame_id for r in jpegs] == list(range(8)) and any(r.recomputed_fraction < 1 for r in jpegs[1:])
            for raw, r in zip(raws, jpegs):
                assert _jpeg_error(r.image.data, raw) <= JPEG_ERROR_RATIO * _jpeg_error(_pil_jpeg(raw, 90, subsampling=0), raw) + 0.5, r.frame_id
    finally:
        gw.stop()
        for g in actors:
            g.kill()



# Tolerance policy for decoding: as for encoding (JPEG_ERROR_RATIO), against the exact pixels the
# file encodes. nvJPEG's decode may be at most 1.5x (+0.5 level) as far from them as libjpeg's
# (PIL). The two decoders differ by their inverse DCT's rounding and, in 4:2:0 files, by how they
# upsample the half-resolution colour, most at the edges of an image whose size is no multiple of
# the 16-pixel block: at 200x224 the two decodes differed by 1.65 levels on average (30 at most)
# on the H200. A wrong colour order, orientation or size is tens of levels off everywhere.


def test_gpu_jpeg_decodes_within_libjpegs_error():
    import numpy as np

    from rtdiff_cluster import clips, imaging
    from rtdiff_cluster.engine.gpu_jpeg import GpuJpegDecoder

    dec, why = GpuJpegDecoder.probe(torch.device("cuda"))
    assert dec is not None, why
    for w, h in ((1024, 1024), (200, 224)):  # 200 x 224: not a multiple of the 16-pixel MCU
        raw = next(clips.moving(h, w, 1)).astype(int)
        for subsampling in (2, 0):  # 4:2:0 (PIL's default, what cameras send) and 4:4:4
            data = _pil_jpeg(raw.astype(np.uint8), 90, subsampling)
            ours = dec.decode(data).cpu().numpy().astype(int)
            pil = imaging.decode(data, imaging.JPEG, 0, 0).astype(int)
            assert ours.shape == pil.shape == (h, w, 3)
            ours_err, pil_err = np.abs(ours - raw).mean(), np.abs(pil - raw).mean()
            assert ours_err <= JPEG_ERROR_RATIO * pil_err + 0.5, \
                f"{w}x{h} sampling {subsampling}: nvJPEG {ours_err:.2f} vs libjpeg {pil_err:.2f} levels from the source"
    with pytest.raises(RuntimeError):
        dec.decode(b"\xff\xd8\xff\xe0 not a jpeg at all")


def test_jpeg_inputs_decode_on_a_gpu_replica_and_match_the_same_pixels_sent_raw(ray_cluster):
    """A stream's JPEG input frames reach the GPU replica compressed and are decoded there: its
    frames equal those of the same stream sent as the pixels nvJPEG decodes (RAW), chunk cache on.
    A damaged frame ends the stream with INVALID_ARGUMENT, and the server keeps serving."""
    import grpc
    import numpy as np

    from rtdiff_cluster import clips
    from rtdiff_cluster.engine.gpu_jpeg import GpuJpegDecoder
    from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

    # Regions one by one: how many of a stream's regions share a launch depends on how the gateway
    # happened to batch its frames, and another batch size reorders bf16 sums by a few levels
    # (region batches have their own test in test_gpu_fast_paths.py). Here both streams must run
    # the same computation, so that only the decode can differ.
    actors = spawn(1, device="cuda", num_gpus=1, fast_paths=ON_THE_SPOT, stream_cache=StreamCacheConfig(region_batch=1))
    gw = GatewayThread(gateway_config(model=ModelConfig(source=TINY, device="cuda", warmup=True)), {TINY: actors})
    try:
        info = gw.call(lambda: gw.gateway.models[TINY].replicas.handles[0].info)
        assert info.fast_paths["jpeg_decode"].startswith("nvJPEG"), info.fast_paths
        assert gw.call(lambda: gw.gateway.models[TINY].decodes_jpeg)
        dec, _ = GpuJpegDecoder.probe(torch.device("cuda"))
        files = [_pil_jpeg(px) for px in clips.moving(512, 512, 8)]
        decoded = [dec.decode(f).cpu().numpy() for f in files]

        def frames(images):
            for i, img in enumerate(images):
                yield pb.FrameRequest(frame_id=i, prompt="a stream" if i == 0 else "", width=512, height=512, steps=4,
                                      seed=5, strength=0.5, output_format=pb.IMAGE_FORMAT_RAW_RGB8, input_image=img)
        with RtdiffClient(gw.target, timeout_s=120) as c:
            as_jpeg = list(c.stream(frames(pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=f) for f in files)))
            as_raw = list(c.stream(frames(pb.Image(format=pb.IMAGE_FORMAT_RAW_RGB8, data=px.tobytes(), width=512,
                                                   height=512) for px in decoded)))
            assert [r.frame_id for r in as_jpeg] == list(range(8)) and any(r.recomputed_fraction < 1 for r in as_jpeg[1:])
            for a, b in zip(as_jpeg, as_raw):
                diff = np.abs(image_pixels(a.image).astype(int) - image_pixels(b.image).astype(int))
                assert diff.mean() <= 0.05 and diff.max() <= 2, (a.frame_id, diff.mean(), diff.max())
            from test_jpeg_inputs import scrambled

            broken = scrambled(files[1])  # no quantisation tables: refused by the gateway's header check
            with pytest.raises(grpc.RpcError) as err:
                list(c.stream(frames([pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=files[0]),
                                      pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=broken)])))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert err.value.details().startswith("input_image.data"), err.value.details()
            assert len(list(c.stream(frames(pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=f) for f in files[:3])))) == 3
    finally:
        gw.stop()
        for g in actors:
            g.kill()


@pytest.mark.parametrize("hold", [True, False])
def test_a_busy_gpu_replica_holds_regions_so_later_batches_join_their_launch(hold):
    """stream_cache.hold_regions: while the replica's GPU has not started its latest launch, the
    regions of two batches (two streams, one frame each) wait, and both go in one launch as it
    starts; each frame equals the same frame computed alone (bf16 policy of
    test_gpu_fast_paths.py: another batch size reorders bf16 sums). Off, each batch launches its
    region at its end."""
    import asyncio

    import numpy as np

    from rtdiff_cluster import clips, imaging
    from rtdiff_cluster.cache.chunk_cache import StreamFrameCache
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec
    from rtdiff_cluster.engine.replica import EngineRank
    from rtdiff_cluster.engine.stream_frames import cache_settings, run_cached
    from rtdiff_cluster.parallel import groups
    from test_gpu_fast_paths import BF16_MAX_LEVELS, BF16_MEAN_LEVELS

    # 32 px chunks and halo: the 10% square's region of a 256 frame stays under max_region_fraction.
    config = ModelConfig(source=TINY, device="cuda", fast_paths=ON_THE_SPOT,
                         stream_cache=StreamCacheConfig(chunk_px=32, halo_px=32, max_region_fraction=0.6,
                                                        hold_regions=hold))
    clip = list(clips.moving(256, 256, 3, area=0.1, step_px=8))
    streams = {"a": clip, "b": [np.ascontiguousarray(f[:, ::-1]) for f in clip]}  # regions elsewhere, same shape

    def batch(sid, i):
        return BatchSpec(256, 256, 4, 0.0, 0.5, [FrameSpec("a stream" if i == 0 else None, seed=5, stream_id=sid,
                                                            init_image=streams[sid][i], output_format=imaging.RAW)])

    def pixels(result):
        (fr,) = result.frames
        assert not fr.error, fr.error
        return np.frombuffer(fr.data, np.uint8).reshape(fr.height, fr.width, 3).astype(int)

    rank = EngineRank(config, 0, 1.0)

    async def serve():
        await rank.start("127.0.0.1", 0)
        for i in (0, 1):  # whole frames, then a region each: their graphs captured before the busy spell
            for sid in streams:
                await rank.run_batch(batch(sid, i))
        before = rank.stream_caches.snapshot()
        def busy():  # ~0.25 s of GPU work, then a launch that starts after it and runs as long
            torch.cuda._sleep(500_000_000)
            rank._note_launch()
            torch.cuda._sleep(500_000_000)
        await asyncio.get_running_loop().run_in_executor(rank.compute, busy)
        out = await asyncio.gather(*(rank.run_batch(batch(sid, 2)) for sid in streams))
        after = rank.stream_caches.snapshot()
        return before, after, [pixels(r) for r in out]

    try:
        before, after, served = asyncio.run(serve())
        assert after.frames_region - before.frames_region == 2
        launches, frames = after.launches - before.launches, after.launched_frames - before.launched_frames
        assert (launches, frames) == ((1, 2) if hold else (2, 2))
        for sid, got in zip(streams, served):  # the same frames alone, on the replica's own pipeline
            cache = StreamFrameCache("cuda")
            settings = cache_settings(config.stream_cache, rank.model.limits.size_multiple)
            for i in range(3):
                alone = run_cached(None, cache, batch(sid, i), settings, launch=lambda x, **kw: rank.pipeline.launch(
                    x, ["a stream"], [""], copy_out=False, **kw))
            diff = np.abs(alone.pixels.astype(int) - got)
            assert alone.plan.kind == "region" and diff.mean() < BF16_MEAN_LEVELS and diff.max() <= BF16_MAX_LEVELS, \
                (sid, diff.mean(), diff.max())
    finally:
        rank.compute.shutdown(wait=True)
        groups.destroy()
        torch.cuda.empty_cache()
