"""Step caching: skip a denoising step's backbone call when its input barely moved, reusing the
last computed prediction (First-Block-Cache's test).

Before each step the probe runs the backbone's embeddings and first block (a UNet's time
embedding, conv_in and first down block, about 5% of a step at 1024; a Flux transformer's
embedders and first dual-stream block, 1 of 57 blocks) and compares that output with the one of the last step that ran in full: when
the mean absolute change, relative to the magnitude, is under the threshold, the backbone's last
prediction is reused. Comparing with the last *computed* step, not the previous one, adds up
small changes, so a run of skipped steps ends when they amount to the threshold.

diffusers' own FirstBlockCache hooks transformer blocks and runs eagerly, inside the forward. Our
steps are CUDA graphs, so the probe runs beside the graph and only the decision syncs (one scalar
per step). The prologues below mirror the first lines of UNet2DConditionModel.forward and
FluxTransformer2DModel.forward, which diffusers offers as no separate call; tests/test_step_cache.py
checks each against the full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@torch.inference_mode()
def unet_first_block(unet, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     added_cond_kwargs: dict | None = None, timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
    """The first down block's output hidden states for latents x [B, C, h, w] at timestep t."""
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), timestep_cond)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs or {})
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(x)
    block = unet.down_blocks[0]
    if getattr(block, "has_cross_attention", False):
        h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
    else:
        h, _ = block(hidden_states=h, temb=emb)
    return h


@torch.inference_mode()
def flux_first_block(transformer, hidden_states: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor | None,
                     pooled_projections: torch.Tensor, encoder_hidden_states: torch.Tensor, txt_ids: torch.Tensor,
                     img_ids: torch.Tensor) -> torch.Tensor:
    """The first dual-stream block's image tokens for packed latents [B, tokens, C] (Flux); the
    arguments are FluxTransformer2DModel.forward's."""
    x = transformer.x_embedder(hidden_states)
    timestep = timestep.to(x.dtype) * 1000
    if guidance is None:
        temb = transformer.time_text_embed(timestep, pooled_projections)
    else:
        temb = transformer.time_text_embed(timestep, guidance.to(x.dtype) * 1000, pooled_projections)
    context = transformer.context_embedder(encoder_hidden_states)
    rotary = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    _, x = transformer.transformer_blocks[0](hidden_states=x, encoder_hidden_states=context, temb=temb,
                                             image_rotary_emb=rotary)
    return x


def relative_change(now: torch.Tensor, before: torch.Tensor) -> float:
    """Mean |now - before| over mean |before| (a host sync: the step's decision)."""
    a, b = now.float(), before.float()
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


@dataclass
class StepCache:
    threshold: float
    probe_at_compute: torch.Tensor | None = None  # the probe of the last step computed in full
    prediction: torch.Tensor | None = None  # that step's backbone prediction

    def reuse(self, probe: torch.Tensor) -> bool:
        """Whether the step whose probe this is may take the last prediction."""
        return (self.prediction is not None and self.probe_at_compute is not None
                and relative_change(probe, self.probe_at_compute) < self.threshold)

    def store(self, probe: torch.Tensor, prediction: torch.Tensor) -> None:
        # Clones: the step graph's output buffer is overwritten by its next replay.
        self.probe_at_compute, self.prediction = probe.clone(), prediction.clone()
