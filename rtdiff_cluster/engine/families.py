"""What differs between model kinds inside the denoising loop: how prompts become conditioning,
how latents are laid out and scheduled, and how the backbone is called. engine/pipeline.py runs the
loop itself, the same for every kind.

Written over diffusers components rather than diffusers' pipeline classes for the reasons given in
engine/pipeline.py; the arithmetic follows those pipelines (StableDiffusion(XL)Pipeline,
LatentConsistencyModelPipeline, FluxPipeline) so a checkpoint behaves as it does there.
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import numpy as np
import torch

from rtdiff_cluster.engine.step_cache import flux_first_block, unet_first_block
from rtdiff_cluster.models.base import LoadedModel
from rtdiff_cluster.pinned import to_device_async

Cond = tuple[torch.Tensor, ...]  # one prompt's conditioning tensors, without a batch dim
DEVICE_INPUT_ENTRIES = 64  # per-size inputs kept on the device (extra_inputs)


def _tokens(tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
    tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return tok.input_ids.to(device)


def _vae_factors(vae) -> tuple[float, float]:
    cfg = vae.config
    return float(getattr(cfg, "scaling_factor", None) or 1.0), float(getattr(cfg, "shift_factor", None) or 0.0)


class Family:
    """The UNet kinds (sd, sdxl); FluxFamily overrides what flux does differently."""

    uses_cfg = True  # classifier-free guidance (two conditionings per frame) when guidance_scale > 1
    # Whether a chunk-cache region's place in its frame enters the backbone's inputs (a DiT's token
    # positions, one tensor for the batch): then regions at different places cannot share a batch.
    origin_in_inputs = False

    def __init__(self, model: LoadedModel):
        self.m = model
        self.scale, self.shift = _vae_factors(model.vae)
        cfg = model.backbone.config
        # LCM students embed the guidance scale instead of running a second, unconditional pass.
        self.guidance_embed_dim = getattr(cfg, "time_cond_proj_dim", None)
        if self.guidance_embed_dim:
            self.uses_cfg = False
        self._device_inputs: dict[tuple, torch.Tensor] = {}  # (what, ...) -> a batch-independent input on the device

    def _device_input(self, key: tuple, make) -> torch.Tensor:
        """make()'s host tensor on the device, made and copied once per key (extra_inputs runs per
        batch, ahead of the batch's graph, while earlier batches may still run)."""
        out = self._device_inputs.get(key)
        if out is None:
            if len(self._device_inputs) >= DEVICE_INPUT_ENTRIES:
                self._device_inputs.pop(next(iter(self._device_inputs)))
            out = self._device_inputs[key] = to_device_async(make(), self.m.device, self.m.dtype)
        return out

    # ---- prompts ---------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> list[Cond]:
        m = self.m
        if m.kind == "sd":
            tok = m.tokenizers[0]
            hidden = m.text_encoders[0](_tokens(tok, prompts, tok.model_max_length, m.device)).last_hidden_state
            return [(h,) for h in hidden]  # [77, D]
        # sdxl: penultimate hidden states of both encoders side by side, plus the second's pooled projection
        states, pooled = [], None
        for tok, enc in zip(m.tokenizers, m.text_encoders):
            out = enc(_tokens(tok, prompts, tok.model_max_length, m.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        hidden = torch.cat(states, dim=-1)  # [B, 77, 768 + 1280]
        if m.extras.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=m.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return [(h, p) for h, p in zip(hidden, pooled)]

    # ---- latents ---------------------------------------------------------------------------

    def latent_channels(self) -> int:
        return int(self.m.backbone.config.in_channels)

    def to_model_layout(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] as the backbone and scheduler see them."""
        return latents

    def to_vae_layout(self, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return latents

    def set_timesteps(self, scheduler, steps: int, h: int, w: int) -> None:
        scheduler.set_timesteps(steps, device=self.m.device)

    def initial_latents(self, scheduler, noise: torch.Tensor, init: torch.Tensor | None, t0) -> torch.Tensor:
        if init is None:
            return noise * scheduler.init_noise_sigma
        return scheduler.add_noise(init, noise, t0.repeat(noise.shape[0]))

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> latents in the backbone's space."""
        out = self.m.vae.encode(pixels)
        latents = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return (latents - self.shift) * self.scale

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.m.vae.decode(latents / self.scale + self.shift).sample  # [B, 3, H, W] in [-1, 1]

    # ---- the backbone ----------------------------------------------------------------------

    def extra_inputs(self, batch_size: int, width: int, height: int, guidance_scale: float, h: int, w: int,
                     origin: tuple[int, int] = (0, 0)) -> dict:
        """Inputs that depend on the batch but not on the step. origin: the latent row and column a
        chunk-cache region starts at in its whole frame (a DiT's token positions)."""
        m = self.m
        extra: dict = {}
        if m.kind == "sdxl":
            # original size, crop offset, target size: the frame as asked, uncropped
            ids = self._device_input(("time_ids", height, width),
                                     lambda: torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32))
            extra["time_ids"] = ids.repeat(batch_size, 1)
        if self.guidance_embed_dim:
            emb = self._device_input(("guidance", guidance_scale), lambda: guidance_embedding(
                guidance_scale - 1, 1, self.guidance_embed_dim, "cpu", torch.float32))
            extra["timestep_cond"] = emb.repeat(batch_size, 1)
        return extra

    def scale_input(self, scheduler, x: torch.Tensor, t) -> torch.Tensor:
        """The latents as the backbone takes them at step t (reads the scheduler's position, so it
        stays outside captured graphs of a single step)."""
        return scheduler.scale_model_input(x, t)

    def _unet_kwargs(self, x: torch.Tensor, cond: Sequence[torch.Tensor], extra: dict) -> dict:
        kwargs = {}
        if self.m.kind == "sdxl":
            time_ids = extra["time_ids"]
            time_ids = time_ids.repeat(x.shape[0] // time_ids.shape[0], 1)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond[1], "time_ids": time_ids}
        if "timestep_cond" in extra:
            kwargs["timestep_cond"] = extra["timestep_cond"]
        return kwargs

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor], extra: dict) -> torch.Tensor:
        """The backbone's output for scaled latents x [B, ...] at timestep t (a 0-d tensor) under
        conditioning tensors cond (each [B, ...]); a pure function of its tensors, so it can be
        captured in a CUDA graph."""
        return self.m.backbone(x, t, encoder_hidden_states=cond[0], **self._unet_kwargs(x, cond, extra)).sample

    def first_block(self, x: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor], extra: dict) -> torch.Tensor:
        """The step cache's probe (engine/step_cache.py): the backbone's first block on forward's inputs."""
        return unet_first_block(self.m.backbone, x, t, cond[0], **self._unet_kwargs(x, cond, extra))


def guidance_embedding(w: float, batch: int, dim: int, device, dtype) -> torch.Tensor:
    """LCM's sinusoidal embedding of the guidance scale (diffusers keeps it as a pipeline method,
    not a function, hence these lines): [batch, dim]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = torch.full((batch, 1), w * 1000.0) * freqs[None]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(device, dtype)


class FluxFamily(Family):
    """Flux: CLIP's pooled vector and T5's sequence condition a transformer over 2x2-packed latent
    patches; flow-matching sigmas shifted by the image's token count; guidance-distilled models
    take the guidance scale as an input instead of a second pass."""

    uses_cfg = False
    origin_in_inputs = True  # img_ids: the region's tokens at their whole-frame positions

    def __init__(self, model: LoadedModel):
        super().__init__(model)
        self.guidance_embeds = bool(getattr(model.backbone.config, "guidance_embeds", False))

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> list[Cond]:
        m = self.m
        clip_tok, t5_tok = m.tokenizers
        clip, t5 = m.text_encoders
        pooled = clip(_tokens(clip_tok, prompts, clip_tok.model_max_length, m.device)).pooler_output  # [B, 768]
        seq = t5(_tokens(t5_tok, prompts, m.extras.get("max_sequence_length", 512), m.device))[0]  # [B, L, 4096]
        return [(s, p) for s, p in zip(seq, pooled)]

    def latent_channels(self) -> int:
        return int(self.m.backbone.config.in_channels) // 4

    def to_model_layout(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape  # -> [B, h/2 * w/2, 4c]
        return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def to_vae_layout(self, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c4 = latents.shape
        return latents.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)

    def set_timesteps(self, scheduler, steps: int, h: int, w: int) -> None:
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            c = self.m.scheduler_config  # the checkpoint's: another sampler's config may lack the shift bounds
            tokens = (h // 2) * (w // 2)
            slope = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (
                c.get("max_image_seq_len", 4096) - c.get("base_image_seq_len", 256))
            kwargs["mu"] = tokens * slope + c.get("base_shift", 0.5) - slope * c.get("base_image_seq_len", 256)
        if "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=self.m.device, **kwargs)
        else:  # DPM-Solver on flow sigmas spaces them itself, the same linspace
            scheduler.set_timesteps(steps, device=self.m.device, **kwargs)

    def initial_latents(self, scheduler, noise: torch.Tensor, init: torch.Tensor | None, t0) -> torch.Tensor:
        if init is None:
            return noise
        if hasattr(scheduler, "scale_noise"):
            return scheduler.scale_noise(init, t0.repeat(noise.shape[0]), noise)
        return scheduler.add_noise(init, noise, t0.repeat(noise.shape[0]))  # DPM-Solver on flow sigmas: the same mix

    def extra_inputs(self, batch_size: int, width: int, height: int, guidance_scale: float, h: int, w: int,
                     origin: tuple[int, int] = (0, 0)) -> dict:
        m = self.m
        # A region's tokens keep their whole-frame positions: the rotary embedding is relative, so
        # alone they attend as before, and with a stream's recorded keys (cache/token_kv.py) they match.
        def positions() -> torch.Tensor:
            ids = torch.zeros(h // 2, w // 2, 3)
            ids[..., 1] = torch.arange(h // 2)[:, None] + origin[0] // 2
            ids[..., 2] = torch.arange(w // 2)[None, :] + origin[1] // 2
            return ids.reshape(-1, 3)

        extra = {"img_ids": self._device_input(("img_ids", h, w, *origin), positions)}
        if self.guidance_embeds:
            extra["guidance"] = torch.full((batch_size,), guidance_scale, device=m.device, dtype=torch.float32)
        return extra

    def scale_input(self, scheduler, x: torch.Tensor, t) -> torch.Tensor:
        return x  # flow matching feeds the latents unscaled

    def _flux_kwargs(self, x: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor], extra: dict) -> dict:
        seq, pooled = cond
        m = self.m
        return dict(hidden_states=x, timestep=(t / 1000).expand(x.shape[0]).to(x.dtype), guidance=extra.get("guidance"),
                    pooled_projections=pooled, encoder_hidden_states=seq,
                    txt_ids=torch.zeros(seq.shape[1], 3, device=m.device, dtype=m.dtype), img_ids=extra["img_ids"])

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor], extra: dict) -> torch.Tensor:
        return self.m.backbone(**self._flux_kwargs(x, t, cond, extra)).sample

    def first_block(self, x: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor], extra: dict) -> torch.Tensor:
        return flux_first_block(self.m.backbone, **self._flux_kwargs(x, t, cond, extra))


def family_for(model: LoadedModel) -> Family:
    return FluxFamily(model) if model.kind == "flux" else Family(model)
