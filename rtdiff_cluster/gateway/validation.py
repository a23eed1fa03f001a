"""Checks every field of a request against the model's limits.

Each failure is an INVALID_ARGUMENT whose message starts with the field's name; nothing here can
raise anything else, so bad input never reaches a replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rtdiff_cluster import imaging
from rtdiff_cluster.engine import samplers
from rtdiff_cluster.engine.pipeline import FrameSpec
from rtdiff_cluster.gateway.errors import invalid
from rtdiff_cluster.gateway.governor import GovernorLimits
from rtdiff_cluster.gateway.scheduler import BatchKey
from rtdiff_cluster.models.base import ModelLimits
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

MAX_SEED = 2**63 - 1
DEFAULT_STRENGTH = 0.6
DEFAULT_JPEG_QUALITY = 90
MAX_TARGET_PSNR_DB = 100.0  # beyond this two uint8 images differ by under a thousandth of a level
OUTPUT_FORMATS = (pb.IMAGE_FORMAT_PNG, pb.IMAGE_FORMAT_JPEG, pb.IMAGE_FORMAT_RAW_RGB8)


@dataclass
class Checked:
    """A request's validated settings: one batch key and the per-frame fields."""

    key: BatchKey
    prompt: str | None
    negative_prompt: str
    seed: int
    output_format: int
    jpeg_quality: int
    input_image: np.ndarray | imaging.EncodedImage | None


def _size(field: str, value: int, default: int, lim: ModelLimits) -> int:
    if value == 0:
        return default
    if value < 0:
        raise invalid(field, f"must be positive, got {value}")
    if value % lim.size_multiple:
        raise invalid(field, f"{value} is not a multiple of {lim.size_multiple}")
    if not lim.min_size <= value <= lim.max_size:
        raise invalid(field, f"{value} is outside {lim.min_size}..{lim.max_size}")
    return value


def _prompt(field: str, text: str, lim: ModelLimits, required: bool) -> str:
    if required and not text.strip():
        raise invalid(field, "must not be empty")
    if len(text) > lim.max_prompt_chars:
        raise invalid(field, f"{len(text)} characters exceeds the limit of {lim.max_prompt_chars}")
    return text


def check_settings(req, lim: ModelLimits, prompt_required: bool, defer_jpeg: bool = False) -> Checked:
    """Shared checks of GenerateRequest and FrameRequest (they have the same field names).
    defer_jpeg: a JPEG input frame is checked by its header and left compressed (check_input_image)."""
    width = _size("width", req.width, lim.default_width, lim)
    height = _size("height", req.height, lim.default_height, lim)
    target_psnr = req.target_psnr_db
    if not math.isfinite(target_psnr) or target_psnr < 0 or target_psnr > MAX_TARGET_PSNR_DB:
        raise invalid("target_psnr_db", f"{target_psnr} is outside 0..{MAX_TARGET_PSNR_DB:g} (0: adaptive steps off)")
    # With a quality target, steps is the budget: by default up to the reference's 8.
    steps = req.steps or (min(samplers.REFERENCE_STEPS, lim.max_steps) if target_psnr else lim.default_steps)
    if not lim.min_steps <= steps <= lim.max_steps:
        raise invalid("steps", f"{req.steps} is outside {lim.min_steps}..{lim.max_steps}")
    sampler = req.sampler or samplers.DEFAULT
    if sampler not in samplers.offered(lim.family):
        raise invalid("sampler", f"unknown sampler {req.sampler!r} for this model; choose one of "
                                 f"{', '.join(samplers.offered(lim.family))}")
    g = req.guidance_scale
    if not math.isfinite(g) or g < 0 or g > lim.max_guidance_scale:
        raise invalid("guidance_scale", f"{g} is outside 0..{lim.max_guidance_scale}")
    guidance = round(g, 4) if g else lim.default_guidance_scale
    prompt_text = _prompt("prompt", req.prompt, lim, prompt_required)
    negative = _prompt("negative_prompt", req.negative_prompt, lim, False)
    if not 0 <= req.seed <= MAX_SEED:
        raise invalid("seed", f"must be in 0..{MAX_SEED}, got {req.seed}")
    fmt = req.output_format or pb.IMAGE_FORMAT_PNG
    if fmt not in OUTPUT_FORMATS:
        raise invalid("output_format", f"unknown image format {req.output_format}")
    quality = req.jpeg_quality or DEFAULT_JPEG_QUALITY
    if not 1 <= quality <= 100:
        raise invalid("jpeg_quality", f"must be in 1..100, got {req.jpeg_quality}")

    image = None
    strength = 0.0
    has_input = req.HasField("input_image")
    if not math.isfinite(req.strength) or req.strength < 0 or req.strength > 1:
        raise invalid("strength", f"{req.strength} is outside (0, 1]")
    if has_input:
        strength = round(req.strength, 4) or DEFAULT_STRENGTH
        if int(steps * strength) < 1:
            raise invalid("strength", f"{strength} x {steps} steps leaves no step to run; raise strength or steps")
        image = check_input_image(req.input_image, width, height, defer_jpeg)
    elif req.strength:
        raise invalid("strength", "only applies with input_image")
    step_cache = req.step_cache_threshold
    if not math.isfinite(step_cache) or step_cache < 0 or step_cache >= 1:
        raise invalid("step_cache_threshold", f"{step_cache} is outside [0, 1) (a relative change; 0: off)")
    return Checked(BatchKey(width, height, steps, guidance, strength, sampler, round(target_psnr, 2),
                            round(step_cache, 4)),
                   prompt_text or None, negative, req.seed, fmt, quality, image)


def check_input_image(img: pb.Image, width: int, height: int, defer_jpeg: bool = False) -> np.ndarray | imaging.EncodedImage:
    """The input frame decoded ([H, W, 3] uint8), or with defer_jpeg (the model's replicas decode
    JPEG on their GPUs) a JPEG checked by its header only and handed on still compressed."""
    if img.format == pb.IMAGE_FORMAT_UNSPECIFIED:
        raise invalid("input_image.format", "must be PNG, JPEG or RAW_RGB8")
    if img.format not in OUTPUT_FORMATS:
        raise invalid("input_image.format", f"unknown image format {img.format}")
    if not img.data:
        raise invalid("input_image.data", "is empty")
    if img.format == pb.IMAGE_FORMAT_RAW_RGB8 and (img.width, img.height) != (width, height):
        raise invalid("input_image", f"is {img.width}x{img.height}, expected {width}x{height} (the request's width x height)")
    if defer_jpeg and img.format == pb.IMAGE_FORMAT_JPEG:
        try:
            w, h = imaging.jpeg_size(img.data)
        except imaging.ImageDecodeError as e:
            raise invalid("input_image.data", str(e)) from None
        if (w, h) != (width, height):
            raise invalid("input_image", f"is {w}x{h}, expected {width}x{height} (the request's width x height)")
        return imaging.EncodedImage(img.data, w, h)
    try:
        pixels = imaging.decode(img.data, img.format, img.width, img.height)
    except imaging.ImageDecodeError as e:
        raise invalid("input_image.data", str(e)) from None
    h, w = pixels.shape[:2]
    if (w, h) != (width, height):
        raise invalid("input_image", f"is {w}x{h}, expected {width}x{height} (the request's width x height)")
    return pixels


def check_cache_threshold(value: float) -> float | None:
    """FrameRequest.cache_threshold: None for the model's threshold (0), negative turns the cache off."""
    if not math.isfinite(value) or value > 255:
        raise invalid("cache_threshold", f"{value} is not a change in 0-255 levels (0: the model's, negative: off)")
    return None if value == 0 else float(value)


def frame_specs(c: Checked, count: int, stream_id: str | None = None, cache_threshold: float | None = None,
                output_size: tuple[int, int] | None = None) -> list[FrameSpec]:
    return [FrameSpec(prompt=c.prompt, negative_prompt=c.negative_prompt, seed=c.seed + i, init_image=c.input_image,
                      output_format=c.output_format, jpeg_quality=c.jpeg_quality, stream_id=stream_id,
                      cache_threshold=cache_threshold, output_size=output_size)
            for i in range(count)]


def scaled_size(width: int, height: int, scale: float, lim: ModelLimits) -> tuple[int, int]:
    """width x height times scale, each rounded to the model's size multiple and kept within its minimum."""
    m = lim.size_multiple
    return tuple(max(lim.min_size, m, int(round(v * scale / m)) * m) for v in (width, height))


def check_num_images(n: int, lim: ModelLimits) -> int:
    if n < 0:
        raise invalid("num_images", f"must be positive, got {n}")
    n = n or 1
    if n > lim.max_images_per_request:
        raise invalid("num_images", f"{n} exceeds the limit of {lim.max_images_per_request}")
    return n


MAX_TARGET_FPS = 1000.0


def check_governor(req, c: Checked, lim: ModelLimits, threshold: float | None, base_threshold: float,
                   cache_enabled: bool) -> GovernorLimits | None:
    """FrameRequest's governor fields (target_fps, min_steps, max_cache_threshold); None when off."""
    fps = req.target_fps
    if not math.isfinite(fps) or fps < 0 or fps > MAX_TARGET_FPS:
        raise invalid("target_fps", f"{fps} is outside 0..{MAX_TARGET_FPS:g} (0: no governor)")
    steps = c.key.steps
    if not 0 <= req.min_steps <= steps:
        raise invalid("min_steps", f"{req.min_steps} is outside 0..{steps} (the frame's steps)")
    top = req.max_cache_threshold
    if not math.isfinite(top) or top < 0 or top > 255:
        raise invalid("max_cache_threshold", f"{top} is not a change in 0-255 levels (0: not raised)")
    if not math.isfinite(req.min_scale) or not 0 <= req.min_scale <= 1:
        raise invalid("min_scale", f"{req.min_scale} is outside (0, 1] (0: the size is never changed)")
    if fps == 0:
        for name, value in (("min_steps", req.min_steps), ("max_cache_threshold", top), ("min_scale", req.min_scale)):
            if value:
                raise invalid(name, "only applies with target_fps > 0")
        return None
    floor = req.min_steps or lim.min_steps
    strength = c.key.strength
    while strength and int(floor * strength) < 1:  # image-to-image must keep at least one step to run
        floor += 1
    floor = min(floor, steps)
    cache_on = cache_enabled and c.input_image is not None and (threshold is None or threshold >= 0)
    if top and cache_on and (threshold if threshold is not None else base_threshold) > top:
        raise invalid("max_cache_threshold", f"{top} is below the frame's cache threshold "
                                             f"{threshold if threshold is not None else base_threshold}")
    return GovernorLimits(fps, steps, floor, threshold, base_threshold, top, cache_on, req.min_scale or 1.0)
