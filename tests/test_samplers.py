"""Samplers and adaptive steps on the embedded models' pipelines, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdiff_cluster import clips
from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.engine.adaptive_steps import StepCalibrator, candidates
from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
from rtdiff_cluster.engine.samplers import REFERENCE_STEPS, offered, scheduler_for
from rtdiff_cluster.fidelity import psnr
from rtdiff_cluster.models.registry import load_model

SIZE = 64
# Deterministic samplers solve the same ODE: with many steps they reach the same image. Measured at
# 25 steps on the tiny presets: DDIM 61.6 dB and DPM-Solver++ 49.8 dB from Euler, flow DPM-Solver++
# similar from flow Euler; a sampler wired to the wrong timesteps, sigmas or prediction type lands
# under 20 dB. 40 dB leaves margin for CPU rounding either way.
CONVERGED_DB = 40.0
MANY_STEPS = 25


@pytest.fixture(scope="module")
def pipelines():
    from rtdiff_cluster.parallel import groups

    groups.init_single(torch.device("cpu"))
    yield {src: Pipeline(load_model(ModelConfig(source=src, device="cpu")), prompt_cache_size=4)
           for src in ("synthetic:tiny", "synthetic:tiny-flux")}
    groups.destroy()


def render(p: Pipeline, steps: int, sampler: str = "", strength: float = 0.0, init=None, seed: int = 1,
           guidance: float = 0.0) -> np.ndarray:
    batch = BatchSpec(SIZE, SIZE, steps, guidance, strength, [FrameSpec("a cat", seed=seed, init_image=init)],
                      sampler=sampler)
    return p.run(batch, ["a cat"], [""])[0][0]


@pytest.mark.parametrize("src", ["synthetic:tiny", "synthetic:tiny-flux"])
def test_every_offered_sampler_runs_text_and_image_to_image(pipelines, src):
    p = pipelines[src]
    init = clips.texture(SIZE, SIZE, seed=3)
    outputs = {}
    for name in offered(p.model.limits.family):
        img = render(p, 2, name)
        i2i = render(p, 4, name, strength=0.5, init=init)
        assert img.shape == i2i.shape == (SIZE, SIZE, 3) and img.std() > 1, name
        assert not np.array_equal(i2i, img), name
        outputs[name] = img
    assert np.array_equal(outputs["default"], outputs["euler" if p.model.limits.family == "unet" else "flow-euler"])


@pytest.mark.parametrize("src", ["synthetic:tiny", "synthetic:tiny-flux"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_to_image_noise_mix_is_the_schedulers_own_bit_for_bit(pipelines, src, dtype):
    """The pipeline mixes an input's latents with the noise as a * init + b * noise, with a and b
    found once per configuration (the scheduler's add_noise makes a blocking copy to the device
    every call): for every offered sampler, step count and start it gives exactly what the
    scheduler's own mix gives, in the latents' dtype."""
    p = pipelines[src]
    g = torch.Generator().manual_seed(0)
    shape = (2, 16, 4) if src.endswith("flux") else (2, 4, 8, 8)  # Flux mixes packed latents
    for name in offered(p.model.limits.family):
        for steps, begin in ((2, 1), (4, 2), (8, 3)):
            init, noise = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
            key = (name, steps, 8, 8)
            scheduler = p._scheduler(*key)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin * scheduler.order)
            t0 = scheduler.timesteps[begin * scheduler.order:][:1]
            ours = p._noised_input(key, scheduler, begin, noise, init, t0)
            theirs = p.family.initial_latents(scheduler, noise, init, t0)
            assert ours.dtype == theirs.dtype == dtype
            assert torch.equal(ours, theirs), f"{name}, {steps} steps from {begin}: max diff {(ours - theirs).abs().max()}"


@pytest.mark.parametrize("src,reference,others", [("synthetic:tiny", "euler", ("ddim", "dpmpp")),
                                                  ("synthetic:tiny-flux", "flow-euler", ("flow-dpmpp",))])
def test_deterministic_samplers_converge_to_the_same_image(pipelines, src, reference, others):
    p = pipelines[src]
    ref = render(p, MANY_STEPS, reference)
    for name in others:
        assert psnr(render(p, MANY_STEPS, name), ref) >= CONVERGED_DB, name
        # ...and few steps of it are not already that image: the test could tell them apart
        assert psnr(render(p, 1, name), ref) < CONVERGED_DB, name


@pytest.mark.parametrize("src,sampler", [("synthetic:tiny", "dpmpp"), ("synthetic:tiny", "lcm"),
                                        ("synthetic:tiny-flux", "flow-dpmpp")])
def test_a_batch_never_sees_the_scheduler_state_of_the_one_before(pipelines, src, sampler):
    """Each batch's scheduler is a copy of one built and configured once per step count and size
    (building takes milliseconds of host time, setting the timesteps a blocking copy): a multistep
    solver's history or a step index left by one batch must not reach the next, whatever its step
    count, and image-to-image's noise mix (found once per configuration) is the scheduler's."""
    p = pipelines[src]
    alone = Pipeline(p.model, prompt_cache_size=4)
    four = render(alone, 4, sampler, seed=5)
    render(p, 3, sampler, seed=2)
    render(p, 4, sampler, seed=9, strength=0.5, init=clips.texture(SIZE, SIZE, seed=3))
    assert np.array_equal(render(p, 4, sampler, seed=5), four)
    assert p._scheduler(sampler, 4, 8, 8) is not p._scheduler(sampler, 4, 8, 8)


def test_unknown_sampler_is_refused_by_name():
    with pytest.raises(ValueError, match="^sampler: unknown sampler 'heun-7'"):
        scheduler_for("heun-7", object, {})
    assert offered("unet")[0] == offered("dit")[0] == "default"
    assert "lcm" in offered("unet") and "lcm" not in offered("dit") and "flow-euler" not in offered("unet")


def test_candidates_keep_an_image_to_image_step_and_stop_at_the_reference():
    assert candidates(4, 0.0) == [1, 2, 3, 4]
    assert candidates(20, 0.0) == list(range(1, REFERENCE_STEPS + 1))
    assert candidates(6, 0.5) == [2, 3, 4, 5, 6]  # 1 x 0.5 runs no step


@pytest.mark.parametrize("target", [30.0, 38.0, 60.0])
def test_adaptive_steps_choose_the_fewest_within_the_target(pipelines, target):
    p = pipelines["synthetic:tiny"]
    reference = render(p, REFERENCE_STEPS)
    measured = {n: psnr(render(p, n), reference) for n in range(1, REFERENCE_STEPS)}
    expected = next((n for n in range(1, REFERENCE_STEPS) if measured[n] >= target), REFERENCE_STEPS)

    renders = []

    def run(b: BatchSpec) -> np.ndarray:
        renders.append(b.steps)
        return p.run(b, ["a cat"], [""])[0][0]

    cal = StepCalibrator(audit_every=0)
    batch = BatchSpec(SIZE, SIZE, 8, 0.0, 0.0, [FrameSpec("a cat", seed=1)], target_psnr_db=target)
    chosen, c = cal.choose(batch, run)
    assert chosen.steps == expected and chosen.target_psnr_db == 0
    # The reference, then 1, 2, ... until one is within the target (8 itself needs no render).
    assert renders == [REFERENCE_STEPS, *range(1, min(expected, REFERENCE_STEPS - 1) + 1)]
    assert c.psnr_db >= target
    # Later frames of the setting reuse the measurement: nothing more is rendered.
    again, _ = cal.choose(batch, run)
    assert again.steps == expected and len(renders) == min(expected, REFERENCE_STEPS - 1) + 1


def test_adaptive_steps_audit_recalibrates_a_choice_that_misses(pipelines):
    p = pipelines["synthetic:tiny"]
    renders = []

    def run(b: BatchSpec) -> np.ndarray:
        renders.append(b.steps)
        return p.run(b, ["a cat"], [""])[0][0]

    target = 38.0
    cal = StepCalibrator(audit_every=2)
    batch = BatchSpec(SIZE, SIZE, 8, 0.0, 0.0, [FrameSpec("a cat", seed=1)], target_psnr_db=target)
    good, c = cal.choose(batch, run)
    assert c.psnr_db >= target
    # A choice that content drifted away from: the audit on the next due frame must catch it.
    c.steps = 1
    c.frames = 2
    renders.clear()
    audited, c2 = cal.choose(batch, run)
    assert renders[:2] == [REFERENCE_STEPS, 1]  # reference and the stale choice, then a new search
    assert audited.steps == good.steps and c2.psnr_db >= target and cal.audits == 1 and cal.calibrations == 2
