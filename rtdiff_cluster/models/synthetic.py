"""Synthetic presets: real diffusers/transformers architectures built from configs with seeded weights.

Nothing here downloads anything. The weights are random, so images are noise; speed, memory and the
serving path are the real ones. The backbone goes through the same sharded loader as a checkpoint
(models/weights.py, SyntheticWeights), so a preset can be served at any tp its heads allow.

    synthetic:tiny        SD-style UNet + CLIP + KL VAE, a 256x256 frame in ~0.15 s on 2 CPU cores (the default)
    synthetic:tiny-sdxl   SDXL's structure in miniature (two CLIPs, pooled text and time ids)
    synthetic:tiny-flux   Flux's structure in miniature (CLIP + T5, double and single blocks, guidance input)
    synthetic:sdxl        SDXL base 1.0's exact configs (UNet 2.6 B, CLIP ViT-L + OpenCLIP bigG, SDXL VAE)
    synthetic:flux-dev    FLUX.1-dev's exact configs (transformer 11.9 B, CLIP ViT-L + T5-XXL, 16-channel VAE)
    synthetic:flux-40b    a Flux-shaped transformer of 40.1 B parameters (hidden 6144, 16 + 32 blocks):
                          80 GB in bf16, over one H100's memory; the scaling run's backbone (tp=8)
    synthetic:flux-80b    a Flux-shaped transformer of 79.7 B parameters (hidden 6144, 32 + 64 blocks):
                          160 GB in bf16, more than one H200 holds, servable at tp=2
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rtdiff_cluster.models.base import LoadedModel, ModelLimits


def byte_level_clip_tokenizer(max_length: int = 77):
    """A real transformers CLIPTokenizer over a byte-level vocabulary with no merges.

    Hub tokenizers cannot be fetched here, so the vocabulary is generated: every byte (in the
    byte-level alphabet) with and without CLIP's end-of-word marker, plus the special tokens.
    Any UTF-8 prompt tokenizes, one token per byte, truncated to max_length. The synthetic T5
    encoders use it too (with a longer max_length): its ids fit any vocabulary of 514 or more.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


@dataclass(frozen=True)
class TextEncoderSpec:
    cls: str  # transformers class name
    config: dict


@dataclass(frozen=True)
class Preset:
    kind: str
    backbone_cls: str  # diffusers class name
    backbone: dict
    text_encoders: tuple[TextEncoderSpec, ...]
    vae: dict  # AutoencoderKL config
    scheduler_cls: str
    scheduler: dict
    limits: dict  # ModelLimits fields other than name, synthetic, max_images_per_request, max_prompt_chars
    extras: dict[str, Any] = field(default_factory=dict)
    token_lengths: tuple[int, ...] = (77,)


CLIP_L = TextEncoderSpec("CLIPTextModel", dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
CLIP_BIG_G = TextEncoderSpec("CLIPTextModelWithProjection", dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))
T5_XXL = TextEncoderSpec("T5EncoderModel", dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, dropout_rate=0.0))
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
FLUX_VAE = dict(SDXL_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)
EULER_TRAILING = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="trailing")  # few-step sampling starts at the last training step
FLOW_MATCH = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096)
UNET_LIMITS = dict(family="unet", size_multiple=64, min_size=64, max_size=2048, min_steps=1, max_steps=50,
                   default_steps=4, default_guidance_scale=0.0, max_guidance_scale=20.0, vae_scale_factor=8)
FLUX_LIMITS = dict(family="dit", size_multiple=16, min_size=64, max_size=2048, min_steps=1, max_steps=50,
                   default_steps=4, default_guidance_scale=3.5, max_guidance_scale=20.0, vae_scale_factor=8)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))

TINY_CLIP = dict(vocab_size=514, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=64)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=256, block_out_channels=(8, 16, 32, 32),
                layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)


def _flux_scaled(double_blocks: int, single_blocks: int) -> Preset:
    """Flux-dev's structure at hidden 6144 (48 heads of 128) with the blocks given: the scaling presets."""
    return Preset("flux", "FluxTransformer2DModel",
                  dict(FLUX_DEV, num_layers=double_blocks, num_single_layers=single_blocks, num_attention_heads=48),
                  (CLIP_L, T5_XXL), FLUX_VAE, "FlowMatchEulerDiscreteScheduler", FLOW_MATCH,
                  dict(FLUX_LIMITS, default_width=1024, default_height=1024),
                  extras=dict(max_sequence_length=512), token_lengths=(77, 512))


PRESETS: dict[str, Preset] = {
    "synthetic:tiny": Preset(
        "sd", "UNet2DConditionModel",
        # latent 32x32 at 256x256: two UNet levels, cross-attention (8 heads) at the lower one
        dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=8),
        (TextEncoderSpec("CLIPTextModel", TINY_CLIP),), TINY_VAE, "EulerDiscreteScheduler", EULER_TRAILING,
        dict(UNET_LIMITS, max_size=1024, default_width=256, default_height=256)),
    "synthetic:tiny-sdxl": Preset(
        "sdxl", "UNet2DConditionModel",
        dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8),
             transformer_layers_per_block=(1, 2), cross_attention_dim=64 + 32, use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
        (TextEncoderSpec("CLIPTextModel", TINY_CLIP),
         TextEncoderSpec("CLIPTextModelWithProjection", dict(TINY_CLIP, hidden_size=32, projection_dim=32))),
        TINY_VAE, "EulerDiscreteScheduler", EULER_TRAILING, dict(UNET_LIMITS, max_size=1024, default_width=256,
                                                                  default_height=256),
        extras=dict(force_zeros_for_empty_prompt=True), token_lengths=(77, 77)),
    "synthetic:tiny-flux": Preset(
        "flux", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=48, pooled_projection_dim=64, guidance_embeds=True,
             axes_dims_rope=(4, 6, 6)),
        (TextEncoderSpec("CLIPTextModel", TINY_CLIP),
         TextEncoderSpec("T5EncoderModel", dict(vocab_size=514, d_model=48, d_kv=12, d_ff=96, num_layers=2, num_heads=4,
                                                feed_forward_proj="gated-gelu", dropout_rate=0.0))),
        dict(TINY_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        "FlowMatchEulerDiscreteScheduler", FLOW_MATCH,
        dict(FLUX_LIMITS, max_size=1024, default_width=256, default_height=256),
        extras=dict(max_sequence_length=32), token_lengths=(77, 32)),
    "synthetic:sdxl": Preset(
        "sdxl", "UNet2DConditionModel", SDXL_UNET, (CLIP_L, CLIP_BIG_G), SDXL_VAE, "EulerDiscreteScheduler",
        EULER_TRAILING, dict(UNET_LIMITS, default_width=1024, default_height=1024),
        extras=dict(force_zeros_for_empty_prompt=True), token_lengths=(77, 77)),
    "synthetic:flux-dev": Preset(
        "flux", "FluxTransformer2DModel", FLUX_DEV, (CLIP_L, T5_XXL), FLUX_VAE, "FlowMatchEulerDiscreteScheduler",
        FLOW_MATCH, dict(FLUX_LIMITS, default_width=1024, default_height=1024),
        extras=dict(max_sequence_length=512), token_lengths=(77, 512)),
    "synthetic:flux-40b": _flux_scaled(16, 32),
    "synthetic:flux-80b": _flux_scaled(32, 64),
}

TINY_AUTOENCODER = dict(latent_channels=4)  # AutoencoderTiny's defaults are TAESD's shape


def backbone_meta(name: str) -> torch.nn.Module:
    """The preset's backbone on the meta device (no memory): for checks before any actor starts."""
    import diffusers

    preset = PRESETS[name]
    with torch.device("meta"):
        return getattr(diffusers, preset.backbone_cls).from_config(preset.backbone)


def load_preset(name: str, *, served_name: str, weights_seed: int, tiny_vae: bool, tp: int, tp_rank: int,
                device: torch.device, dtype: torch.dtype, max_images: int, max_prompt_chars: int) -> LoadedModel:
    import diffusers
    import transformers

    from rtdiff_cluster.models.weights import SyntheticWeights, build
    from rtdiff_cluster.parallel.plans import plan_for

    preset = PRESETS[name]
    backbone_cls = getattr(diffusers, preset.backbone_cls)
    plan = plan_for(backbone_meta(name)) if tp > 1 else None
    backbone, _ = build(backbone_cls, preset.backbone, plan=plan, tp=tp, rank=tp_rank, device=device, dtype=dtype,
                        source=SyntheticWeights(weights_seed))

    # Replicated parts are small next to the backbone (the T5-XXL encoder aside): built in place with
    # their classes' own initialisation, seeded, on the target device.
    torch.manual_seed(weights_seed)
    tokenizers, encoders = [], []
    for spec, length in zip(preset.text_encoders, preset.token_lengths):
        tokenizer = byte_level_clip_tokenizer(length)
        cfg_cls = getattr(transformers, spec.cls).config_class
        config = cfg_cls(**spec.config, **({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                            "pad_token_id": tokenizer.pad_token_id} if "CLIP" in spec.cls else {}))
        with torch.device(device):
            encoder = getattr(transformers, spec.cls)(config)
        tokenizers.append(tokenizer)
        encoders.append(_ready(encoder, dtype))
    with torch.device(device):
        if tiny_vae:
            vae = diffusers.AutoencoderTiny(latent_channels=preset.vae["latent_channels"],
                                            scaling_factor=1.0, shift_factor=0.0)
        else:
            vae = diffusers.AutoencoderKL(**preset.vae)
    scheduler_class = getattr(diffusers, preset.scheduler_cls)
    limits = ModelLimits(name=served_name, synthetic=True, max_images_per_request=max_images,
                         max_prompt_chars=max_prompt_chars, default_width=preset.limits.get("default_width", 1024),
                         default_height=preset.limits.get("default_height", 1024),
                         **{k: v for k, v in preset.limits.items() if k not in ("default_width", "default_height")})
    return LoadedModel(limits, preset.kind, tokenizers, encoders, backbone, _ready(vae, dtype),
                       dict(scheduler_class(**preset.scheduler).config), scheduler_class, device, dtype,
                       extras=dict(preset.extras), tp=tp)


def _ready(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # nn.Module's own .to: diffusers' override warns about modules it would keep in float32, which
    # none of these have.
    return torch.nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)
