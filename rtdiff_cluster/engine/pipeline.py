"""The denoising pipeline of one replica: text encoding (LRU), few-step loop, decode.

Written over diffusers components instead of a diffusers Pipeline class because the server needs
what those classes do not offer together: batches of frames with their own seeds (so an image does
not depend on what it was batched with), per-stage timing, and, later, CUDA graphs per shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rtdiff_cluster.cache.prompt_cache import PromptCache
from rtdiff_cluster.models.base import LoadedModel


@dataclass
class FrameSpec:
    """One image of a batch, as the gateway sends it."""

    prompt: str | None  # None: the stream's current prompt
    negative_prompt: str = ""
    seed: int = 0
    init_image: np.ndarray | None = None  # [H, W, 3] uint8 for image-to-image
    output_format: int = 1
    jpeg_quality: int = 90
    stream_id: str | None = None


@dataclass
class BatchSpec:
    """Frames that share everything the computation's shape depends on."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float  # 0: text-to-image; else every frame has an init_image
    frames: list[FrameSpec] = field(default_factory=list)


@dataclass
class StageTimes:
    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0


class Pipeline:
    def __init__(self, model: LoadedModel, prompt_cache_size: int):
        self.model = model
        self.prompts = PromptCache(prompt_cache_size)
        self.scaling_factor = float(getattr(model.vae.config, "scaling_factor", 1.0))

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    @torch.inference_mode()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.model.tokenizer(prompts, padding="max_length", truncation=True,
                                   max_length=self.model.tokenizer.model_max_length, return_tensors="pt")
        ids = tok.input_ids.to(self.model.device)
        return self.model.text_encoder(ids).last_hidden_state  # [B, 77, D]

    def initial_noise(self, seeds: list[int], latent_hw: tuple[int, int]) -> torch.Tensor:
        """Per-frame noise from a CPU generator: the same seed gives the same image on any device."""
        h, w = latent_hw
        c = self.model.backbone.config.in_channels
        noise = [torch.randn((1, c, h, w), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
        return torch.cat(noise).to(self.model.device, self.model.dtype)  # [B, C, h, w]

    @torch.inference_mode()
    def run(self, batch: BatchSpec, prompts: list[str], negative_prompts: list[str]) -> tuple[np.ndarray, StageTimes]:
        """Returns images [B, H, W, 3] uint8 and the stage times of the batch."""
        m = self.model
        times = StageTimes()
        t0 = time.perf_counter()
        cfg = batch.guidance_scale > 1.0
        emb = self.prompts.get_many(prompts, self._encode_text)  # [B, 77, D]
        if cfg:
            emb = torch.cat([self.prompts.get_many(negative_prompts, self._encode_text), emb])  # [2B, 77, D]
        self._sync()
        t1 = time.perf_counter()
        times.text_encode_s = t1 - t0

        scheduler = m.scheduler_class.from_config(m.scheduler_config)
        scheduler.set_timesteps(batch.steps, device=m.device)
        timesteps = scheduler.timesteps
        f = m.limits.vae_scale_factor
        noise = self.initial_noise([fr.seed for fr in batch.frames], (batch.height // f, batch.width // f))
        if batch.strength > 0:
            # Image-to-image: start part-way down the schedule from the noised input latents.
            run_steps = min(int(batch.steps * batch.strength), batch.steps)
            start = batch.steps - run_steps
            timesteps = timesteps[start * scheduler.order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start * scheduler.order)
            pixels = torch.from_numpy(np.stack([fr.init_image for fr in batch.frames]))
            x = pixels.to(m.device).permute(0, 3, 1, 2).to(m.dtype) / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]
            init = m.vae.encode(x).latent_dist.mean * self.scaling_factor
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(batch.frames)))
        else:
            latents = noise * scheduler.init_noise_sigma
        for t in timesteps:
            x = torch.cat([latents, latents]) if cfg else latents
            x = scheduler.scale_model_input(x, t)
            eps = m.backbone(x, t, encoder_hidden_states=emb).sample
            if cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + batch.guidance_scale * (cond - uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        self._sync()
        t2 = time.perf_counter()
        times.denoise_s = t2 - t1

        images = m.vae.decode(latents / self.scaling_factor).sample  # [B, 3, H, W] in [-1, 1]
        images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        out = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [B, H, W, 3]
        times.decode_s = time.perf_counter() - t2
        return out, times
