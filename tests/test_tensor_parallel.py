"""Sharded backbones against the unsharded one: tp=2 on two gloo ranks vs tp=1, same seeded
weights and inputs, for each supported family, across dtypes and awkward sizes.

Tolerance policy (DEVELOPERS.md): the sharded forward's error against a float64 reference may be
at most twice the unsharded forward's own error at the same dtype (plus a floor of a few ulps of
the output's scale, for outputs that the unsharded path happens to hit exactly). Sharding only
reorders sums (partial matmuls, then an all-reduce), so it should cost no more than a second
rounding of the same size.
"""

from __future__ import annotations

import pytest
import torch

from tp_harness import run_ranks, run_single

SEED = 7


def flux_config() -> dict:
    # 4 heads of 16 (rope axes 4+6+6), 2 double and 2 single blocks, guidance embedding like flux-dev.
    return dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))


def sd_unet_config() -> dict:
    return dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24, attention_head_dim=8)


def sdxl_unet_config() -> dict:
    # SDXL's structure in miniature: linear projections, 2 transformer layers at the lower level,
    # text_time additional embeddings (pooled text + 6 time ids), heads of 8 channels.
    return dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
                attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=20 + 6 * 8)


def _inputs(family: str, batch: int, h: int, w: int, text: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(123)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    if family == "flux":
        tokens = h * w
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1).reshape(-1, 3)
        return dict(hidden_states=r(batch, tokens, 16), encoder_hidden_states=r(batch, text, 24), pooled_projections=r(batch, 20),
                    timestep=torch.full((batch,), 0.7, dtype=dtype), guidance=torch.full((batch,), 3.5, dtype=dtype),
                    img_ids=img_ids.to(dtype), txt_ids=torch.zeros(text, 3, dtype=dtype))
    out = dict(sample=r(batch, 4, h, w), timestep=torch.tensor(500.0), encoder_hidden_states=r(batch, text, 24))
    if family == "sdxl":
        out["added_cond_kwargs"] = {"text_embeds": r(batch, 20), "time_ids": r(batch, 6).abs() * 100}
    return out


def _forward(family: str, shard_resnets: bool, dtype_name: str, batch: int, h: int, w: int, text: int):
    """Builds the backbone for this process's rank (tp from parallel.groups) and runs it once.
    "flux+fast" is flux with the replica's fast-path modules installed on the shards: fused q/k/v
    projections, our attention processors (PyTorch's math backend) and fused kernels (Triton's
    interpreter on CPU), the Flux block forwards among them."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from rtdiff_cluster.models.weights import SyntheticWeights, build
    from rtdiff_cluster.parallel import groups
    from rtdiff_cluster.parallel.plans import plan_for

    dtype = getattr(torch, dtype_name)
    fast = family == "flux+fast" and dtype != torch.float64  # the float64 reference is diffusers' own
    family = family.removesuffix("+fast")
    cls, config = {"flux": (FluxTransformer2DModel, flux_config()), "sd": (UNet2DConditionModel, sd_unet_config()),
                   "sdxl": (UNet2DConditionModel, sdxl_unet_config())}[family]
    with torch.device("meta"):
        plan = plan_for(cls.from_config(config), shard_resnets=shard_resnets)
    model, _ = build(cls, config, plan=plan, tp=groups.tp_size(), rank=groups.tp_rank(), device=torch.device("cpu"),
                     dtype=dtype, source=SyntheticWeights(SEED))
    if fast:
        from rtdiff_cluster.ops import processors
        from rtdiff_cluster.ops.attention import AttentionRegistry
        from rtdiff_cluster.ops.fused import install_fused

        # In the engine's order (engine/fastpaths.py apply): each rank fuses its own heads' q/k/v first.
        assert processors.fuse_projections(model) == 4  # 2 double blocks and 2 single blocks in flux_config
        processors.install(model, AttentionRegistry(allowed=["math"]), fused=True)
        done = install_fused(model)
        assert done["flux double block gated residual+norm"] == 2 and done["flux single block without concatenations"] == 2
    with torch.inference_mode():
        out = model(**_inputs(family, batch, h, w, text, dtype)).sample
    return out.to(torch.float64)


CASES = [
    # family, shard_resnets, batch, latent h, w, text tokens: odd sizes on purpose
    ("flux", False, 2, 3, 5, 7),
    ("flux+fast", False, 2, 3, 5, 7),  # the fused blocks' shards (single blocks: proj_out on the concatenation)
    ("sd", True, 1, 16, 16, 5),
    ("sd", False, 3, 8, 24, 9),
    ("sdxl", True, 2, 16, 8, 11),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family,shard_resnets,batch,h,w,text", CASES)
def test_tp2_matches_tp1(family, shard_resnets, batch, h, w, text, dtype):
    args = (family, shard_resnets, dtype, batch, h, w, text)
    reference = run_single(_forward, family, shard_resnets, "float64", batch, h, w, text)
    single = run_single(_forward, *args)
    sharded = run_ranks(_forward, *args, tp=2)
    assert sharded.shape == reference.shape
    err_single = (single - reference).abs().max().item()
    err_sharded = (sharded - reference).abs().max().item()
    floor = 4 * torch.finfo(getattr(torch, dtype)).eps * reference.abs().max().item()
    assert err_sharded <= 2 * err_single + floor, (
        f"tp=2 error {err_sharded:.3g} vs tp=1 error {err_single:.3g} (floor {floor:.3g}) against float64")


def test_plans_reject_what_tp_cannot_split():
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from rtdiff_cluster.parallel.plans import plan_for, shard_model

    with torch.device("meta"):
        flux = FluxTransformer2DModel.from_config(flux_config())
        with pytest.raises(ValueError, match=r"tp: 3 does not divide the \d+ output features of transformer_blocks.0"):
            shard_model(flux, plan_for(flux), 3)
        unet = UNet2DConditionModel.from_config({**sd_unet_config(), "attention_head_dim": 6, "block_out_channels": (36, 72),
                                                 "norm_num_groups": 6})
        with pytest.raises(ValueError, match=r"tp: 4 does not divide the 6 groups of .*resnets.0.norm2"):
            shard_model(unet, plan_for(unet, shard_resnets=True), 4)
        with pytest.raises(ValueError, match="no tensor-parallel plan for Linear"):
            plan_for(torch.nn.Linear(2, 2))
