"""Resolves a model source, a synthetic preset name or a local diffusers directory, to a LoadedModel.

`check_source` runs in the gateway before any actor starts (header reads and meta-device builds
only); `load_model` runs in each replica rank and loads that rank's shard.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.models.base import LoadedModel
from rtdiff_cluster.models.synthetic import PRESETS


def known_presets() -> list[str]:
    return sorted(PRESETS)


def _is_preset(source: str) -> bool:
    return source.startswith("synthetic:")


def check_source(config: ModelConfig, path: str = "model") -> None:
    """Fails before any actor starts when a source cannot be served as configured; the message
    names the config field, or the file at fault."""
    from rtdiff_cluster.parallel.plans import plan_for, shard_model

    source = config.source
    if _is_preset(source):
        if source not in PRESETS:
            raise ValueError(f"{path}.source: unknown preset {source!r}; available: {', '.join(known_presets())}")
        from rtdiff_cluster.models.synthetic import backbone_meta

        backbone, kind = backbone_meta(source), PRESETS[source].kind
        if config.vae not in ("", "tiny"):
            raise ValueError(f"{path}.vae: a preset takes '' (its own VAE) or 'tiny' (a seeded AutoencoderTiny), "
                             f"got {config.vae!r}")
    else:
        from rtdiff_cluster.models.diffusers_dir import ModelDirError, backbone_meta, inspect_dir

        if not Path(source).exists():
            raise ValueError(f"{path}.source: {source!r} is neither a preset ({', '.join(known_presets())}) "
                             "nor an existing diffusers directory")
        try:
            layout = inspect_dir(source, "" if config.vae == "tiny" else config.vae, config.variant)
        except (ModelDirError, ValueError) as e:
            raise ValueError(f"{path}.source: {e}") from None
        if config.vae == "tiny":
            raise ValueError(f"{path}.vae: 'tiny' applies to presets; for a directory give the path of an "
                             "AutoencoderTiny folder")
        backbone, kind = backbone_meta(layout), layout.kind
    if config.tp > 1:
        try:
            shard_model(backbone, plan_for(backbone), config.tp)
        except ValueError as e:
            raise ValueError(f"{path}.tp: {e}") from None
    if config.cfg_parallel == 2 and (kind == "flux" or getattr(backbone.config, "time_cond_proj_dim", None)):
        raise ValueError(f"{path}.cfg_parallel: {source} is guidance-distilled (it takes the guidance scale as an "
                         "input and runs no unconditional pass), so there is no second branch to put on other GPUs")


def resolve_device(config: ModelConfig) -> tuple[torch.device, torch.dtype]:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        if device is None:
            raise RuntimeError("device: cuda requested but this replica sees no CUDA device")
    else:
        device = torch.device("cpu")
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    return device, dtype


def load_model(config: ModelConfig, tp_rank: int = 0) -> LoadedModel:
    """This rank's LoadedModel: the backbone's tp_rank shard (of config.tp) and the replicated parts."""
    device, dtype = resolve_device(config)
    common = dict(served_name=config.served_name, tp=config.tp, tp_rank=tp_rank, device=device, dtype=dtype,
                  max_images=config.max_images_per_request, max_prompt_chars=config.max_prompt_chars)
    if _is_preset(config.source):
        from rtdiff_cluster.models.synthetic import load_preset

        if config.source not in PRESETS:
            raise ValueError(f"model: unknown preset {config.source!r}; available: {', '.join(known_presets())}")
        model = load_preset(config.source, weights_seed=config.weights_seed, tiny_vae=config.vae == "tiny", **common)
    else:
        from rtdiff_cluster.models.diffusers_dir import load_dir

        model = load_dir(config.source, vae_override=config.vae, variant=config.variant, **common)
    model.limits = dataclasses.replace(model.limits, name=config.served_name)
    return model
