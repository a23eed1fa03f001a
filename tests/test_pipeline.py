"""The engine's pipeline on the embedded model, without Ray: sizes, determinism, batching, caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdiff_cluster.cache.prompt_cache import PromptCache
from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
from rtdiff_cluster.models.registry import load_model

# Batched CPU matmuls may round differently from single ones: at most 1 of 255 measured here.
BATCHED_TOLERANCE = 2


@pytest.fixture(scope="module")
def pipeline():
    from rtdiff_cluster.parallel import groups

    groups.init_single(torch.device("cpu"))  # a replica of one process
    yield Pipeline(load_model(ModelConfig()), prompt_cache_size=4)
    groups.destroy()


def run(p, w=64, h=64, steps=2, seeds=(0,), prompt="a cat", guidance=0.0, strength=0.0, init=None):
    frames = [FrameSpec(prompt, seed=s, init_image=init) for s in seeds]
    return p.run(BatchSpec(w, h, steps, guidance, strength, frames), [prompt] * len(seeds), [""] * len(seeds))


def test_output_shape_and_range(pipeline):
    images, times = run(pipeline, w=192, h=64, seeds=(1, 2))
    assert images.shape == (2, 64, 192, 3) and images.dtype == np.uint8
    assert images.std() > 1 and times.denoise_s > 0 and times.decode_s > 0


def test_same_seed_same_image_independent_of_batch(pipeline):
    alone, _ = run(pipeline, seeds=(7,))
    again, _ = run(pipeline, seeds=(7,))
    batched, _ = run(pipeline, seeds=(3, 7, 9))
    assert np.array_equal(alone, again)
    assert np.abs(batched[1].astype(int) - alone[0].astype(int)).max() <= BATCHED_TOLERANCE
    assert not np.array_equal(batched[0], batched[1])


def test_image_to_image_depends_on_input_and_strength(pipeline):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (64, 64, 3), np.uint8) for _ in range(2))
    out_a, _ = run(pipeline, steps=4, strength=0.5, init=a)
    out_b, _ = run(pipeline, steps=4, strength=0.5, init=b)
    out_a_strong, _ = run(pipeline, steps=4, strength=1.0, init=a)
    assert not np.array_equal(out_a, out_b)
    assert not np.array_equal(out_a, out_a_strong)


def test_guidance_uses_negative_prompt(pipeline):
    frames = [FrameSpec("a cat", seed=0)]
    spec = BatchSpec(64, 64, 2, 4.0, 0.0, frames)
    x, _ = pipeline.run(spec, ["a cat"], [""])
    y, _ = pipeline.run(spec, ["a cat"], ["a dog"])
    assert not np.array_equal(x, y)


def test_prompt_cache_is_lru_and_counts():
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return [(torch.full((2,), float(len(p))), torch.tensor([len(p) * 10.0])) for p in prompts]

    cache = PromptCache(capacity=2)
    hidden, pooled = cache.get_many(["a", "bb", "a"], encode)
    assert calls == [["a", "bb"]] and hidden[:, 0].tolist() == [1, 2, 1] and pooled[:, 0].tolist() == [10, 20, 10]
    cache.get_many(["a"], encode)  # hit; "bb" is now least recently used
    cache.get_many(["ccc"], encode)  # evicts "bb"
    cache.get_many(["bb", "a"], encode)
    assert calls[-1] == ["bb"] and len(cache) == 2
    assert cache.misses == 4 and cache.hits == 3
