"""Attention processors that run diffusers' attention modules through our backend registry
(ops/attention.py) and, on CUDA, our fused kernels.

`install(backbone, registry, fused)` puts them on every attention module of a UNet2DConditionModel
(diffusers' Attention) or a FluxTransformer2DModel (FluxAttention), sharded or not: both processors
take the head count from the projections' local width, as tensor parallelism needs. They compute
what diffusers' AttnProcessor2_0 and FluxAttnProcessor compute (tests/test_processors.py holds them
to it); only the attention call and, for Flux, the QK-norm + rotary step change.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from rtdiff_cluster.cache import token_kv
from rtdiff_cluster.ops.attention import AttentionRegistry
from rtdiff_cluster.ops.shared_projection import SharedProjection, Slot, stacked


class UNetAttnProcessor:
    """diffusers' AttnProcessor2_0 for UNet2DConditionModel (self- and cross-attention in
    BasicTransformerBlock), with the attention call routed through the registry."""

    def __init__(self, registry: AttentionRegistry):
        self.registry = registry

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None and getattr(attn, "to_qkv", None) is not None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)  # each [B, L, heads_local * D]
        else:
            if attn.to_q is None:
                raise ValueError("UNetAttnProcessor: a self-attention module with fused projections got encoder_hidden_states")
            query = attn.to_q(hidden_states)  # [B, L, heads_local * D]
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            if encoder_hidden_states is not None and attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            if getattr(attn, "to_kv", None) is not None:
                key, value = attn.to_kv(context).chunk(2, dim=-1)
            elif encoder_hidden_states is not None and getattr(attn, "kv_slot", None) is not None:
                key, value = attn.kv_slot.of(context)  # this module's columns of every module's K/V matmul
            else:
                key, value = attn.to_k(context), attn.to_v(context)
        hidden_states = self.attend(attn, query, key, value, attention_mask)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        # Dividing by 1 (SDXL's factor) would still be a pass over the tensor and a launch.
        return hidden_states / attn.rescale_output_factor if attn.rescale_output_factor != 1 else hidden_states

    def attend(self, attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """From the projections on: q [B, L, heads_local * D], k and v [B, S, heads_local * D]
        through the registry and the out projection -> [B, L, C]. ops/fused._block_chain calls it
        with q/k/v it projected from a norm's quantised output."""
        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is None:
            out = self.registry(query, key, value)
        else:  # masks are rare in these models (none in SD/SDXL): PyTorch handles them
            mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.view(batch, attn.heads, -1, mask.shape[-1]))
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def _qk_fused(fused: bool, rope, x: torch.Tensor) -> bool:
    return fused and rope is not None and x.is_cuda


def _qk_norm_rope(norm, x: torch.Tensor, rope, fused: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over head_dim then rotary: x [B, L, H, D]; rope (cos, sin) [L, D] or None. out: where
    the fused kernel writes (packed heads, any token stride); only where _qk_fused."""
    if _qk_fused(fused, rope, x):
        from rtdiff_kernels.rms_norm_rope import rms_norm_rope

        return rms_norm_rope(x, norm.weight, norm.eps, rope[0], rope[1], out=out)
    from diffusers.models.embeddings import apply_rotary_emb

    x = norm(x)
    return apply_rotary_emb(x, rope, sequence_dim=1) if rope is not None else x


def _joint_qk_norm_rope(norms, parts, ropes, fused: bool) -> torch.Tensor:
    """torch.cat([_qk_norm_rope(norm, x, rope) for each stream], dim=1): the text and image rows
    of a joint query or key. The fused kernel writes each stream's rows of one tensor in place,
    so no concatenation (a pass over [B, L, H, D], 28 MB for Flux at 1024) follows it."""
    if not all(_qk_fused(fused, rope, x) for x, rope in zip(parts, ropes)):
        return torch.cat([_qk_norm_rope(n, x, r, fused) for n, x, r in zip(norms, parts, ropes)], dim=1)
    first = parts[0]
    joint = torch.empty((first.shape[0], sum(x.shape[1] for x in parts), *first.shape[2:]),
                        device=first.device, dtype=first.dtype)
    start = 0
    for norm, x, rope in zip(norms, parts, ropes):
        _qk_norm_rope(norm, x, rope, fused, out=joint[:, start:start + x.shape[1]])
        start += x.shape[1]
    return joint


def _joint_rows(parts) -> torch.Tensor:
    """torch.cat(parts, dim=1) of [B, L_i, H, D] tensors. Views of a fused projection's output
    (rows 3 * H * D apart) are copied into their rows of one tensor instead: PyTorch's
    concatenation of non-contiguous inputs takes its generic kernel, 88 us for Flux's joint value
    at 1024 on an H200, against 15 for the vectorised one on contiguous inputs."""
    if all(p.is_contiguous() for p in parts):
        return torch.cat(parts, dim=1)
    first = parts[0]
    joint = torch.empty((first.shape[0], sum(p.shape[1] for p in parts), *first.shape[2:]),
                        device=first.device, dtype=first.dtype)
    start = 0
    for p in parts:
        joint[:, start:start + p.shape[1]].copy_(p)
        start += p.shape[1]
    return joint


def _projected(x: torch.Tensor, fused, projections, head_dim: int) -> tuple[torch.Tensor, ...]:
    """One stream's query, key and value, each [B, L, H, D]: views of the fused projection's output
    (one GEMM, [B, L, 3 * H * D] in q | k | v order) where fuse_projections made one, else the three."""
    if fused is not None:
        return fused(x).unflatten(-1, (3, -1, head_dim)).unbind(-3)
    return tuple(proj(x).unflatten(-1, (-1, head_dim)) for proj in projections)


class FluxAttnProcessor:
    """diffusers' FluxAttnProcessor (joint attention of text and image tokens, QK RMSNorm, rotary),
    with the attention call routed through the registry and, on CUDA, QK-norm and rotary fused in
    one kernel."""

    def __init__(self, registry: AttentionRegistry, fused: bool):
        self.registry = registry
        self.fused = fused

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("FluxAttnProcessor: attention masks are not supported")
        d = attn.head_dim
        query, key, value = _projected(hidden_states, getattr(attn, "to_qkv", None), (attn.to_q, attn.to_k, attn.to_v), d)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            eq, ek, ev = _projected(encoder_hidden_states, getattr(attn, "to_added_qkv", None),
                                    (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), d)
            # Text tokens come first in the joint sequence and the rotary table covers both: each
            # stream is normalised with its own weights and rotated by its rows of the table.
            text = eq.shape[1]
            rope_t = rope_i = None
            if image_rotary_emb is not None:
                cos, sin = image_rotary_emb
                rope_t, rope_i = (cos[:text], sin[:text]), (cos[text:], sin[text:])
            query = _joint_qk_norm_rope((attn.norm_added_q, attn.norm_q), (eq, query), (rope_t, rope_i), self.fused)
            key = _joint_qk_norm_rope((attn.norm_added_k, attn.norm_k), (ek, key), (rope_t, rope_i), self.fused)
            value = _joint_rows((ev, value))
        else:
            query = _qk_norm_rope(attn.norm_q, query, image_rotary_emb, self.fused)
            key = _qk_norm_rope(attn.norm_k, key, image_rotary_emb, self.fused)
        if token_kv.active():  # a chunk-cache stream frame: record, or extend with the static tokens' K/V
            key, value = token_kv.apply(attn, key, value, text if joint else None)
        out = self.registry(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))  # [B, H, L, D]
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if joint:
            text = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states[:, :text], hidden_states[:, text:]
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def fuse_projections(backbone: torch.nn.Module) -> int:
    """Self-attention's q, k and v projections as one matmul, cross-attention's k and v as one, and
    a Flux joint attention's text-stream q, k and v as one more (diffusers' fuse_projections builds
    the fused layers): fewer, larger GEMMs, and under FP8 one quantisation of the input instead of
    three. The separate layers are dropped, so the weights are not held twice. UNet attention
    (diffusers' Attention) and Flux's (FluxAttention), with plain Linear projections, sharded or
    not (each rank fuses its own heads' columns); returns how many modules were fused."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention

    count = 0
    for m in backbone.modules():
        if type(m) not in (Attention, FluxAttention) or getattr(m, "fused_projections", False):
            continue
        if getattr(m, "to_qkv", None) is not None or getattr(m, "to_kv", None) is not None:
            continue
        added = ("add_q_proj", "add_k_proj", "add_v_proj") if getattr(m, "add_q_proj", None) is not None else ()
        if not all(type(getattr(m, name, None)) is torch.nn.Linear for name in ("to_q", "to_k", "to_v", *added)):
            continue
        m.fuse_projections()
        m.fused_projections = True
        m.to_k = m.to_v = None
        if not getattr(m, "is_cross_attention", False):
            m.to_q = None
        if added:
            m.add_q_proj = m.add_k_proj = m.add_v_proj = None
        count += 1
    return count


@contextlib.contextmanager
def held_across_forwards(backbone: torch.nn.Module):
    """Within: the backbone's shared K/V projection (when it has one) keeps its keys and values
    from one forward to the next while the text states are the same tensor, as they are through
    one batch's denoising loop. A captured loop of N steps then projects them once instead of N
    times (SDXL: one 181 us matmul per step at batch 1, H200). Forgotten on exit. The loop must run as one
    unit (one graph, or eagerly): a result held by one captured graph and read by another would
    be frozen into the second."""
    shared = getattr(backbone, "rtdiff_cross_kv", None)
    if shared is None:
        yield
        return
    shared.forget()
    shared.held = True
    try:
        yield
    finally:
        shared.held = False
        shared.forget()


class KVSlot:
    """One cross-attention's columns of its UNet's shared K/V projection: (key, value), each
    [B, tokens, width]."""

    def __init__(self, shared: SharedProjection, offset: int, width: int):
        self.slot = Slot(shared, offset, 2 * width)
        self.width = width

    def of(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.slot.of(context)
        return kv[..., :self.width], kv[..., self.width:]


def batch_cross_kv(backbone: torch.nn.Module) -> int:
    """After fuse_projections: the fused key/value linears of every cross-attention that reads
    the text states as given (no norm_cross) become one linear (a SharedProjection), their weights
    moved into it (not held twice). They all project the same text states, so one
    [tokens, 2048] x [2048, all widths] matmul replaces 70 small ones (SDXL at batch 1: 7.1 us each
    in bf16 at 113 TFLOP/s, 0.5 ms a step, whatever the image size; under FP8 also 60
    quantisations of the same states). Returns how many modules it serves; fewer than two: left
    as they are."""
    from diffusers.models.attention_processor import Attention

    mods = [m for m in backbone.modules()
            if type(m) is Attention and m.is_cross_attention and not m.norm_cross
            and type(getattr(m, "to_kv", None)) is torch.nn.Linear]
    if len(mods) < 2 or len({m.to_kv.in_features for m in mods}) != 1:
        return 0
    shared = SharedProjection(stacked([m.to_kv for m in mods]))
    offset = 0
    for m in mods:  # each module reads its rows; its own linear is dropped
        rows = m.to_kv.out_features
        m.kv_slot = KVSlot(shared, offset, rows // 2)
        m.to_kv = None
        offset += rows
    backbone.rtdiff_cross_kv = shared
    shared.install(backbone)
    return len(mods)


def install(backbone: torch.nn.Module, registry: AttentionRegistry, fused: bool) -> int:
    """Sets our processors on the backbone's attention modules; returns how many."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention

    count = 0
    for module in backbone.modules():
        if isinstance(module, FluxAttention):
            module.set_processor(FluxAttnProcessor(registry, fused))
            count += 1
        elif isinstance(module, Attention):
            module.set_processor(UNetAttnProcessor(registry))
            count += 1
    return count
