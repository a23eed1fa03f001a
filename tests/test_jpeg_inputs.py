"""JPEG input frames handed to the replica still compressed (imaging.EncodedImage).

A gateway whose replicas all decode JPEG on their GPUs (ServedModel.decodes_jpeg, from each
replica's `jpeg_decode` fast path) checks a JPEG input frame by its header only and sends it on
compressed; the replica decodes it (nvJPEG, or PIL where it has no GPU decoder or nvJPEG refuses
the frame) and brings it to the batch's size. A frame whose header is fine but whose data does
not decode fails alone, INVALID_ARGUMENT naming input_image.data, and the rest of its batch goes on.

On CPU the replicas decode with PIL: these tests cover the protocol, the per-frame failure and
the resize; tests/test_gpu.py holds nvJPEG's decode to libjpeg's error on the GPU.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import TINY
from rtdiff_cluster import imaging
from rtdiff_cluster.gateway.errors import RequestError
from rtdiff_cluster.gateway.validation import check_input_image
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb


def scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    base = np.add.outer(np.arange(height), np.arange(width)) % 256
    return np.clip(base[..., None] + g.integers(-20, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def broken_body(data: bytes) -> bytes:
    """A JPEG whose header reads (size, mode) but whose entropy-coded data stops a few bytes after
    its start-of-scan marker."""
    return data[: data.index(b"\xff\xda") + 24]


def undecodable(data: bytes) -> bytes:
    """A JPEG whose header reads (size, tables) and ends with its marker, but whose first colour
    component names quantisation table 3, which the file does not define: the header check passes,
    PIL's decode fails."""
    out = bytearray(data)
    sof = data.index(b"\xff\xc0")  # FF C0, length 2, precision 1, height 2, width 2, count 1, then id, sampling, table
    out[sof + 12] = 3
    return bytes(out)


def scrambled(data: bytes) -> bytes:
    """A JPEG whose frame header (size) and end marker are sound but whose quantisation tables are
    gone: refused by the header check (nvJPEG would decode it without a word)."""
    out, i = bytearray(data[:2]), 2
    while data[i + 1] != 0xDA:  # segments up to the start of scan: FF, marker, 2-byte length
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] != 0xDB:  # DQT
            out += data[i:i + 2 + length]
        i += 2 + length
    return bytes(out + data[i:])


def test_the_header_check_defers_the_decode():
    data = jpeg(scene(64, 48))
    img = check_input_image(pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=data), 64, 48, defer_jpeg=True)
    assert isinstance(img, imaging.EncodedImage) and (img.width, img.height) == (64, 48) and img.data == data
    # Without the flag, or for PNG, the gateway decodes as before.
    assert check_input_image(pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=data), 64, 48).shape == (48, 64, 3)
    png = io.BytesIO()
    Image.fromarray(scene(64, 48)).save(png, format="PNG")
    assert check_input_image(pb.Image(format=pb.IMAGE_FORMAT_PNG, data=png.getvalue()), 64, 48, True).shape == (48, 64, 3)
    cases = [(b"\xff\xd8\xff not a jpeg\xff\xd9", "input_image.data: is not a JPEG"),
             (broken_body(data), "input_image.data: has no JPEG end-of-image marker"),
             (scrambled(data), "input_image.data: has no quantisation tables"),
             (jpeg(scene(32, 48)), "input_image: is 32x48, expected 64x48")]
    for refused, message in cases:
        with pytest.raises(RequestError) as err:
            check_input_image(pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=refused), 64, 48, defer_jpeg=True)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.message.startswith(message), err.value.message
    # Data that does not decode behind a sound header and end marker is found by the replica (below).
    assert isinstance(check_input_image(pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=undecodable(data)), 64, 48, True),
                      imaging.EncodedImage)


def test_a_replica_decodes_compressed_frames_and_fails_only_the_bad_one(ray_cluster, tiny_actors):
    """Through the replica link, as the gateway sends them: a batch of a compressed frame, one whose
    data does not decode, one already decoded, and a compressed one at half size (a governor rung
    computes smaller frames; the replica resizes after its decode)."""
    from rtdiff_cluster.engine.link import BlockingLink
    from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec

    actor = tiny_actors[0].leader
    address = ray_cluster.get(actor.info.remote()).link
    pixels = scene(64, 64, seed=1)
    data = jpeg(pixels)
    small = scene(32, 32, seed=2)
    raw = pb.IMAGE_FORMAT_RAW_RGB8
    frames = [FrameSpec("a harbour", seed=7, init_image=imaging.EncodedImage(data, 64, 64), output_format=raw),
              FrameSpec("a harbour", seed=7, init_image=imaging.EncodedImage(undecodable(data), 64, 64), output_format=raw),
              FrameSpec("a harbour", seed=7, init_image=imaging.decode(data, imaging.JPEG, 0, 0), output_format=raw),
              FrameSpec("a harbour", seed=8, init_image=imaging.EncodedImage(jpeg(small), 32, 32), output_format=raw),
              FrameSpec("a harbour", seed=8, init_image=imaging.resize(imaging.decode(jpeg(small), imaging.JPEG, 0, 0),
                                                                        64, 64), output_format=raw)]
    with BlockingLink(address) as link:
        result = link.call("run_batch", BatchSpec(64, 64, 2, 0.0, 0.5, frames))
        good, bad, decoded, resized, host_resized = result.frames
        assert bad.error.startswith("input_image.data:") and bad.error_code == "INVALID_ARGUMENT", (bad.error, bad.error_code)
        for fr in (good, decoded, resized, host_resized):
            assert not fr.error and (fr.width, fr.height) == (64, 64) and len(fr.data) == 64 * 64 * 3
        assert good.data == decoded.data, "a frame decoded by the replica equals the same frame decoded by the gateway"
        assert resized.data == host_resized.data, "resized after the decode as the gateway would have"
        # The replica keeps serving. Alone, the frame is the same image up to rounding (a batch of
        # one multiplies in another order on the CPU than a batch of four: a level or two).
        again = link.call("run_batch", BatchSpec(64, 64, 2, 0.0, 0.5, frames[:1])).frames[0]
        diff = np.abs(np.frombuffer(again.data, np.uint8).astype(int) - np.frombuffer(good.data, np.uint8))
        assert not again.error and diff.max() <= 2, diff.max()


@pytest.fixture
def deferring_gateway(make_gateway):
    """A gateway that hands JPEG input frames on compressed, as it does when its replicas decode
    on GPUs (set here by hand: the CPU replicas decode with PIL, on the same path)."""
    g = make_gateway()
    g.call(lambda: setattr(g.gateway.models[TINY], "decodes_jpeg", True))
    return g


def test_through_the_gateway_a_bad_frame_fails_alone_and_the_server_goes_on(deferring_gateway):
    from rtdiff_cluster.client.client import RtdiffClient

    data = jpeg(scene(64, 64, seed=3))
    good = pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=data)
    bad = pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=undecodable(data))  # passes the gateway, fails the replica's decode
    common = dict(width=64, height=64, steps=2, strength=0.5, seed=4, output_format="raw")
    with RtdiffClient(deferring_gateway.target, timeout_s=120) as c:
        out = c.generate("a harbour", input_image=good, **common)
        assert out.images[0].width == 64
        with pytest.raises(grpc.RpcError) as err:
            c.generate("a harbour", input_image=bad, **common)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("input_image.data:"), err.value.details()
        for refused in (b"\xff\xd8\xffjunk\xff\xd9", broken_body(data), scrambled(data)):  # refused at the gateway
            with pytest.raises(grpc.RpcError) as err:
                c.generate("a harbour", input_image=pb.Image(format=pb.IMAGE_FORMAT_JPEG, data=refused), **common)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input_image.data" in err.value.details()
        again = c.generate("a harbour", input_image=good, **common)
        assert again.images[0].data == out.images[0].data, "the same frame and seed give the same image"
        # The same JPEG decoded by the gateway (PIL) gives the same image as decoded by the replica.
    deferring_gateway.call(lambda: setattr(deferring_gateway.gateway.models[TINY], "decodes_jpeg", False))
    with RtdiffClient(deferring_gateway.target, timeout_s=120) as c:
        assert c.generate("a harbour", input_image=good, **common).images[0].data == out.images[0].data
