"""Adaptive steps: for a request's quality target, the fewest denoising steps whose output stays
within that PSNR of the REFERENCE_STEPS (8) output, decided by measurement rather than a table.

A setting (size, sampler, guidance, strength, step budget, target) is calibrated on the first frame
that asks for it: the frame is computed with 8 steps, then with 1, 2, ... steps until one comes
within the target (PSNR of the decoded uint8 images, what a user sees). That count serves the
setting's later frames. Content can drift from the frame it was calibrated on, so every
`audit_every` frames a live frame is also computed with 8 steps and the chosen count re-measured
on it; a miss calibrates the setting again on that frame.

The cost is paid by the frame that triggers it: a calibration runs 8 + (1 + 2 + ... + n) steps, an
audit 8 more; both are logged with their duration.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rtdiff_cluster.engine.pipeline import BatchSpec
from rtdiff_cluster.engine.samplers import REFERENCE_STEPS
from rtdiff_cluster.fidelity import psnr

log = logging.getLogger("rtdiff.adaptive_steps")

Render = Callable[[BatchSpec], np.ndarray]  # a one-frame batch -> its image [H, W, 3] uint8


@dataclass
class Calibration:
    steps: int
    psnr_db: float  # of `steps` against the reference on the frame last measured (inf: it is the reference)
    measured: dict[int, float] = field(default_factory=dict)  # candidate steps -> PSNR, on that frame
    frames: int = 0  # frames served since it was last measured


def candidates(budget: int, strength: float) -> list[int]:
    """Step counts to try, fewest first: up to the budget and the reference, each running at least
    one step (image-to-image runs int(steps x strength) of them)."""
    top = min(budget, REFERENCE_STEPS)
    return [n for n in range(1, top + 1) if strength == 0 or int(n * strength) >= 1]


def setting_of(batch: BatchSpec) -> tuple:
    return (batch.width, batch.height, batch.sampler, batch.guidance_scale, batch.strength, batch.steps,
            batch.target_psnr_db, batch.crop)


class StepCalibrator:
    def __init__(self, audit_every: int = 200, max_settings: int = 64):
        self.audit_every = audit_every
        self.max_settings = max_settings
        self._table: OrderedDict[tuple, Calibration] = OrderedDict()
        self.calibrations = 0
        self.audits = 0

    def choose(self, batch: BatchSpec, render: Render) -> tuple[BatchSpec, Calibration]:
        """The batch with its steps set for its target (batch.target_psnr_db > 0), and the
        calibration behind the choice. May compute its first frame several times (render)."""
        key = setting_of(batch)
        cal = self._table.get(key)
        if cal is None:
            cal = self._calibrate(batch, render)
        elif self.audit_every and cal.frames >= self.audit_every:
            cal = self._audit(batch, cal, render)
        self._table[key] = cal
        self._table.move_to_end(key)
        while len(self._table) > self.max_settings:
            self._table.popitem(last=False)
        cal.frames += len(batch.frames)
        return dataclasses.replace(batch, steps=cal.steps, target_psnr_db=0.0), cal

    def _one(self, batch: BatchSpec, steps: int) -> BatchSpec:
        return dataclasses.replace(batch, steps=steps, target_psnr_db=0.0, frames=batch.frames[:1])

    def _calibrate(self, batch: BatchSpec, render: Render, reference: np.ndarray | None = None) -> Calibration:
        t0 = time.perf_counter()
        self.calibrations += 1
        if reference is None:
            reference = render(self._one(batch, REFERENCE_STEPS))
        tried = candidates(batch.steps, batch.strength)
        measured: dict[int, float] = {}
        chosen = tried[-1]
        for n in tried:
            measured[n] = math.inf if n == REFERENCE_STEPS else psnr(render(self._one(batch, n)), reference)
            if measured[n] >= batch.target_psnr_db:
                chosen = n
                break
        log.info("adaptive steps for %dx%d %s strength %g, at most %d steps, target %.1f dB: %d steps (%.1f dB vs %d "
                 "steps; tried %s) in %.2f s", batch.width, batch.height, batch.sampler, batch.strength, batch.steps,
                 batch.target_psnr_db, chosen, measured[chosen], REFERENCE_STEPS,
                 ", ".join(f"{n}: {p:.1f}" for n, p in measured.items()), time.perf_counter() - t0)
        return Calibration(chosen, measured[chosen], measured)

    def _audit(self, batch: BatchSpec, cal: Calibration, render: Render) -> Calibration:
        """Re-measures the chosen steps on this frame; calibrates again from it on a miss."""
        self.audits += 1
        reference = render(self._one(batch, REFERENCE_STEPS))
        now = math.inf if cal.steps >= REFERENCE_STEPS else psnr(render(self._one(batch, cal.steps)), reference)
        if now >= batch.target_psnr_db:
            return Calibration(cal.steps, now, {**cal.measured, cal.steps: now})
        log.info("adaptive steps: %d steps now measure %.1f dB against the %.1f dB target; calibrating again",
                 cal.steps, now, batch.target_psnr_db)
        return self._calibrate(batch, render, reference)
