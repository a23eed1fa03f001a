"""JPEG encoding of finished frames on the GPU: nvJPEG through torchvision.io.encode_jpeg.

A 1024 frame's JPEG took 6.0 ms p50 on one host core of the H200 machine (PIL's libjpeg, the
stream_serving run of 2026-11-24), on every frame's path to the client; nvJPEG encodes it from
the device copy of the image and brings back only the compressed bytes
(benchmarks/image_codec.py). torchvision ships nvJPEG in its wheels, so this is the field's
library, not a binding of our own; where it does not import or cannot encode on this GPU the
replica encodes on the host as before, and its startup report says why.

nvJPEG writes 4:4:4 (full-resolution colour), so its frames are larger than PIL's 4:2:0 at the
same quality setting; both decode with any JPEG decoder.

Streams. torchvision's encoder runs on a stream of its own that waits for no other: callers pass
images whose GPU work has finished (the replica's waiter thread synchronised on their event), and
the planar copy made here is finished before the encoder starts. Its last copy (the bitstream
out of nvJPEG's state) is issued on the legacy default stream, so this module issues its own
work there too, to be ordered after it, and the replica computes on a stream of its own
(engine/replica.py). With 20 ms of matmuls queued on the default stream a 1024 encode took
17.7 ms, with them on another stream 1.6 ms, alone 0.2 ms (benchmarks/image_codec.py, H200).
"""

from __future__ import annotations

import torch


class GpuJpeg:
    def __init__(self, device: torch.device):
        from torchvision.io import encode_jpeg

        self.device = device
        self._encode = encode_jpeg

    @classmethod
    def probe(cls, device: torch.device) -> tuple["GpuJpeg | None", str]:
        """An encoder for `device`, or None and why not: it is tried on a small image here, so a
        torchvision built without nvJPEG is found at startup, not on a client's frame."""
        if device.type != "cuda":
            return None, "off: the model is not on a GPU"
        try:
            enc = cls(device)
            data = enc.encode(torch.zeros(16, 16, 3, dtype=torch.uint8, device=device), 90)
        except Exception as e:
            return None, f"off: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        if not data.startswith(b"\xff\xd8"):
            return None, "off: nvJPEG's output is not a JPEG stream"
        return enc, "nvJPEG on the GPU (torchvision)"

    def encode(self, image: torch.Tensor, quality: int) -> bytes:
        """image: [H, W, 3] uint8 on this device, its GPU work finished. Returns the JPEG file's bytes."""
        default = torch.cuda.default_stream(self.device)
        with torch.cuda.stream(default):
            chw = image.permute(2, 0, 1).contiguous()  # [3, H, W]: nvJPEG reads planar channels
            default.synchronize()  # the encoder's stream does not wait for this copy
            data = self._encode(chw, quality=quality)  # uint8 bytes on the device
            return data.cpu().numpy().tobytes()  # after nvJPEG's last copy, on this same stream


class GpuJpegDecoder:
    """JPEG input frames decoded on the GPU: nvJPEG through torchvision.io.decode_jpeg(device=...).

    The gateway hands a single-GPU replica its JPEG input frames still compressed (imaging.
    EncodedImage): ~0.3 MB per 1024 frame on the link instead of 3 MB of pixels, and no 4-7 ms
    PIL decode on a gateway core.

    Streams. torchvision decodes on a stream of its own and then makes the caller's current stream
    wait for it (an event), allocating the output on the current stream; so the decoded frame is
    ready for whatever the caller queues next on its current stream, and the host does not wait
    for the GPU. The caller picks that stream: the compute stream for a plain batch, the chunk
    cache's side stream for a stream frame it measures there (cache/chunk_cache.py)."""

    def __init__(self, device: torch.device):
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device = device
        self._decode = decode_jpeg
        self._rgb = ImageReadMode.RGB

    @classmethod
    def probe(cls, device: torch.device) -> tuple["GpuJpegDecoder | None", str]:
        """A decoder for `device`, or None and why not: a small JPEG made by PIL is decoded here and
        compared with PIL's own decode, so a torchvision without nvJPEG is found at startup."""
        if device.type != "cuda":
            return None, "off: the model is not on a GPU"
        import io

        import numpy as np
        from PIL import Image

        ramp = np.add.outer(np.arange(32), np.arange(48)).astype(np.uint8)[..., None] * np.array([3, 2, 1], np.uint8)
        buf = io.BytesIO()
        Image.fromarray(ramp).save(buf, format="JPEG", quality=95)
        host = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.int16)
        try:
            dec = cls(device)
            got = dec.decode(buf.getvalue()).cpu().numpy().astype(np.int16)
        except Exception as e:
            return None, f"off: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        if got.shape != host.shape or np.abs(got - host).max() > 8:
            return None, f"off: nvJPEG's decode differs from PIL's ({got.shape} against {host.shape})"
        return dec, "nvJPEG on the GPU (torchvision)"

    def decode(self, data: bytes) -> torch.Tensor:
        """A JPEG file's bytes -> [H, W, 3] uint8 RGB on this device, ready on the current stream.
        Raises RuntimeError where nvJPEG cannot decode it (the caller falls back to PIL)."""
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a copy: decode_jpeg wants a writable tensor
        chw = self._decode(src, mode=self._rgb, device=self.device)  # [3, H, W]
        return chw.permute(1, 2, 0).contiguous()
