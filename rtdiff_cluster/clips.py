"""Synthetic input clips for stream tests and benchmarks: what a live stream looks like to the
chunk cache, made here rather than downloaded.

  moving   a textured square sliding over a static textured background; `area` is the square's
           share of the frame (0.1: the issue's "10% of the frame moving")
  static   the same background every frame (the similarity filter's case)
  cut      every frame a different texture (a scene cut each frame: nothing can be reused)

Each clip also gives, per frame, the mask of pixels that differ from the previous frame, so a test
knows which chunks must be recomputed.
"""

from __future__ import annotations

import numpy as np


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour texture [H, W, 3] uint8: low-frequency noise (a few cycles across the frame)
    plus fine grain, so chunks differ from one another and a VAE sees structure at every scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fy, fx = rng.uniform(0.5, 4.0, 2) * 2 * np.pi
            img[..., c] += np.sin(fy * y / height + fx * x / width + rng.uniform(0, 2 * np.pi))
    img = 128 + 28 * img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def moving(height: int, width: int, frames: int, area: float = 0.1, step_px: int = 8, seed: int = 0):
    """A square of `area` of the frame moving `step_px` to the right each frame (wrapping)."""
    bg = texture(height, width, seed)
    side = int(round((area * height * width) ** 0.5))
    sprite = texture(side, side, seed + 1)
    top = (height - side) // 2
    for i in range(frames):
        frame = bg.copy()
        left = (i * step_px) % max(1, width - side)
        frame[top:top + side, left:left + side] = sprite
        yield frame


def static(height: int, width: int, frames: int, seed: int = 0):
    bg = texture(height, width, seed)
    for _ in range(frames):
        yield bg.copy()


def cut(height: int, width: int, frames: int, seed: int = 0):
    for i in range(frames):
        yield texture(height, width, seed + 100 + i)
