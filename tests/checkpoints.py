"""Tiny diffusers checkpoints for the tests, written by diffusers' own `save_pretrained` from the
synthetic presets' components (so a directory and its preset hold the same weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from rtdiff_cluster.config import ModelConfig


def _components(source: str):
    from rtdiff_cluster.models.registry import load_model
    from rtdiff_cluster.parallel import groups

    groups.init_single(torch.device("cpu"))
    try:
        return load_model(ModelConfig(source=source, device="cpu"))
    finally:
        groups.destroy()


def save_pipeline(source: str, folder: Path, lcm: bool = False) -> Path:
    """Writes `source`'s components as the diffusers pipeline of its kind. lcm: an SD pipeline
    whose UNet embeds the guidance scale (time_cond_proj_dim) with an LCMScheduler, as LCM
    students are."""
    import diffusers

    m = _components(source)
    scheduler = m.scheduler_class.from_config(m.scheduler_config)
    unet = m.backbone
    if lcm:
        config = {k: v for k, v in m.backbone.config.items() if not k.startswith("_")}  # "_use_default_values" would undo the change
        unet = diffusers.UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 32})
        torch.manual_seed(3)
        scheduler = diffusers.LCMScheduler.from_config(m.scheduler_config)
    if m.kind == "flux":
        pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=m.vae, text_encoder=m.text_encoders[0],
                                      tokenizer=m.tokenizers[0], text_encoder_2=m.text_encoders[1],
                                      tokenizer_2=m.tokenizers[1], transformer=m.backbone)
    elif m.kind == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoders[0],
                                                   text_encoder_2=m.text_encoders[1], tokenizer=m.tokenizers[0],
                                                   tokenizer_2=m.tokenizers[1], unet=unet, scheduler=scheduler)
    else:
        pipe = diffusers.StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
                                                 unet=unet, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def save_tiny_vae(folder: Path, latent_channels: int = 4) -> Path:
    import diffusers

    torch.manual_seed(4)
    diffusers.AutoencoderTiny(latent_channels=latent_channels).save_pretrained(folder)
    return folder
