"""The UNet step cache: its probe is the backbone's own first block, and it skips exactly the steps
its threshold allows (without Ray; the server path is in tests/test_governor.py)."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
import torch

from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.engine.families import family_for
from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
from rtdiff_cluster.engine.step_cache import unet_first_block
from rtdiff_cluster.gateway.errors import RequestError
from rtdiff_cluster.gateway.validation import check_settings
from rtdiff_cluster.models.registry import load_model
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb


@pytest.fixture(scope="module")
def pipelines():
    from rtdiff_cluster.parallel import groups

    groups.init_single(torch.device("cpu"))
    yield {src: Pipeline(load_model(ModelConfig(source=src, device="cpu")), prompt_cache_size=4)
           for src in ("synthetic:tiny", "synthetic:tiny-sdxl", "synthetic:tiny-flux")}
    groups.destroy()


@pytest.mark.parametrize("src", ["synthetic:tiny", "synthetic:tiny-sdxl"])
def test_probe_is_the_first_down_blocks_output_in_the_full_forward(pipelines, src):
    p = pipelines[src]
    fam, unet = p.family, p.model.backbone
    cond = tuple(torch.stack(t) for t in zip(*fam.encode(["a cat", "a dog"])))
    extra = fam.extra_inputs(2, 64, 64, 0.0, 8, 8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    seen = []
    handle = unet.down_blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    try:
        with torch.inference_mode():
            fam.forward(x, t, cond, extra)
    finally:
        handle.remove()
    probe = unet_first_block(unet, x, t, cond[0], **fam._unet_kwargs(x, cond, extra))
    assert torch.equal(probe, seen[0])


def run(p, steps, step_cache=0.0, guidance=0.0):
    batch = BatchSpec(64, 64, steps, guidance, 0.0, [FrameSpec("a cat", seed=3)], step_cache=step_cache)
    return p.run(batch, ["a cat"], [""])


@pytest.mark.parametrize("guidance", [0.0, 4.0])  # plain, and CFG (the probe sees the conditional half)
def test_threshold_decides_which_steps_reuse_the_last_prediction(pipelines, guidance):
    p = pipelines["synthetic:tiny-sdxl"]
    exact, t_exact = run(p, 6, guidance=guidance)
    never, t_never = run(p, 6, step_cache=1e-9, guidance=guidance)  # no two steps' probes are this close
    always, t_always = run(p, 6, step_cache=1e9, guidance=guidance)  # every step after the first reuses
    assert t_exact.steps_reused == t_never.steps_reused == 0 and np.array_equal(never, exact)
    assert t_always.steps_reused == 5 and not np.array_equal(always, exact)
    reused = [run(p, 6, step_cache=th, guidance=guidance)[1].steps_reused for th in (0.05, 0.2, 0.5)]
    assert reused == sorted(reused)  # a looser threshold never reuses fewer steps


def test_step_cache_is_refused_where_it_does_not_apply(pipelines):
    dit = pipelines["synthetic:tiny-flux"].model.limits
    unet = pipelines["synthetic:tiny"].model.limits
    ok = pb.GenerateRequest(prompt="a cat", steps=4, step_cache_threshold=0.1)
    assert check_settings(ok, unet, True).key.step_cache == 0.1
    for lim, bad in ((dit, ok), (unet, pb.GenerateRequest(prompt="a cat", step_cache_threshold=1.0)),
                     (unet, pb.GenerateRequest(prompt="a cat", step_cache_threshold=float("nan")))):
        with pytest.raises(RequestError) as err:
            check_settings(bad, lim, True)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.message.startswith("step_cache_threshold:")
    assert not family_for(pipelines["synthetic:tiny-flux"].model).supports_step_cache
    # A DiT batch that reached the engine anyway runs every step.
    images, times = pipelines["synthetic:tiny-flux"].run(
        dataclasses.replace(BatchSpec(64, 64, 3, 0.0, 0.0, [FrameSpec("a cat", seed=3)]), step_cache=0.999),
        ["a cat"], [""])
    assert times.steps_reused == 0 and images.shape == (1, 64, 64, 3)
