#!/usr/bin/env python
"""What a frame's image encoding costs: PIL (libjpeg) on a host core against nvJPEG on the GPU
(torchvision.io), at the sizes the gateway serves, on the images it serves.

Every stream frame is encoded before it leaves the replica, on the frame's path: the last
stream_serving run measured 6.0 ms p50 of JPEG encoding per 1024 frame on the H200's host, a
sixth of a frame's end-to-end latency. This counts the alternatives before the engine uses one.

Images: a test clip's frame (rtdiff_cluster/clips.py, a smooth texture with grain) and a grainy
one (what a synthetic model with seeded weights draws: JPEG's entropy coding pays per detail).
GPU rows: the host's wall time of one encode, from a finished image on the device to the bytes
in host memory (torchvision's nvJPEG call waits for its own stream), alone and while another
stream keeps the GPU busy; that other stream is the legacy default stream in one row (nvJPEG's
last copy is issued there) and a stream of torch's pool in the other.

Usage: python benchmarks/image_codec.py [--sizes 512,1024] [--n 40] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine_bench import write_results  # noqa: E402
from rtdiff_cluster import clips  # noqa: E402


def images(size: int) -> dict[str, np.ndarray]:
    frame = next(clips.moving(size, size, 1))
    rng = np.random.default_rng(1)
    grain = np.clip(clips.texture(size, size, 7).astype(np.float32) + rng.normal(0, 40, (size, size, 3)), 0, 255)
    return {"clip frame": frame, "grainy": grain.astype(np.uint8)}


def median_ms(fn, n: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def pil_encode(pixels: np.ndarray, quality: int, subsampling: int | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    extra = {} if subsampling is None else {"subsampling": subsampling}
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, **extra)
    return buf.getvalue()


def pil_decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img)


def busy(stream: torch.cuda.Stream, ms: float) -> None:
    """Queues about `ms` of matmuls on `stream` (sized on the spot) and returns at once."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        for _ in range(4):
            a @ a
        end.record()
    end.synchronize()
    reps = max(1, int(ms / (start.elapsed_time(end) / 4)))
    with torch.cuda.stream(stream):
        for _ in range(reps):
            a @ a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    q = args.quality
    gpu = torch.cuda.is_available()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for name, px in images(size).items():
            row = {"size": size, "image": name}
            data = pil_encode(px, q)
            row["pil_encode_ms"] = median_ms(lambda: pil_encode(px, q), args.n)
            row["pil_bytes"] = len(data)
            row["pil_444_encode_ms"] = median_ms(lambda: pil_encode(px, q, 0), args.n)
            row["pil_444_bytes"] = len(pil_encode(px, q, 0))
            row["pil_decode_ms"] = median_ms(lambda: pil_decode(data), args.n)
            if gpu:
                from torchvision.io import decode_jpeg, encode_jpeg

                dev = torch.from_numpy(px).cuda().permute(2, 0, 1).contiguous()  # [3, H, W]
                torch.cuda.synchronize()
                out = encode_jpeg(dev, quality=q).cpu()
                row["nvjpeg_bytes"] = int(out.numel())
                back = pil_decode(out.numpy().tobytes())
                row["nvjpeg_max_abs_diff_vs_input"] = int(np.abs(back.astype(int) - px.astype(int)).max())
                row["nvjpeg_mean_abs_diff_vs_input"] = float(np.abs(back.astype(int) - px.astype(int)).mean())
                row["nvjpeg_encode_ms"] = median_ms(lambda: encode_jpeg(dev, quality=q).cpu(), args.n)
                for label, stream in (("default", torch.cuda.default_stream()), ("pool", torch.cuda.Stream())):
                    times = []
                    for _ in range(max(5, args.n // 4)):
                        torch.cuda.synchronize()
                        busy(stream, 20.0)
                        t = time.perf_counter()
                        encode_jpeg(dev, quality=q).cpu()
                        times.append((time.perf_counter() - t) * 1e3)
                    torch.cuda.synchronize()
                    row[f"nvjpeg_encode_ms_while_{label}_stream_busy"] = statistics.median(times)
                enc = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                row["nvjpeg_decode_ms"] = median_ms(lambda: decode_jpeg(enc, device="cuda").cpu(), args.n)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results("image_codec", "cuda" if gpu else "cpu", {"quality": q, "rows": rows}, args.out_dir, markdown)


def markdown(r: dict) -> str:
    gpu = any("nvjpeg_encode_ms" in x for x in r["rows"])
    lines = [f"# A frame's JPEG encode and decode: {r['gpu_name'] or r['cpu']} ({r['date_utc'][:10]})", "",
             f"torch {r['torch']}; quality {r['quality']}; PIL on one host core ({r['cpu']}), nvJPEG through "
             "torchvision. Median wall time of one call on the host, the image already in memory (GPU rows: on "
             "the device, its bytes back in host memory).", "",
             "| size | image | PIL encode ms (4:2:0) | bytes | PIL encode ms (4:4:4) | bytes | PIL decode ms |"
             + (" nvJPEG encode ms | bytes | while the default stream is busy | while another stream is busy | "
                "nvJPEG decode ms |" if gpu else ""),
             "|--:|---|--:|--:|--:|--:|--:|" + ("--:|--:|--:|--:|--:|" if gpu else "")]
    for x in r["rows"]:
        line = (f"| {x['size']} | {x['image']} | {x['pil_encode_ms']:.2f} | {x['pil_bytes']:,} | "
                f"{x['pil_444_encode_ms']:.2f} | {x['pil_444_bytes']:,} | {x['pil_decode_ms']:.2f} |")
        if gpu:
            line += (f" {x['nvjpeg_encode_ms']:.2f} | {x['nvjpeg_bytes']:,} | "
                     f"{x['nvjpeg_encode_ms_while_default_stream_busy']:.2f} | "
                     f"{x['nvjpeg_encode_ms_while_pool_stream_busy']:.2f} | {x['nvjpeg_decode_ms']:.2f} |")
        lines.append(line)
    if gpu:
        lines += ["", "Busy: about 20 ms of matmuls queued on that stream just before the encode. nvJPEG's last "
                  "copy is issued on the legacy default stream, so there it waits for them; a replica computes "
                  "on a stream of its own (engine/replica.py)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
