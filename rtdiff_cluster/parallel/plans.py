"""Tensor-parallel plans: which module of a backbone is sharded how, keyed by module path.

A plan maps fnmatch patterns over `named_modules()` paths to a style:

    colwise      nn.Linear, output features split: [out/tp, in] (+ bias [out/tp])
    rowwise      nn.Linear, input features split: [out, in/tp], all-reduced (RowParallelLinear)
    colwise_conv nn.Conv2d, output channels split
    rowwise_conv nn.Conv2d, input channels split, all-reduced (RowParallelConv2d)
    groupnorm    nn.GroupNorm over channels split at group boundaries (each rank normalises whole groups)

and diffusers' PackedColwiseParallel / PackedRowwiseParallel markers, which split each block of a
fused dimension separately (Flux's single-block proj_out reads cat([attention, mlp])).

`shard_model` rewrites a model (typically built on the meta device) in place to the local shapes of
one rank and returns, per parameter name, how to cut the full tensor: `Shard(dim, blocks)`. The
loader (models/weights.py) reads exactly those slices. Divisibility is checked for every planned
dimension and every sharded attention's heads before anything is allocated, and each failure
names the module.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from rtdiff_cluster.parallel.layers import RowParallelConv2d, RowParallelLinear


@dataclass(frozen=True)
class Shard:
    """How a parameter's full tensor maps to a rank: `dim` split into `blocks`, each block cut in
    tp equal parts and the rank's parts concatenated. dim None: the whole tensor on every rank."""

    dim: int | None
    blocks: tuple[int, ...] = ()

    def local(self, tensor, tp: int, rank: int):
        """This rank's slice of `tensor` (a torch.Tensor, or a safetensors slice so that only those
        bytes are read)."""
        if self.dim is None or tp == 1:
            return tensor if isinstance(tensor, torch.Tensor) else tensor[:]
        ndim = tensor.dim() if isinstance(tensor, torch.Tensor) else len(tensor.get_shape())
        parts, offset = [], 0
        for size in self.blocks:
            chunk = size // tp
            index = [slice(None)] * ndim
            index[self.dim] = slice(offset + rank * chunk, offset + (rank + 1) * chunk)
            parts.append(tensor[tuple(index)])
            offset += size
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)).contiguous()


REPLICATED = Shard(None)


def _packed_blocks(style, module: nn.Module, path: str, attr: str, full: int) -> tuple[int, ...]:
    blocks = style.blocks if style.blocks is not None else getattr(module, attr, None)
    if not blocks:
        raise ValueError(f"tp plan: {path} is packed but names no blocks")
    unit, rest = divmod(full, sum(blocks))
    if rest:
        raise ValueError(f"tp plan: blocks {blocks} of {path} do not divide its {full} features")
    return tuple(b * unit for b in blocks)


def _style_name(style) -> str:
    if isinstance(style, str):
        return style
    return {"PackedColwiseParallel": "colwise", "PackedRowwiseParallel": "rowwise"}[type(style).__name__]


def _check(size: int, tp: int, path: str, what: str) -> None:
    if size % tp:
        raise ValueError(f"tp: {tp} does not divide the {size} {what} of {path}")


def shard_model(model: nn.Module, plan: dict, tp: int) -> dict[str, Shard]:
    """Rewrites the planned modules of `model` to one rank's local shapes (all ranks get the same
    shapes) and returns the Shard of every parameter they own. Unplanned parameters are replicated."""
    specs: dict[str, Shard] = {}
    matched: set[str] = set()
    replacements: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(path, pattern)), None)
        if style is None:
            continue
        matched.add(path)
        name = _style_name(style)
        if name in ("colwise", "rowwise"):
            if not isinstance(module, nn.Linear):
                raise ValueError(f"tp plan: {path} is a {type(module).__name__}, not a Linear")
            if name == "colwise":
                full = module.out_features
                blocks = (_packed_blocks(style, module, path, "_tp_packed_col_blocks", full)
                          if not isinstance(style, str) else (full,))
                for b in blocks:
                    _check(b, tp, path, "output features")
                new = nn.Linear(module.in_features, full // tp, bias=module.bias is not None,
                                device=module.weight.device, dtype=module.weight.dtype)
                specs[f"{path}.weight"] = Shard(0, blocks)
                if module.bias is not None:
                    specs[f"{path}.bias"] = Shard(0, blocks)
            else:
                full = module.in_features
                blocks = (_packed_blocks(style, module, path, "_tp_packed_row_blocks", full)
                          if not isinstance(style, str) else (full,))
                for b in blocks:
                    _check(b, tp, path, "input features")
                new = RowParallelLinear(full // tp, module.out_features, bias=module.bias is not None,
                                        device=module.weight.device, dtype=module.weight.dtype)
                specs[f"{path}.weight"] = Shard(1, blocks)
        elif name in ("colwise_conv", "rowwise_conv"):
            if not isinstance(module, nn.Conv2d) or module.groups != 1:
                raise ValueError(f"tp plan: {path} is not a plain Conv2d")
            col = name == "colwise_conv"
            _check(module.out_channels if col else module.in_channels, tp, path,
                   "output channels" if col else "input channels")
            cls = nn.Conv2d if col else RowParallelConv2d
            new = cls(module.in_channels if col else module.in_channels // tp,
                      module.out_channels // tp if col else module.out_channels, module.kernel_size,
                      stride=module.stride, padding=module.padding, dilation=module.dilation,
                      bias=module.bias is not None, padding_mode=module.padding_mode,
                      device=module.weight.device, dtype=module.weight.dtype)
            specs[f"{path}.weight"] = Shard(0 if col else 1, (module.out_channels if col else module.in_channels,))
            if module.bias is not None and col:
                specs[f"{path}.bias"] = Shard(0, (module.out_channels,))
        elif name == "groupnorm":
            if not isinstance(module, nn.GroupNorm):
                raise ValueError(f"tp plan: {path} is a {type(module).__name__}, not a GroupNorm")
            _check(module.num_groups, tp, path, "groups")
            new = nn.GroupNorm(module.num_groups // tp, module.num_channels // tp, eps=module.eps, affine=module.affine,
                               device=module.weight.device if module.affine else None,
                               dtype=module.weight.dtype if module.affine else None)
            if module.affine:
                specs[f"{path}.weight"] = specs[f"{path}.bias"] = Shard(0, (module.num_channels,))
        else:
            raise ValueError(f"tp plan: unknown style {style!r} for {path}")
        for attr in ("_tp_packed_col_blocks", "_tp_packed_row_blocks"):
            if hasattr(module, attr):
                setattr(new, attr, getattr(module, attr))
        replacements.append((path, new))

    for pattern in plan:
        if not any(fnmatch.fnmatchcase(p, pattern) for p in matched):
            raise ValueError(f"tp plan: {pattern!r} matches no module of {type(model).__name__}")
    _fix_heads(model, specs, tp)
    for path, new in replacements:
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return specs


def _fix_heads(model: nn.Module, specs: dict[str, Shard], tp: int) -> None:
    """An attention whose q/k/v are column-sharded computes heads/tp heads on each rank; diffusers'
    UNet processors reshape by `attn.heads`, so it must say the local count (Flux's reshape by
    head_dim and does not care, but is kept consistent)."""
    for path, module in model.named_modules():
        heads = getattr(module, "heads", None)
        if not isinstance(heads, int) or f"{path}.to_q.weight" not in specs:
            continue
        _check(heads, tp, path, "attention heads")
        module.heads = heads // tp


# ---- plans ----------------------------------------------------------------------------------------

def flux_plan() -> dict:
    """diffusers' own plan for FluxTransformer2DModel (attention heads and MLPs split, AdaLN
    modulation and QK-norms replicated): one all-reduce after attention and one after each MLP."""
    from diffusers import FluxTransformer2DModel

    return dict(FluxTransformer2DModel._tp_plan)


def unet_plan(shard_resnets: bool) -> dict:
    """UNet2DConditionModel (SD 1.x/2.x, SDXL): in every transformer block, self- and
    cross-attention split by heads and the GEGLU feed-forward split by features, the same
    column-then-row pattern as a DiT block. The GEGLU projection packs [hidden, gate]; each half
    is split separately so `chunk(2)` still pairs them on every rank.

    shard_resnets also splits each ResnetBlock2D by channels: conv1 (and the time-embedding
    projection added to it) by output channels, norm2 over whole groups locally, conv2 by input
    channels with one all-reduce. The shortcut, the up/down samplers and conv_in/out stay replicated."""
    from diffusers.hooks.tensor_parallel import PackedColwiseParallel

    plan: dict = {}
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v"):
            plan[f"*.transformer_blocks.*.{attn}.{proj}"] = "colwise"
        plan[f"*.transformer_blocks.*.{attn}.to_out.0"] = "rowwise"
    plan["*.transformer_blocks.*.ff.net.0.proj"] = PackedColwiseParallel([1, 1])
    plan["*.transformer_blocks.*.ff.net.2"] = "rowwise"
    if shard_resnets:
        plan["*.resnets.*.conv1"] = "colwise_conv"
        plan["*.resnets.*.time_emb_proj"] = "colwise"
        plan["*.resnets.*.norm2"] = "groupnorm"
        plan["*.resnets.*.conv2"] = "rowwise_conv"
    return plan


def plan_for(backbone: nn.Module, shard_resnets: bool = True) -> dict:
    name = type(backbone).__name__
    if name == "FluxTransformer2DModel":
        return flux_plan()
    if name == "UNet2DConditionModel":
        return unet_plan(shard_resnets)
    raise ValueError(f"tp: no tensor-parallel plan for {name}; supported: FluxTransformer2DModel, UNet2DConditionModel")
