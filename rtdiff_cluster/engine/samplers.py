"""Few-step samplers a request can choose, each a diffusers scheduler made from the checkpoint's own
scheduler config with a few settings changed.

A sampler is a name in a registry with the family it applies to (noise-prediction UNets or
flow-matching DiTs), so the gateway checks a request's choice against the model without knowing
diffusers, and the pipeline builds the scheduler from the name. "default" is the checkpoint's own
scheduler, as configured.

Settings for few steps: "trailing" spacing starts the schedule at the last training timestep
(leading spacing would start 1-8 step schedules well below pure noise, which these models never
denoise from); DPM-Solver++ ends on a zero sigma with a first-order final step, which keeps 2-4
step results sharp.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType

import diffusers

DEFAULT = "default"
REFERENCE_STEPS = 8  # adaptive steps measure fewer steps against this many


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str  # diffusers class name
    families: tuple[str, ...]  # ModelLimits.family values it applies to
    overrides: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    description: str = ""


def _s(name: str, scheduler: str, families: tuple[str, ...], description: str, **overrides) -> Sampler:
    return Sampler(name, scheduler, families, MappingProxyType(overrides), description)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    _s("euler", "EulerDiscreteScheduler", ("unet",), "Euler, deterministic", timestep_spacing="trailing"),
    # clip_sample off: latents are not bounded to [-1, 1] (clipping is for pixel-space models)
    _s("ddim", "DDIMScheduler", ("unet",), "DDIM, eta 0", timestep_spacing="trailing", set_alpha_to_one=False,
       clip_sample=False),
    _s("dpmpp", "DPMSolverMultistepScheduler", ("unet",), "DPM-Solver++ 2M", algorithm_type="dpmsolver++",
       solver_order=2, timestep_spacing="trailing", lower_order_final=True, final_sigmas_type="zero"),
    _s("lcm", "LCMScheduler", ("unet",), "LCM (for consistency-distilled students; adds noise between steps)",
       timestep_spacing="trailing"),
    _s("flow-euler", "FlowMatchEulerDiscreteScheduler", ("dit",), "flow-matching Euler, deterministic"),
    _s("flow-dpmpp", "DPMSolverMultistepScheduler", ("dit",), "DPM-Solver++ 2M on flow-matching sigmas",
       algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True,
       lower_order_final=True, final_sigmas_type="zero"),
    _s("flow-lcm", "FlowMatchLCMScheduler", ("dit",), "flow-matching LCM (adds noise between steps)"),
)}


def offered(family: str) -> tuple[str, ...]:
    """The sampler names a model of this family accepts, "default" first."""
    return (DEFAULT, *(n for n, s in SAMPLERS.items() if family in s.families))


def scheduler_for(name: str, scheduler_class: type, scheduler_config: dict):
    """A fresh scheduler for sampler `name` ("" or "default": the checkpoint's own)."""
    if name in ("", DEFAULT):
        return scheduler_class.from_config(scheduler_config)
    s = SAMPLERS.get(name)
    if s is None:
        raise ValueError(f"sampler: unknown sampler {name!r}; known: {', '.join((DEFAULT, *SAMPLERS))}")
    cls = getattr(diffusers, s.scheduler)
    config = dict(scheduler_config)
    # A flow-matching checkpoint's "shift" is DPM-Solver's "flow_shift".
    if s.overrides.get("use_flow_sigmas") and "shift" in config:
        config.setdefault("flow_shift", config["shift"])
    config.update(s.overrides)
    accepted = _init_keys(cls)  # other classes' keys would only log warnings
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


@functools.cache
def _init_keys(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)
