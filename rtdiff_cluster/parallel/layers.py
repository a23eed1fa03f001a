"""Tensor-parallel layers on plain local tensors: a shard is an ordinary Linear/Conv of the local
shape, and a row-parallel layer ends in one all-reduce.

Written here rather than taken from torch.distributed.tensor.parallel (ColwiseParallel /
RowwiseParallel over DTensor, which diffusers' own `enable_parallelism` uses) for two measured
reasons: DTensor's per-op dispatch added 143 us to every colwise+rowwise pair on the 2-core VM
(`parallelize_module` vs these layers, same shapes, one rank), about 29 ms of host time per
Flux step in eager mode, half the step's GPU budget at tp=2; and diffusers refuses CPU meshes,
while CI must test sharding on CPU with gloo. Which module is sharded how still comes from the
model's plan (parallel/plans.py), and for Flux that is diffusers' own `_tp_plan`.

A column-parallel Linear needs no class of its own: it is an nn.Linear whose out_features is the
local share, and its output stays sharded for the next (row-parallel) layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtdiff_cluster.parallel import groups


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: the input's last dim and W's columns are the
    local shard, the bias is whole and added once, after the sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = groups.all_reduce_tp(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class RowParallelConv2d(nn.Conv2d):
    """The convolution counterpart: input channels are the local shard, the output is summed over
    the tensor-parallel group, and the bias is added after the sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = groups.all_reduce_tp(self._conv_forward(x, self.weight, None))
        return y if self.bias is None else y + self.bias[None, :, None, None]
