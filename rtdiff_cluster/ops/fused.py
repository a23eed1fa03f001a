"""Puts our fused kernels (kernels/, import name `rtdiff_kernels`) into diffusers' modules of a
loaded backbone, sharded or not, by replacing those modules' `forward` with one that computes
the same thing through the kernel:

    ResnetBlock2D (UNet)      GroupNorm -> SiLU, twice per block, as one kernel each
    GroupNorm elsewhere       (in front of UNet transformers, the output head) the same kernel
    GEGLU (UNet feed-forward) proj -> chunk -> x * gelu(gate), the gating as one kernel
    GELU tanh (Flux ff)       proj -> tanh-GELU with the GELU in the GEMM's epilogue
    AdaLayerNormZero[Single], AdaLayerNormContinuous (Flux)
                              LayerNorm -> * (1 + scale) + shift as one kernel

diffusers' modules stay the readable reference: tests/test_fused_modules.py holds every patched
module to its unpatched output. A module whose configuration the kernel does not cover (another
norm type, an up/down-sampling variant the forward below does not know) keeps diffusers' forward.
"""

from __future__ import annotations

import types
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward for time_embedding_norm="default" with SiLU, each
    GroupNorm -> SiLU pair fused."""
    from rtdiff_kernels.group_norm_silu import group_norm_silu

    n1, n2 = self.norm1, self.norm2
    hidden = group_norm_silu(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps)
    if self.upsample is not None:
        input_tensor, hidden = self.upsample(input_tensor), self.upsample(hidden)
    elif self.downsample is not None:
        input_tensor, hidden = self.downsample(input_tensor), self.downsample(hidden)
    hidden = self.conv1(hidden)
    if self.time_emb_proj is not None:
        temb = self.time_emb_proj(temb if self.skip_time_act else F.silu(temb))[:, :, None, None]
    if temb is not None:
        hidden = hidden + temb
    hidden = group_norm_silu(hidden, n2.num_groups, n2.weight, n2.bias, n2.eps)
    hidden = self.conv2(self.dropout(hidden))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden) / self.output_scale_factor


def _resnet_fusable(block) -> bool:
    return (block.time_embedding_norm == "default" and isinstance(block.nonlinearity, nn.SiLU)
            and isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm))


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    from rtdiff_kernels.activations import geglu

    return geglu(self.proj(hidden_states))


def _gelu_tanh_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from rtdiff_kernels.activations import linear_gelu_tanh

    proj = self.proj
    if type(proj) is nn.Linear:  # a quantised or row-parallel projection computes its own matmul
        return linear_gelu_tanh(hidden_states, proj.weight, proj.bias)
    return F.gelu(proj(hidden_states), approximate="tanh")


def _ada_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    from rtdiff_kernels.ada_layer_norm import layer_norm_modulate

    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(F.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    return layer_norm_modulate(x, shift_msa, scale_msa, self.norm.eps), gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_zero_single_forward(self, x, emb=None):
    from rtdiff_kernels.ada_layer_norm import layer_norm_modulate

    shift_msa, scale_msa, gate_msa = self.linear(F.silu(emb)).chunk(3, dim=1)
    return layer_norm_modulate(x, shift_msa, scale_msa, self.norm.eps), gate_msa


def _ada_continuous_forward(self, x, conditioning_embedding):
    from rtdiff_kernels.ada_layer_norm import layer_norm_modulate

    scale, shift = self.linear(F.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
    return layer_norm_modulate(x, shift, scale, self.norm.eps, self.norm.weight, self.norm.bias)


def _group_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    from rtdiff_kernels.group_norm_silu import group_norm_silu

    return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, silu=False)


def _plain_layer_norm(norm) -> bool:
    return type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1


def install_fused(backbone: nn.Module) -> dict[str, int]:
    """Patches every module the kernels cover; returns how many of each kind."""
    from diffusers.models.activations import GEGLU, GELU
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
    from diffusers.models.resnet import ResnetBlock2D

    done: Counter[str] = Counter()
    in_resnets = {id(m) for r in backbone.modules() if isinstance(r, ResnetBlock2D) and _resnet_fusable(r)
                  for m in (r.norm1, r.norm2)}

    def patch(module, forward, kind):
        module.forward = types.MethodType(forward, module)
        done[kind] += 1

    for module in backbone.modules():
        if isinstance(module, ResnetBlock2D) and _resnet_fusable(module):
            patch(module, _resnet_forward, "resnet group_norm+silu")
        elif type(module) is nn.GroupNorm and id(module) not in in_resnets:
            patch(module, _group_norm_forward, "group_norm")
        elif isinstance(module, GEGLU):
            patch(module, _geglu_forward, "geglu")
        elif isinstance(module, GELU) and module.approximate == "tanh":
            patch(module, _gelu_tanh_forward, "linear+gelu_tanh")
        elif isinstance(module, AdaLayerNormZero) and _plain_layer_norm(module.norm) and module.norm.weight is None:
            patch(module, _ada_zero_forward, "adaln_zero")
        elif isinstance(module, AdaLayerNormZeroSingle) and _plain_layer_norm(module.norm) and module.norm.weight is None:
            patch(module, _ada_zero_single_forward, "adaln_zero")
        elif isinstance(module, AdaLayerNormContinuous) and _plain_layer_norm(module.norm):
            patch(module, _ada_continuous_forward, "adaln_continuous")
    return dict(done)
