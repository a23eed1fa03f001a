"""Synthetic presets: real diffusers/transformers architectures built from configs with seeded weights.

Nothing here downloads anything. The weights are random, so images are noise; speed, memory and the
serving path are the real ones. `synthetic:tiny` is the embedded default: a small SD-style UNet with
a CLIP text encoder and a KL VAE, sized to make a 256x256 frame in well under a second on 2 CPU cores.
"""

from __future__ import annotations

from typing import Callable

import torch

from rtdiff_cluster.models.base import LoadedModel, ModelLimits


def byte_level_clip_tokenizer(max_length: int = 77):
    """A real transformers CLIPTokenizer over a byte-level vocabulary with no merges.

    Hub tokenizers cannot be fetched here, so the vocabulary is generated: every byte (in the
    byte-level alphabet) with and without CLIP's end-of-word marker, plus the special tokens.
    Any UTF-8 prompt tokenizes, one token per byte, truncated to max_length.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _tiny(device: torch.device, dtype: torch.dtype, weights_seed: int, max_images: int, max_prompt_chars: int) -> LoadedModel:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(weights_seed)
    tokenizer = byte_level_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    # latent 32x32 at 256x256: two UNet levels, cross-attention at the lower one.
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8,
    )
    # Four levels, three downsamples: the usual factor 8 between pixels and latents.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
        block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler_class = EulerDiscreteScheduler
    scheduler_config = dict(EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="trailing",  # few-step sampling starts at the last training step
    ).config)
    limits = ModelLimits(
        name="synthetic:tiny", family="unet", synthetic=True,
        size_multiple=64, min_size=64, max_size=1024, default_width=256, default_height=256,
        min_steps=1, max_steps=50, default_steps=4,
        default_guidance_scale=0.0, max_guidance_scale=20.0,
        max_images_per_request=max_images, max_prompt_chars=max_prompt_chars,
        vae_scale_factor=8,
    )
    # float32 is the construction dtype; casting only when needed keeps diffusers' cast warning away.
    mods = [(m if dtype == torch.float32 else m.to(dtype=dtype)).to(device).eval().requires_grad_(False)
            for m in (text_encoder, unet, vae)]
    return LoadedModel(limits, tokenizer, mods[0], mods[1], mods[2], scheduler_config, scheduler_class, device, dtype)


PRESETS: dict[str, Callable[..., LoadedModel]] = {
    "synthetic:tiny": _tiny,
}
