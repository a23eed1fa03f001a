"""Image encoding and decoding shared by the engine (outputs), the gateway (inputs) and the client."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

PNG, JPEG, RAW = pb.IMAGE_FORMAT_PNG, pb.IMAGE_FORMAT_JPEG, pb.IMAGE_FORMAT_RAW_RGB8
FORMAT_NAMES = {PNG: "PNG", JPEG: "JPEG", RAW: "RAW_RGB8"}


class ImageDecodeError(ValueError):
    pass


@dataclass(frozen=True)
class EncodedImage:
    """An input frame still compressed: a JPEG whose header the gateway checked (width x height),
    decoded by the replica that computes it, on its GPU (engine/gpu_jpeg.py) where it can: a 1024
    frame is ~0.3 MB on the way there instead of 3 MB of pixels, and the gateway spends ~25 us
    on its header instead of a 4-7 ms decode on a host core (23 us against 5.5 ms for PIL's
    decode of a 1024 clip frame on the 2-core VM)."""

    data: bytes
    width: int
    height: int


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's header, without decoding its pixels (PIL reads up to the frame
    header). Raises ImageDecodeError for data that is not a JPEG PIL can open, that defines no
    quantisation table, or that stops before its end-of-image marker (a file cut short). Damage
    past the header (scan data, a table reference) is found only by the decode."""
    from PIL import Image, UnidentifiedImageError

    if b"\xff\xd9" not in data[-32:]:  # encoders may pad after the marker; a few bytes at most
        raise ImageDecodeError("has no JPEG end-of-image marker at its end (cut short?)")
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            if img.mode not in ("RGB", "L", "YCbCr", "CMYK"):
                raise ImageDecodeError(f"JPEG mode {img.mode} is not an image mode we convert to RGB")
            # Without them PIL refuses the file, but nvJPEG decodes something (seen on an H200).
            if not getattr(img, "quantization", None):
                raise ImageDecodeError("has no quantisation tables")
            return img.size
    except UnidentifiedImageError:
        raise ImageDecodeError("is not a JPEG file PIL can read (no valid JPEG header)") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageDecodeError):
            raise
        raise ImageDecodeError(f"cannot read the JPEG header: {e}") from None


def decode_encoded(image: EncodedImage) -> np.ndarray:
    """An EncodedImage decoded on the host ([H, W, 3] uint8 RGB): the path of replicas without a GPU
    decoder, and of frames the GPU decoder refused."""
    return decode(image.data, JPEG, image.width, image.height)


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
