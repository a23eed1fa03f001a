"""Python client for the rtdiff.v1 gateway (blocking gRPC)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import grpc
import numpy as np

from rtdiff_cluster import imaging
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2_grpc as pb_grpc

FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "raw": pb.IMAGE_FORMAT_RAW_RGB8}


def image_pixels(img: pb.Image) -> np.ndarray:
    """[H, W, 3] uint8 of a response image, whatever its format."""
    return imaging.decode(img.data, img.format, img.width, img.height)


def save_image(img: pb.Image, path: str | Path) -> None:
    """Writes PNG/JPEG bytes as they are; raw frames are encoded to the path's suffix (PNG by default)."""
    path = Path(path)
    if img.format == pb.IMAGE_FORMAT_RAW_RGB8:
        fmt = pb.IMAGE_FORMAT_JPEG if path.suffix.lower() in (".jpg", ".jpeg") else pb.IMAGE_FORMAT_PNG
        path.write_bytes(imaging.encode(image_pixels(img), fmt))
    else:
        path.write_bytes(img.data)


@dataclass
class ClientTLS:
    ca_file: str = ""  # trust this CA instead of the system roots
    cert_file: str = ""  # client certificate for mutual TLS
    key_file: str = ""
    server_name: str = ""  # override the name checked in the server's certificate


class RtdiffClient:
    def __init__(self, target: str, tls: ClientTLS | None = None, token: str = "", timeout_s: float | None = None):
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                   ("grpc.max_send_message_length", 64 * 1024 * 1024)]
        if tls is not None:
            read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
            creds = grpc.ssl_channel_credentials(read(tls.ca_file), read(tls.key_file), read(tls.cert_file))
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.DiffusionStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RtdiffClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str, *, model: str = "", width: int = 0, height: int = 0, steps: int = 0,
                 guidance_scale: float = 0.0, seed: int = 0, num_images: int = 1, output_format: str = "png",
                 negative_prompt: str = "", input_image: pb.Image | None = None, strength: float = 0.0,
                 jpeg_quality: int = 0, sampler: str = "", target_psnr_db: float = 0.0,
                 step_cache_threshold: float = 0.0, timeout_s: float | None = None) -> pb.GenerateResponse:
        req = pb.GenerateRequest(model=model, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                                 steps=steps, guidance_scale=guidance_scale, seed=seed, num_images=num_images,
                                 output_format=FORMATS[output_format], jpeg_quality=jpeg_quality, strength=strength,
                                 sampler=sampler, target_psnr_db=target_psnr_db,
                                 step_cache_threshold=step_cache_threshold)
        if input_image is not None:
            req.input_image.CopyFrom(input_image)
        return self.stub.Generate(req, timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def generate_future(self, request: pb.GenerateRequest, timeout_s: float | None = None):
        """Starts a Generate call and returns its grpc future (cancel() it to cancel the call)."""
        return self.stub.Generate.future(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def stream(self, frames: Iterable[pb.FrameRequest], timeout_s: float | None = None) -> Iterator[pb.FrameResponse]:
        """Sends frames as the server accepts them and yields responses in order."""
        return self.stub.StreamGenerate(iter(frames), timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s or 10,
                                         metadata=self._metadata).models)


class FrameWindow:
    """Feeds a stream at most `window` frames ahead of the responses, so latency measures service,
    not a client-side backlog. Use `requests()` as the stream's input and call `done()` per response."""

    def __init__(self, frames: Iterable[pb.FrameRequest], window: int):
        self._frames = iter(frames)
        self._credits = threading.Semaphore(window)
        self._stop = threading.Event()
        self.sent_at: "queue.Queue[float]" = queue.Queue()

    def requests(self) -> Iterator[pb.FrameRequest]:
        import time

        for frame in self._frames:
            while not self._credits.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            self.sent_at.put(time.perf_counter())
            yield frame

    def done(self) -> float:
        """Marks one response received; returns its send time."""
        self._credits.release()
        return self.sent_at.get_nowait()

    def stop(self) -> None:
        self._stop.set()
