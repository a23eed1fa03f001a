"""Materialises a model built on the meta device: each parameter gets exactly this rank's slice,
read from safetensors files or drawn from a seeded generator, so a rank never holds more than its
shards plus the replicated parts (and, while loading, one parameter's slice on the host).

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    specs = shard_model(model, plan, tp)                 # parallel/plans.py; {} at tp=1
    materialize(model, specs, SafetensorsWeights(folder), tp, rank, device, dtype)
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from rtdiff_cluster.parallel.plans import REPLICATED, Shard


class WeightsError(ValueError):
    """A checkpoint that cannot fill the model; the message names the file and tensor."""


class WeightSource(Protocol):
    def read(self, name: str, full_shape: tuple[int, ...], shard: Shard, tp: int, rank: int,
             device: torch.device) -> torch.Tensor:
        """This rank's slice of tensor `name`, whose whole shape the model expects to be full_shape
        (any dtype; the caller casts)."""

    def describe(self, name: str) -> str:
        """Where `name` comes from, for error messages."""


class SafetensorsWeights:
    """The tensors of one diffusers component folder: `*.safetensors` files, sharded ones through
    their `*.safetensors.index.json`. Only the requested slice of each tensor is read from disk."""

    def __init__(self, folder: str | Path, variant: str = ""):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._open = safe_open
        self._handles: dict[Path, object] = {}
        suffix = f".{variant}.safetensors" if variant else ".safetensors"
        indexes = sorted(self.folder.glob(f"*{suffix}.index.json"))
        self.files: dict[str, Path] = {}
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise WeightsError(f"{indexes[0]}: not a safetensors index ({type(e).__name__}: {e})") from None
            for name, file in weight_map.items():
                self.files[name] = self.folder / file
        else:
            files = [f for f in sorted(self.folder.glob(f"*{suffix}")) if variant or f.name.count(".") == 1]
            if not files:
                raise WeightsError(f"{self.folder}: no *{suffix} weights (only safetensors checkpoints are read)")
            for file in files:
                for name in self._keys(file):
                    self.files[name] = file

    def _keys(self, file: Path) -> list[str]:
        return list(self._handle(file).keys())

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            if not file.is_file():
                raise WeightsError(f"{file}: missing (named by the folder's safetensors index)")
            try:
                handle = self._handles[file] = self._open(str(file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise WeightsError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        return handle

    def names(self) -> set[str]:
        return set(self.files)

    def describe(self, name: str) -> str:
        return f"{self.files.get(name, self.folder)}:{name}"

    def read(self, name: str, full_shape: tuple[int, ...], shard: Shard, tp: int, rank: int,
             device: torch.device) -> torch.Tensor:
        file = self.files.get(name)
        if file is None:
            raise WeightsError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        try:
            stored = self._handle(file).get_slice(name)
            if tuple(stored.get_shape()) != tuple(full_shape):
                raise WeightsError(f"{file}: {name!r} has shape {tuple(stored.get_shape())} where the model's config "
                                   f"needs {tuple(full_shape)}")
            return shard.local(stored, tp, rank)
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(f"{file}: cannot read {name!r} ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        self._handles.clear()


class SyntheticWeights:
    """Seeded random weights for presets: each tensor is drawn whole from a generator seeded by
    (seed, name), on the target device, then cut to this rank's slice, so every tp degree sees the
    same model. Values follow the usual initialisation scale (uniform within 1/sqrt(fan_in) for
    matrices and kernels, ones for 1-d weights, zeros for biases), which keeps deep stacks finite.
    The draws differ between CPU and CUDA generators: a preset's weights depend on the device."""

    def __init__(self, seed: int):
        self.seed = seed

    def describe(self, name: str) -> str:
        return f"synthetic weights (seed {self.seed}):{name}"

    def read(self, name: str, full_shape: tuple[int, ...], shard: Shard, tp: int, rank: int,
             device: torch.device) -> torch.Tensor:
        shape = full_shape
        gen = torch.Generator(device).manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        if name.endswith("bias") or (len(shape) == 1 and not name.endswith("weight")):
            full = torch.zeros(shape, device=device)
        elif len(shape) == 1:
            full = torch.ones(shape, device=device)
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            bound = fan_in ** -0.5
            full = torch.rand(shape, generator=gen, device=device).mul_(2 * bound).sub_(bound)
        return shard.local(full, tp, rank)


def materialize(model: nn.Module, specs: dict[str, Shard], full_shapes: dict[str, tuple[int, ...]],
                source: WeightSource, tp: int, rank: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Allocates `model`'s (local-shaped) parameters on `device` in `dtype` and fills them from
    `source`; raises WeightsError naming the tensor when a shape does not match. full_shapes: each
    parameter's shape before sharding."""
    buffers = [name for name, b in model.named_buffers() if b.is_meta]
    if buffers:
        raise WeightsError(f"{type(model).__name__} has buffers the loader cannot fill: {', '.join(buffers[:5])}")
    nn.Module.to(model, dtype=dtype)  # nn.Module's own: diffusers' override warns about a cast on meta tensors
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = source.read(name, full_shapes[name], specs.get(name, REPLICATED), tp, rank, device)
            if tuple(t.shape) != tuple(p.shape):
                raise WeightsError(f"{source.describe(name)}: shape {tuple(t.shape)} where the model's config needs "
                                   f"{tuple(p.shape)}" + (f" (this rank's 1/{tp} slice)" if name in specs else ""))
            p.copy_(t)
    return model.eval().requires_grad_(False)


def build(cls, config, *, plan: dict | None, tp: int, rank: int, device: torch.device, dtype: torch.dtype,
          source: WeightSource) -> tuple[nn.Module, dict[str, Shard]]:
    """A diffusers model class (from_config) or transformers model class (a PretrainedConfig)
    built on the meta device, sharded by `plan` when tp > 1, and filled from `source`."""
    from rtdiff_cluster.parallel.plans import shard_model

    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    specs = shard_model(model, plan, tp) if plan and tp > 1 else {}
    materialize(model, specs, full_shapes, source, tp, rank, device, dtype)
    return model, specs
