"""Flux's transformer blocks with the glue between their matmuls fused (issue 4).

diffusers' blocks join every branch to the residual stream with PyTorch ops, each a pass over a
[B, L, D] tensor (at 1024x1024: L = 4,096 image + 512 text tokens, D = 3,072, 28 MB in bf16):

- A double block (FluxTransformerBlock), per stream, after the attention: `gate * out`, the add,
  norm2, `* (1 + scale)`, `+ shift`; after the feed-forward `gate * out` and the add. Here:
  `gated_residual_layer_norm_modulate` (the new residual and the feed-forward's input from one
  read of each input), then `gated_residual`.
- A single block (FluxSingleTransformerBlock): `cat(text, image)` into a joint sequence, the MLP
  projection's GELU as a pass of its own over [B, L, 4D], `cat([attention, mlp], -1)` (a copy
  of [B, L, 5D], 141 MB) for proj_out, then `gate * out` and the add. Here: the joint sequence
  is reused without a copy when the two streams are adjacent in one tensor's memory, as the
  previous single block leaves them; the GELU runs in the MLP GEMM's epilogue; proj_out is two
  GEMMs over its weight's column blocks, the MLP's adding into the attention's output (cuBLAS's
  beta = 1: a read of [B, L, D] instead of the concatenation); then `gated_residual`. With FP8
  linears, one kernel (`gelu_tanh_fp8`) writes proj_out's quantised input, the attention output
  and the MLP's GELU side by side, in place of the GELU pass, the concatenation and the
  quantisation; a double block's feed-forward hands its out-projection the GELU quantised the
  same way. (Writing the GELU GEMM straight into a column slice of proj_out's input was tried:
  PyTorch then leaves cuBLASLt's epilogue for a plain GEMM, a strided GELU pass and two copies,
  3x slower.)

Counted on an H200 before the change (benchmarks/NOTES.md): "elementwise/other" kernels took
14.9 ms of a 131 ms Flux-dev step at 1024; the passes above are most of them.

Numerics: the fused kernels add and normalise in fp32 and round once, where diffusers rounds to
the model's dtype after each op, so they are closer to an fp32 reference. The single block's
split proj_out rounds the attention's half of its sum to the model's dtype once before the MLP's
half is added (tests/test_gpu_fast_paths.py holds the blocks to the tolerance policy). A block
called with joint_attention_kwargs (IP-adapter inputs) runs diffusers' forward unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _joined(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """torch.cat([first, second], dim=1) of two [B, L, D] tensors, without the copy when second
    directly follows first in one tensor's memory (a single block's text and image outputs are
    the two halves of one tensor): then a view of both, holding exactly their current values."""
    if (first.dim() == 3 and second.dim() == 3 and first.shape[0] == second.shape[0]
            and first.shape[2] == second.shape[2] and first.dtype == second.dtype and first.device == second.device
            and first.stride() == second.stride() and first.stride(2) == 1 and first.stride(1) >= first.shape[2]
            and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
            and second.storage_offset() == first.storage_offset() + first.shape[1] * first.stride(1)):
        b, lt, d = first.shape
        return first.as_strided((b, lt + second.shape[1], d), first.stride(), first.storage_offset())
    return torch.cat([first, second], dim=1)


def _is_tanh_gelu(act) -> bool:
    return type(act) is nn.GELU and act.approximate == "tanh"


def _fp8(*modules) -> bool:
    from rtdiff_cluster.quant.fp8 import Fp8Linear

    return all(isinstance(m, Fp8Linear) for m in modules)


def _feed_forward(ff, h: torch.Tensor) -> torch.Tensor:
    """ff(h) for diffusers' FeedForward with a tanh-GELU. Where both its linears are FP8, the GELU
    hands the out-projection its input already quantised (gelu_tanh_fp8): no bf16 activation
    written and read back."""
    from diffusers.models.activations import GELU

    from rtdiff_cluster.ops.fused import _dropout_active
    from rtdiff_kernels._launch import triton_runs
    from rtdiff_kernels.activations import gelu_tanh_fp8

    act, out = ff.net[0], ff.net[-1]
    if (len(ff.net) == 3 and type(act) is GELU and act.approximate == "tanh" and _fp8(act.proj, out)
            and not _dropout_active(ff) and triton_runs(h)):
        q, scale = gelu_tanh_fp8(act.proj(h))
        return out.forward_fp8(q, scale, h.dtype).view(*h.shape[:-1], out.out_features)
    return ff(h)


def _through_feed_forward(x, attn_out, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm: nn.LayerNorm, ff):
    """One stream of a double block after its attention: the gated residual, norm2 + modulation,
    the feed-forward and its gated residual."""
    from rtdiff_kernels.ada_layer_norm import gated_residual, gated_residual_layer_norm_modulate

    x, h = gated_residual_layer_norm_modulate(x, attn_out, gate_msa, shift_mlp, scale_mlp, norm.eps,
                                              norm.weight, norm.bias)
    return gated_residual(x, _feed_forward(ff, h), gate_mlp)


def _double_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                          joint_attention_kwargs=None):
    if joint_attention_kwargs:
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                  joint_attention_kwargs)
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
    attn_out, context_attn_out = self.attn(hidden_states=norm_h, encoder_hidden_states=norm_c,
                                           image_rotary_emb=image_rotary_emb)
    hidden_states = _through_feed_forward(hidden_states, attn_out, gate_msa, shift_mlp, scale_mlp, gate_mlp,
                                          self.norm2, self.ff)
    encoder_hidden_states = _through_feed_forward(encoder_hidden_states, context_attn_out, c_gate_msa, c_shift_mlp,
                                                  c_scale_mlp, c_gate_mlp, self.norm2_context, self.ff_context)
    if encoder_hidden_states.dtype == torch.float16:  # as diffusers: the text stream clipped to fp16's range
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                          joint_attention_kwargs=None):
    from rtdiff_kernels._launch import triton_runs
    from rtdiff_kernels.activations import gelu_tanh_fp8, linear_gelu_tanh
    from rtdiff_kernels.ada_layer_norm import gated_residual

    if joint_attention_kwargs:
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                  joint_attention_kwargs)
    text = encoder_hidden_states.shape[1]
    x = _joined(encoder_hidden_states, hidden_states)  # [B, L, D], text tokens first
    norm_x, gate = self.norm(x, emb=temb)
    attn = self.attn(hidden_states=norm_x, image_rotary_emb=image_rotary_emb)  # [B, L, D] (a shard's width under tp)
    proj_mlp, proj_out = self.proj_mlp, self.proj_out
    if _fp8(proj_mlp, proj_out) and _is_tanh_gelu(self.act_mlp) and triton_runs(norm_x):
        # FP8: proj_out's quantised input, [attention | GELU(MLP)] per row, written by one kernel.
        q, scale = gelu_tanh_fp8(proj_mlp(norm_x), prefix=attn)
        y = proj_out.forward_fp8(q, scale, attn.dtype).view(*attn.shape[:-1], proj_out.out_features)
        return _single_block_output(gated_residual(x, y, gate), text)
    if type(proj_mlp) is nn.Linear and _is_tanh_gelu(self.act_mlp):
        mlp = linear_gelu_tanh(norm_x, proj_mlp.weight, proj_mlp.bias)  # [B, L, 4D], the GELU in the GEMM
    else:  # a quantised or sharded MLP projection computes its own matmul
        mlp = self.act_mlp(proj_mlp(norm_x))
    da, dm = attn.shape[-1], mlp.shape[-1]
    if type(proj_out) is nn.Linear and proj_out.in_features == da + dm and proj_out.weight.dtype == attn.dtype:
        # proj_out(cat([attn, mlp])) as two GEMMs over its weight's two column blocks, the second
        # adding into the first's output: no [B, L, 5D] concatenation.
        w, bias = proj_out.weight, proj_out.bias
        a2d = attn.reshape(-1, da)
        y = torch.addmm(bias, a2d, w[:, :da].t()) if bias is not None else a2d @ w[:, :da].t()
        y = y.addmm_(mlp.reshape(-1, dm), w[:, da:].t()).view(*attn.shape[:-1], w.shape[0])
    else:
        y = proj_out(torch.cat([attn, mlp], dim=2))
    return _single_block_output(gated_residual(x, y, gate), text)


def _single_block_output(out: torch.Tensor, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    if out.dtype == torch.float16:  # as diffusers
        out = out.clip(-65504, 65504)
    return out[:, :text], out[:, text:]


def _plain_layer_norm(norm) -> bool:
    return type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1


def _double_fusable(block) -> bool:
    return (_plain_layer_norm(block.norm2) and _plain_layer_norm(block.norm2_context)
            and getattr(block.attn, "added_kv_proj_dim", None) is not None)


def install(backbone: nn.Module) -> dict[str, int]:
    """Patches every Flux block of backbone that these forwards cover; returns how many of each."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    done: dict[str, int] = {}
    for m in backbone.modules():
        if type(m) is FluxTransformerBlock and _double_fusable(m):
            m.forward, kind = types.MethodType(_double_block_forward, m), "flux double block gated residual+norm"
        elif type(m) is FluxSingleTransformerBlock:
            m.forward, kind = types.MethodType(_single_block_forward, m), "flux single block without concatenations"
        else:
            continue
        done[kind] = done.get(kind, 0) + 1
    return done
