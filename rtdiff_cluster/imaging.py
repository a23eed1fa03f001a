"""Image encoding and decoding shared by the engine (outputs), the gateway (inputs) and the client."""

from __future__ import annotations

import io

import numpy as np

from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

PNG, JPEG, RAW = pb.IMAGE_FORMAT_PNG, pb.IMAGE_FORMAT_JPEG, pb.IMAGE_FORMAT_RAW_RGB8
FORMAT_NAMES = {PNG: "PNG", JPEG: "JPEG", RAW: "RAW_RGB8"}


class ImageDecodeError(ValueError):
    pass


def encode(pixels: np.ndarray, fmt: int, jpeg_quality: int = 90) -> bytes:
    """pixels: [H, W, 3] uint8 RGB."""
    if fmt == RAW:
        return np.ascontiguousarray(pixels).tobytes()
    from PIL import Image

    buf = io.BytesIO()
    # PNG level 1: the default level 6 costs several times the CPU for ~10% smaller frames,
    # and encoding sits on every frame's path.
    if fmt == PNG:
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    elif fmt == JPEG:
        Image.fromarray(pixels).save(buf, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"unsupported image format {fmt}")
    return buf.getvalue()


def decode(data: bytes, fmt: int, width: int, height: int) -> np.ndarray:
    """Returns [H, W, 3] uint8 RGB; width/height are required for RAW and checked for the others."""
    if fmt == RAW:
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"RAW_RGB8 needs positive width and height, got {width}x{height}")
        if len(data) != width * height * 3:
            raise ImageDecodeError(f"RAW_RGB8 data is {len(data)} bytes, expected {width}*{height}*3 = {width * height * 3}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    if fmt not in (PNG, JPEG):
        raise ImageDecodeError(f"format must be PNG, JPEG or RAW_RGB8, got {fmt}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=[FORMAT_NAMES[fmt]]) as img:
            img.load()
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode {FORMAT_NAMES[fmt]} data: {e}") from None
    return rgb


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """[H, W, 3] uint8 resampled to [height, width, 3] (bilinear; the governor's resolution steps)."""
    from PIL import Image

    if pixels.shape[:2] == (height, width):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
