"""One linear in place of many that all project the same tensor within one backbone forward.

A UNet's modules often apply their own small linear to one shared input: every cross-attention's
key and value projections read the same text states, every resnet's time-embedding projection the
same time embedding. Each small matmul launches its own kernel and, at batch 1, runs far below the
GPU's rate. Stacking their weights row-wise makes one matmul per forward; each module then reads
its columns of the result (a `Slot`).

`SharedProjection.of(x)` computes the stacked projection the first time a forward asks for x and
hands the same result to every later caller with that x. Hooks at the backbone forward's start and
end forget it (a captured graph must compute it inside the capture, and eager runs should not hold
it) unless `held` keeps it across forwards, which a denoising loop over unchanged text states uses.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
from torch import nn


@dataclasses.dataclass
class _Held:
    held: bool = False
    key: tuple | None = None
    out: torch.Tensor | None = None


class SharedProjection(nn.Module):
    """proj (any module: a linear, or an activation then a linear) applied once per forward to the
    input its callers share."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj
        # Per thread: a graph cache capturing aside (engine/graphs.py) runs the backbone on its own
        # thread while the compute thread may run it eagerly; each holds its own result.
        self._states: dict[int, _Held] = {}

    def _state(self) -> _Held:
        st = self._states.get(threading.get_ident())
        if st is None:
            st = self._states[threading.get_ident()] = _Held()
        return st

    @property
    def held(self) -> bool:
        return self._state().held

    @held.setter
    def held(self, value: bool) -> None:
        self._state().held = value

    @property
    def _out(self) -> torch.Tensor | None:  # this thread's last result (tests check it is not kept)
        return self._state().out

    def clear(self, *_args) -> None:
        """Forgets the last result (the backbone's forward pre- and post-hook), unless held."""
        if not self.held:
            self.forget()

    def forget(self) -> None:
        st = self._state()
        st.key = st.out = None

    def of(self, x: torch.Tensor) -> torch.Tensor:
        # The same input object all through one forward (the backbone hands it to every block); a
        # different one, or the same storage grown, computes again. The key holds x itself, not
        # its id: blocks run outside a backbone forward (engine/step_cache.py's first block) are
        # not followed by the clearing hook, and a freed x's id and memory can come back for the
        # next step's new time embedding.
        st = self._state()
        key = (x, x.data_ptr(), tuple(x.shape))
        if st.key is None or st.key[0] is not x or st.key[1:] != key[1:]:
            st.out = self.proj(x)  # [..., sum of the callers' widths]
            st.key = key
        return st.out

    def install(self, backbone: nn.Module) -> None:
        backbone.register_forward_pre_hook(self.clear)
        backbone.register_forward_hook(self.clear)


class Slot:
    """One caller's columns [offset, offset + width) of a SharedProjection's result."""

    def __init__(self, shared: SharedProjection, offset: int, width: int):
        self.shared, self.offset, self.width = shared, offset, width

    def of(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.of(x)[..., self.offset:self.offset + self.width]


def plain_linear(m) -> bool:
    """An unsharded, unquantised nn.Linear (a tensor-parallel or FP8 one keeps its own matmul)."""
    return (type(m) is nn.Linear and type(m.weight) is nn.Parameter and type(m.weight.data) is torch.Tensor
            and (m.bias is None or type(m.bias.data) is torch.Tensor))


def stacked(linears: list[nn.Linear], extra_bias: list[torch.Tensor | None] | None = None) -> nn.Linear:
    """One linear whose output is the given linears' outputs side by side (their weights copied,
    row blocks in order). extra_bias: per linear, a vector added to its bias rows (or None)."""
    first = linears[0].weight
    extra_bias = extra_bias or [None] * len(linears)
    has_bias = any(m.bias is not None for m in linears) or any(b is not None for b in extra_bias)
    out = nn.Linear(first.shape[1], sum(m.out_features for m in linears), bias=has_bias,
                    device=first.device, dtype=first.dtype)
    offset = 0
    with torch.no_grad():
        if has_bias:
            out.bias.zero_()
        for m, extra in zip(linears, extra_bias, strict=True):
            rows = slice(offset, offset + m.out_features)
            out.weight[rows].copy_(m.weight)
            if m.bias is not None:
                out.bias[rows].copy_(m.bias)
            if extra is not None:
                # Summed in fp32, rounded once: what the two adds would give up to one rounding.
                out.bias[rows].copy_(out.bias[rows].float() + extra.float())
            offset += m.out_features
    return out
