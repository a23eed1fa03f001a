"""Every class of bad input gets INVALID_ARGUMENT naming the field, and the server keeps serving."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import metric, wait_until
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = dict(model="", prompt="a quiet harbour", width=64, height=64, steps=1, seed=5)

BAD_REQUESTS = {
    "unknown model": (dict(model="no-such-model"), "model"),
    "steps above range": (dict(steps=51), "steps"),
    "steps negative": (dict(steps=-2), "steps"),
    "width not a multiple": (dict(width=100), "width"),
    "height above max": (dict(height=2048), "height"),
    "width negative": (dict(width=-64), "width"),
    "empty prompt": (dict(prompt="   "), "prompt"),
    "oversized prompt": (dict(prompt="x" * 1001), "prompt"),
    "oversized negative prompt": (dict(negative_prompt="y" * 1001), "negative_prompt"),
    "negative batch": (dict(num_images=-1), "num_images"),
    "oversized batch": (dict(num_images=9), "num_images"),
    "negative seed": (dict(seed=-1), "seed"),
    "bad output format": (dict(output_format=7), "output_format"),
    "jpeg quality": (dict(output_format=pb.IMAGE_FORMAT_JPEG, jpeg_quality=101), "jpeg_quality"),
    "guidance NaN": (dict(guidance_scale=float("nan")), "guidance_scale"),
    "guidance too large": (dict(guidance_scale=99.0), "guidance_scale"),
    "strength without input": (dict(strength=0.5), "strength"),
    "input frame that does not decode": (
        dict(input_image=pb.Image(format=pb.IMAGE_FORMAT_PNG, data=b"\x89PNG not really"), steps=2), "input_image.data"),
    "input frame of the wrong size": (
        dict(input_image=pb.Image(format=pb.IMAGE_FORMAT_PNG, data=png(128, 64)), steps=2), "input_image"),
    "raw input frame of the wrong length": (
        dict(input_image=pb.Image(format=pb.IMAGE_FORMAT_RAW_RGB8, data=b"\0" * 100, width=64, height=64), steps=2),
        "input_image.data"),
    "input frame without format": (dict(input_image=pb.Image(data=png(64, 64)), steps=2), "input_image.format"),
    "unknown sampler": (dict(sampler="heun-7"), "sampler"),
    "sampler of another family": (dict(sampler="flow-euler"), "sampler"),
    "target PSNR negative": (dict(target_psnr_db=-1.0), "target_psnr_db"),
    "target PSNR NaN": (dict(target_psnr_db=float("nan")), "target_psnr_db"),
    "step cache threshold of 1": (dict(step_cache_threshold=1.0), "step_cache_threshold"),
    "strength leaves no step": (
        dict(input_image=pb.Image(format=pb.IMAGE_FORMAT_PNG, data=png(64, 64)), strength=0.4), "strength"),
    "input strength out of range": (
        dict(input_image=pb.Image(format=pb.IMAGE_FORMAT_PNG, data=png(64, 64)), strength=1.5), "strength"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_names_field_and_server_keeps_serving(client, case):
    changes, field = BAD_REQUESTS[case]
    request = pb.GenerateRequest(**{**GOOD, **changes})
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:"), err.value.details()
    ok = client.stub.Generate(pb.GenerateRequest(**GOOD), timeout=60)
    assert len(ok.images) == 1 and ok.images[0].width == 64


def test_valid_input_frame_is_accepted(client):
    req = pb.GenerateRequest(**{**GOOD, "steps": 2}, input_image=pb.Image(format=pb.IMAGE_FORMAT_PNG, data=png(64, 64)),
                             strength=0.8)
    assert client.stub.Generate(req, timeout=60).images[0].height == 64


def test_invalid_requests_are_counted_by_code(shared_gateway, client):
    before = shared_gateway.metrics()
    with pytest.raises(grpc.RpcError):
        client.stub.Generate(pb.GenerateRequest(**{**GOOD, "width": 100}), timeout=30)
    key = dict(method="Generate", code="INVALID_ARGUMENT")
    # The status reaches the client before the handler's finally block counts it: wait for the count.
    after = wait_until(lambda: (m := shared_gateway.metrics()) and metric(m, "rtdiff_requests_total", **key)
                       > metric(before, "rtdiff_requests_total", **key) and m, what="the request counted")
    assert metric(after, "rtdiff_requests_total", **key) - metric(before, "rtdiff_requests_total", **key) == 1
