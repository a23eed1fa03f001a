"""What the engine needs from a model: its diffusers components and its limits.

Presets (models/synthetic.py) and, in the next release, local diffusers directories both produce a
LoadedModel; the engine's pipeline only talks to this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelLimits:
    """A served model's identity and the request bounds the gateway enforces."""

    name: str
    family: str  # "unet" or "dit"
    synthetic: bool
    size_multiple: int
    min_size: int
    max_size: int
    default_width: int
    default_height: int
    min_steps: int
    max_steps: int
    default_steps: int
    default_guidance_scale: float
    max_guidance_scale: float
    max_images_per_request: int
    max_prompt_chars: int
    vae_scale_factor: int


@dataclass
class LoadedModel:
    """diffusers components of one model, on their device, in eval mode."""

    limits: ModelLimits
    tokenizer: Any  # a transformers tokenizer
    text_encoder: torch.nn.Module  # transformers CLIPTextModel-like: last_hidden_state
    backbone: torch.nn.Module  # diffusers UNet2DConditionModel
    vae: torch.nn.Module  # diffusers AutoencoderKL or AutoencoderTiny
    scheduler_config: dict[str, Any]
    scheduler_class: type
    device: torch.device
    dtype: torch.dtype

    def parameter_bytes(self) -> int:
        mods = (self.text_encoder, self.backbone, self.vae)
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())
