"""Keys and values of a DiT stream's image tokens, so that a chunk-cache region's attention still
sees the static tokens around it.

A UNet region is computed as a crop (cache/chunk_cache.py): its convolutions need only a halo. A
DiT's attention is global: computed alone, the region's tokens lose every static token's keys and
values. Here a stream's whole frames record, per denoising step and attention module, the keys
(after QK-norm and rotary) and values of every image token; a region frame's attention then runs
its own tokens' queries against the recorded keys and values with its own tokens' entries
replaced by the fresh ones, and writes those back, so the next frame sees them. Text tokens are
computed every time. The region's tokens carry their whole-frame positions (img_ids), so the
rotary embedding matches the recorded keys.

The processor reads the run's state from a context variable set around one pipeline run on the
compute thread; the pipeline runs such steps eagerly (a captured graph would freeze one stream's
tensors into itself).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch


@dataclass
class TokenKV:
    """One stream's recorded image-token keys and values: (step, attention module) -> (K, V),
    each [B, N_img, heads, head_dim] on the model's device (about 2.9 GB per step for Flux-dev
    at 1024 in bf16: 57 modules x 4,096 tokens x 3,072 x 2 x 2 bytes)."""

    grid: tuple[int, int]  # token rows and columns of the whole frame
    schedule: tuple  # what the steps are: (steps, strength, sampler); a region on another schedule cannot use them
    store: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (step, id(attn))

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.store.values())


@dataclass
class _Run:
    kv: TokenKV
    index: torch.Tensor | None  # region runs: each region token's whole-frame index; None: a whole frame (record)
    step: int = 0
    text: int = 0  # text tokens ahead of the image tokens (the joint blocks say; the single blocks follow them)


_ACTIVE: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("rtdiff_token_kv", default=None)


def active() -> bool:
    return _ACTIVE.get() is not None


@contextlib.contextmanager
def recording(kv: TokenKV):
    """A whole frame's run: every attention module's image-token keys and values are kept."""
    token = _ACTIVE.set(_Run(kv, None))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def extending(kv: TokenKV, index: torch.Tensor):
    """A region's run: its tokens (whole-frame indices `index`, in the region's token order)
    attend to the recorded keys and values of the whole frame, their own entries fresh."""
    token = _ACTIVE.set(_Run(kv, index))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def set_step(step: int) -> None:
    run = _ACTIVE.get()
    if run is not None:
        run.step = step


def region_index(grid: tuple[int, int], top: int, left: int, rows: int, cols: int, device) -> torch.Tensor:
    """Whole-frame token indices (row-major) of a rows x cols block of tokens at (top, left)."""
    r = torch.arange(top, top + rows, device=device)[:, None]
    c = torch.arange(left, left + cols, device=device)[None, :]
    return (r * grid[1] + c).reshape(-1)


def apply(attn, key: torch.Tensor, value: torch.Tensor, text: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Called by the Flux processor with the joint sequence's keys and values [B, text + N, H, D]
    (text tokens first; text None in a single-stream block, whose sequence is laid out as the
    joint blocks' was); returns the keys and values the attention should use."""
    run = _ACTIVE.get()
    if run is None:
        return key, value
    if text is None:
        text = run.text
    else:
        run.text = text
    slot = (run.step, id(attn))  # the backbone's modules live as long as the replica, and its caches
    img_k, img_v = key[:, text:], value[:, text:]
    if run.index is None:
        run.kv.store[slot] = (img_k.clone(), img_v.clone())
        return key, value
    recorded = run.kv.store.get(slot)
    if recorded is None:
        raise RuntimeError(f"token K/V: nothing recorded for step {run.step} of attention module {slot[1]}")
    full_k, full_v = recorded
    full_k.index_copy_(1, run.index, img_k)  # the region's tokens are fresh; the next frame sees them
    full_v.index_copy_(1, run.index, img_v)
    return torch.cat([key[:, :text], full_k], dim=1), torch.cat([value[:, :text], full_v], dim=1)
