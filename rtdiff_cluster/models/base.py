"""What the engine needs from a model: its diffusers components and its limits.

Presets (models/synthetic.py) and local diffusers directories (models/diffusers_dir.py) both
produce a LoadedModel; the engine's pipeline (engine/pipeline.py) only talks to this interface.
`kind` picks the pipeline's conditioning and latent layout:

    sd     UNet2DConditionModel + one CLIP text encoder (SD 1.x/2.x, LCM and Turbo students)
    sdxl   UNet2DConditionModel + two CLIP text encoders, pooled text and time-id embeddings
    flux   FluxTransformer2DModel + CLIP (pooled) and T5 (sequence), packed 2x2 latents, flow matching
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

KINDS = ("sd", "sdxl", "flux")


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
    """diffusers components of one model (this rank's shard of the backbone), on their device, in eval mode."""

    limits: ModelLimits
    kind: str
    tokenizers: list[Any]  # transformers tokenizers, one per text encoder
    text_encoders: list[torch.nn.Module]
    backbone: torch.nn.Module  # UNet2DConditionModel or FluxTransformer2DModel (possibly tensor-parallel)
    vae: torch.nn.Module  # AutoencoderKL or AutoencoderTiny
    scheduler_config: dict[str, Any]
    scheduler_class: type
    device: torch.device
    dtype: torch.dtype
    extras: dict[str, Any] = field(default_factory=dict)  # per-kind settings (e.g. flux max_sequence_length)
    tp: int = 1  # tensor-parallel degree the backbone was sharded for

    def parameter_bytes(self) -> int:
        """Bytes of weights this process holds (the backbone counts its local shard only)."""
        mods = (*self.text_encoders, self.backbone, self.vae)
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())

    def backbone_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.backbone.parameters())
