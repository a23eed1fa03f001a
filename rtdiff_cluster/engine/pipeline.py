"""The denoising pipeline of one replica rank: text encoding (LRU), few-step loop, decode.

Written over diffusers components instead of a diffusers Pipeline class because the server needs
what those classes do not offer together: batches of frames with their own seeds (so an image does
not depend on what it was batched with), per-stage timing, a backbone sharded across ranks with
classifier-free guidance split over two more, and, later, CUDA graphs per shape. What differs
between model kinds lives in engine/families.py.

Every rank of a replica runs `run` on the same batch in lockstep (the backbone's all-reduces and
the CFG all-gather meet inside it); only the leader decodes.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rtdiff_cluster.cache.prompt_cache import PromptCache
from rtdiff_cluster.engine.families import family_for
from rtdiff_cluster.models.base import LoadedModel
from rtdiff_cluster.parallel import groups


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
        self.family = family_for(model)
        self.prompts = PromptCache(prompt_cache_size)
        self._step_takes_generator = "generator" in inspect.signature(model.scheduler_class.step).parameters

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def initial_noise(self, seeds: list[int], latent_hw: tuple[int, int]) -> torch.Tensor:
        """Per-frame noise from a CPU generator: the same seed gives the same image on any device."""
        h, w = latent_hw
        c = self.family.latent_channels()
        noise = [torch.randn((1, c, h, w), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
        return torch.cat(noise).to(self.model.device, self.model.dtype)  # [B, C, h, w]

    def uses_cfg(self, guidance_scale: float) -> bool:
        return self.family.uses_cfg and guidance_scale > 1.0

    @torch.inference_mode()
    def run(self, batch: BatchSpec, prompts: list[str], negative_prompts: list[str],
            decode: bool = True) -> tuple[np.ndarray | None, StageTimes]:
        """Images [B, H, W, 3] uint8 (None when decode is False) and the stage times of the batch."""
        m, fam = self.model, self.family
        times = StageTimes()
        t0 = time.perf_counter()
        n = len(batch.frames)
        cfg = self.uses_cfg(batch.guidance_scale)
        cfg_split = cfg and groups.cfg_size() == 2  # this rank computes one branch; the other rank the other
        if not cfg:
            cond = self.prompts.get_many(prompts, fam.encode)
        elif cfg_split:
            branch = negative_prompts if groups.cfg_rank() == 0 else prompts
            cond = self.prompts.get_many(branch, fam.encode)
        else:
            neg, pos = self.prompts.get_many(negative_prompts, fam.encode), self.prompts.get_many(prompts, fam.encode)
            cond = tuple(torch.cat([a, b]) for a, b in zip(neg, pos))  # [2B, ...]: unconditional first
        self._sync()
        t1 = time.perf_counter()
        times.text_encode_s = t1 - t0

        scheduler = m.scheduler_class.from_config(m.scheduler_config)
        f = m.limits.vae_scale_factor
        h, w = batch.height // f, batch.width // f
        fam.set_timesteps(scheduler, batch.steps, h, w)
        timesteps = scheduler.timesteps
        noise = fam.to_model_layout(self.initial_noise([fr.seed for fr in batch.frames], (h, w)))
        init = None
        if batch.strength > 0:
            # Image-to-image: start part-way down the schedule from the noised input latents.
            start = batch.steps - min(int(batch.steps * batch.strength), batch.steps)
            timesteps = timesteps[start * scheduler.order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start * scheduler.order)
            pixels = torch.from_numpy(np.stack([fr.init_image for fr in batch.frames]))
            x = pixels.to(m.device).permute(0, 3, 1, 2).to(m.dtype) / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]
            init = fam.to_model_layout(fam.encode_image(x))
        latents = fam.initial_latents(scheduler, noise, init, timesteps[:1])
        extra = fam.extra_inputs(n, batch.width, batch.height, batch.guidance_scale, h, w)
        step_kwargs = {}
        if self._step_takes_generator:  # ancestral samplers draw fresh noise each step: per frame, seeded
            step_kwargs["generator"] = [torch.Generator("cpu").manual_seed(fr.seed ^ 0x5EED) for fr in batch.frames]
        for t in timesteps:
            if cfg_split:
                uncond, cond_out = groups.all_gather_cfg(fam.predict(scheduler, latents, t, cond, extra))
                eps = uncond + batch.guidance_scale * (cond_out - uncond)
            elif cfg:
                out = fam.predict(scheduler, torch.cat([latents, latents]), t, cond, extra)
                uncond, cond_out = out.chunk(2)
                eps = uncond + batch.guidance_scale * (cond_out - uncond)
            else:
                eps = fam.predict(scheduler, latents, t, cond, extra)
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        self._sync()
        t2 = time.perf_counter()
        times.denoise_s = t2 - t1
        if not decode:
            return None, times

        images = fam.decode(fam.to_vae_layout(latents, h, w))  # [B, 3, H, W] in [-1, 1]
        images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        out = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [B, H, W, 3]
        times.decode_s = time.perf_counter() - t2
        return out, times
