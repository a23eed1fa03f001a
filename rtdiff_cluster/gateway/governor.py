"""A stream's frame-rate governor: holds each frame's latency within the frame interval
(1 / target_fps) by trading quality for time, inside limits the client sets.

The settings form a ladder, from what the client asked (level 0) to the cheapest it allows:
fewer steps one at a time down to min_steps, then the chunk cache's threshold doubled step by step
up to max_cache_threshold (more chunks reused), then the frame computed at 3/4 and 1/2 of its size
down to min_scale (the output is resized back to the asked size). While frames take longer than the interval the
governor climbs one rung (judged on a smoothed latency, so it reacts within a frame or two); when
PATIENCE frames in a row take under HEADROOM of it, it steps back down. Only frames admitted after
the last change are judged, so frames already in flight under the old settings do not trigger a
second change (no overshoot).

Two guards against oscillation, which a live stream showed between the size rungs (16 fps and a
1.3 s p99 on the H200, benchmarks/NOTES.md):
  - the first SIZE_WARMUP frames at a new computed size are not judged: each pays a CUDA graph
    capture for its shape and restarts the stream's chunk cache with a whole frame, so their
    latency says nothing about the rung;
  - a step back that fails (the next change climbs again) doubles the calm frames the next step
    back needs, up to MAX_PATIENCE; a step back that holds (the next change is another step back)
    resets it.

Latency here is the gateway's total for the frame (admission to answer), so a replica shared with
other streams, which makes frames queue, counts as falling behind too.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADROOM = 0.7  # step back down only when frames take under 70% of the interval...
PATIENCE = 3  # ...for this many frames in a row
MAX_PATIENCE = 48  # the most calm frames a step back can come to need after failed ones
SIZE_WARMUP = 2  # frames not judged after a change of the computed size
SMOOTHING = 0.5  # weight of the newest frame in the latency average


SCALES = (0.75, 0.5)  # resolution rungs, as fractions of the asked width and height


@dataclass(frozen=True)
class Rung:
    steps: int
    cache_threshold: float | None  # None: the model's (or the frame's own) threshold
    scale: float = 1.0  # the computed frame's size as a fraction of the asked size


@dataclass(frozen=True)
class GovernorLimits:
    target_fps: float
    steps: int  # what the frame asked: the top of the ladder
    min_steps: int
    cache_threshold: float | None  # the frame's threshold (None: the model's default, base_threshold)
    base_threshold: float  # the model's default chunk threshold
    max_cache_threshold: float  # 0: the threshold is not raised
    cache_on: bool  # the frame goes through the chunk cache (image-to-image, cache not turned off)
    min_scale: float = 1.0  # lowest resolution rung allowed (1: the size is never changed)


def ladder(lim: GovernorLimits) -> list[Rung]:
    rungs = [Rung(s, lim.cache_threshold) for s in range(lim.steps, lim.min_steps - 1, -1)]
    if lim.cache_on and lim.max_cache_threshold > 0:
        t = lim.cache_threshold if lim.cache_threshold is not None else lim.base_threshold
        t = max(t, 0.5)  # a zero threshold (every change recomputed) would never grow by doubling
        while t * 2 <= lim.max_cache_threshold:
            t *= 2
            rungs.append(Rung(lim.min_steps, t))
        if rungs[-1].cache_threshold is None or rungs[-1].cache_threshold < lim.max_cache_threshold:
            rungs.append(Rung(lim.min_steps, lim.max_cache_threshold))
    bottom = rungs[-1]
    rungs += [Rung(bottom.steps, bottom.cache_threshold, sc) for sc in SCALES if sc >= lim.min_scale]
    return rungs


class FrameRateGovernor:
    def __init__(self) -> None:
        self.limits: GovernorLimits | None = None
        self.rungs: list[Rung] = []
        self.level = 0
        self.epoch = 0  # bumped on every change; frames carry the epoch they were admitted in
        self.latency_s: float | None = None  # smoothed, over frames of the current epoch
        self._calm = 0
        self.changes = 0
        self.patience = PATIENCE  # calm frames the next step back needs
        self._unjudged = 0  # frames of this epoch still to pass before judging (a new size warming up)
        self._last_move = 0

    def settings(self, limits: GovernorLimits) -> tuple[Rung, bool, int]:
        """The rung for a frame about to be admitted, whether it differs from what the frame asked,
        and the epoch to hand back to observe()."""
        if limits != self.limits:  # the client changed its request or limits: keep the level where it still fits
            self.limits = limits
            self.rungs = ladder(limits)
            self.level = min(self.level, len(self.rungs) - 1)
        return self.rungs[self.level], self.level > 0, self.epoch

    def observe(self, latency_s: float, epoch: int) -> None:
        """A frame's latency, measured when it was answered."""
        if self.limits is None or epoch != self.epoch:
            return
        if self._unjudged > 0:
            self._unjudged -= 1
            return
        self.latency_s = latency_s if self.latency_s is None else (
            SMOOTHING * latency_s + (1 - SMOOTHING) * self.latency_s)
        interval = 1.0 / self.limits.target_fps
        if self.latency_s > interval and self.level < len(self.rungs) - 1:
            self._move(+1)
        elif latency_s < HEADROOM * interval and self.level > 0:
            self._calm += 1
            if self._calm >= self.patience:
                self._move(-1)
        else:
            self._calm = 0

    def _move(self, by: int) -> None:
        if by > 0 and self._last_move < 0:  # the last step back did not hold
            self.patience = min(2 * self.patience, MAX_PATIENCE)
        elif by < 0 and self._last_move < 0:  # it did: the next one needs no more than usual
            self.patience = PATIENCE
        scale = self.rungs[self.level].scale
        self.level += by
        self.epoch += 1
        self.latency_s = None
        self._calm = 0
        self.changes += 1
        self._last_move = by
        self._unjudged = SIZE_WARMUP if self.rungs[self.level].scale != scale else 0
