"""Resolves a model source (preset name or, next release, a local diffusers directory) to a LoadedModel."""

from __future__ import annotations

import dataclasses

import torch

from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.models.base import LoadedModel
from rtdiff_cluster.models.synthetic import PRESETS


def known_sources() -> list[str]:
    return sorted(PRESETS)


def check_source(source: str) -> None:
    """Fails before any actor starts when a source cannot be served."""
    if source not in PRESETS:
        raise ValueError(f"model: unknown source {source!r}; available: {', '.join(known_sources())}")


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


def load_model(config: ModelConfig) -> LoadedModel:
    check_source(config.source)
    device, dtype = resolve_device(config)
    model = PRESETS[config.source](device, dtype, config.weights_seed,
                                   config.max_images_per_request, config.max_prompt_chars)
    model.limits = dataclasses.replace(model.limits, name=config.served_name)
    return model
