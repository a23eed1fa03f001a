"""The step cache: its probe is the backbone's own first block (UNet and Flux), and it skips the
steps its threshold allows (without Ray; the server path is in tests/test_governor.py)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
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


# Per preset: the block the probe stops at, which of its outputs is the probe, and latents [B, ...].
PROBED = {
    "synthetic:tiny": (lambda m: m.down_blocks[0], 0, (2, 4, 8, 8)),
    "synthetic:tiny-sdxl": (lambda m: m.down_blocks[0], 0, (2, 4, 8, 8)),
    # Flux: the first dual-stream block returns (text, image) tokens; latents are 2x2-packed tokens
    "synthetic:tiny-flux": (lambda m: m.transformer_blocks[0], 1, (2, 16, 64)),
}


@pytest.mark.parametrize("src", list(PROBED))
def test_probe_is_the_first_blocks_output_in_the_full_forward(pipelines, src):
    p = pipelines[src]
    fam = p.family
    block_of, which, shape = PROBED[src]
    cond = tuple(torch.stack(t) for t in zip(*fam.encode(["a cat", "a dog"])))
    extra = fam.extra_inputs(2, 64, 64, 3.5, 8, 8)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    seen = []
    handle = block_of(p.model.backbone).register_forward_hook(lambda mod, args, out: seen.append(out[which]))
    try:
        with torch.inference_mode():
            fam.forward(x, t, cond, extra)
    finally:
        handle.remove()
    assert torch.equal(fam.first_block(x, t, cond, extra), seen[0])


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


def test_flux_steps_reuse_under_a_loose_threshold(pipelines):
    p = pipelines["synthetic:tiny-flux"]
    exact, _ = run(p, 4)
    never, t_never = run(p, 4, step_cache=1e-9)
    always, t_always = run(p, 4, step_cache=1e9)
    assert t_never.steps_reused == 0 and np.array_equal(never, exact)
    assert t_always.steps_reused == 3 and not np.array_equal(always, exact)


@pytest.mark.parametrize("threshold", [1.0, float("nan"), -0.1])
def test_bad_thresholds_are_refused_by_name(pipelines, threshold):
    lim = pipelines["synthetic:tiny"].model.limits
    assert check_settings(pb.GenerateRequest(prompt="a cat", step_cache_threshold=0.1), lim, True).key.step_cache == 0.1
    with pytest.raises(RequestError) as err:
        check_settings(pb.GenerateRequest(prompt="a cat", step_cache_threshold=threshold), lim, True)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith("step_cache_threshold:")
