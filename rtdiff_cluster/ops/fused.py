"""Puts our fused kernels (kernels/, import name `rtdiff_kernels`) into diffusers' modules of a
loaded backbone, sharded or not, by replacing those modules' `forward` with one that computes
the same thing through the kernel:

    ResnetBlock2D (UNet, VAE) GroupNorm -> SiLU, twice per block, as one kernel each; conv1's
                              bias and the time-embedding add folded into the second; conv2's
                              and the shortcut's biases folded into the residual add
    GroupNorm elsewhere       (in front of UNet transformers, the output head) the same kernel
    BasicTransformerBlock     residual add -> LayerNorm before the cross-attention and before
      (UNet)                  the feed-forward, as one kernel each; inside a Transformer2DModel
                              also the feed-forward's add with the next block's norm1
    Transformer2DModel (UNet) proj_out's tokens go back to the residual's channels-last layout
                              as a view; diffusers makes them NCHW-contiguous, which cost a copy,
                              a strided add and a conversion back in front of the next convolution
    GEGLU (UNet feed-forward) proj -> chunk -> x * gelu(gate), the gating as one kernel
    FeedForward with a GEGLU  where its linears are FP8 (quant/fp8.py), their inputs come from
                              the kernel before them already quantised: norm3's add+LayerNorm
                              and the GEGLU write float8 and per-token scales, in place of a
                              bf16 tensor that quantize_per_token would read back; so does
                              norm1's add+LayerNorm for the self-attention's fused FP8 q/k/v
    GELU tanh (Flux ff)       proj -> tanh-GELU with the GELU in the GEMM's epilogue
    AdaLayerNormZero[Single], AdaLayerNormContinuous (Flux)
                              LayerNorm -> * (1 + scale) + shift as one kernel
    FluxTransformerBlock, FluxSingleTransformerBlock
                              the gated residual adds (with norm2's modulation in a double
                              block) as one kernel each, and a single block's concatenations
                              gone (ops/flux_blocks.py)
    Upsample2D (UNet, KL VAE), nn.Upsample (tiny VAE decoder)
                              nearest x2 as our copy kernel (PyTorch's channels-last one is slow);
                              Upsample2D's convolution bias as our vectorised pass
    Downsample2D (UNet, KL VAE encoder)
                              its strided convolution's bias as the same pass
    AutoencoderTinyBlock      conv -> bias -> ReLU (twice), conv -> bias -> + skip -> ReLU, each
      (tiny VAE)              as one cuDNN fused call (torch.cudnn_convolution_[add_]relu)

diffusers' modules stay the readable reference: tests/test_fast_paths.py (CPU) and
tests/test_gpu_fast_paths.py hold the patched modules to their unpatched outputs. A module whose
configuration the kernel does not cover (another norm type, an up/down-sampling variant the
forward below does not know) keeps diffusers' forward.
"""

from __future__ import annotations

import types
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from rtdiff_cluster.ops import flux_blocks


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward for time_embedding_norm="default" (or any norm type but
    scale_shift, without a time embedding) with SiLU, each GroupNorm -> SiLU pair fused."""
    from rtdiff_kernels.add_bias import add_bias, add_bias_reference
    from rtdiff_kernels.group_norm_silu import group_norm_silu

    n1, n2 = self.norm1, self.norm2
    hidden = group_norm_silu(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps)
    if self.upsample is not None:
        input_tensor, hidden = self.upsample(input_tensor), self.upsample(hidden)
    elif self.downsample is not None:
        input_tensor, hidden = self.downsample(input_tensor), self.downsample(hidden)
    # conv1's bias and the time embedding are per-(sample, channel) offsets of conv1's output:
    # norm2's kernel adds them ([N, C] or [1, C]) as it reads it. Eagerly each is a broadcast pass
    # over the activation (channels-last convolutions add their bias in a separate kernel).
    hidden, bias1 = _conv_without_bias(self.conv1, hidden)
    offset = bias1[None] if bias1 is not None else None
    slot = getattr(self, "temb_slot", None)
    if slot is not None:  # batch_time_embeddings: this block's columns of one matmul, bias1 folded in
        offset = slot.of(temb)  # [N, C], a strided view of [N, all widths]
    elif self.time_emb_proj is not None:
        temb = self.time_emb_proj(temb if self.skip_time_act else F.silu(temb))  # [N, C]
        offset = temb if offset is None else temb + offset
    elif temb is not None and self.time_embedding_norm == "default":
        hidden = hidden + temb
    hidden = self.dropout(group_norm_silu(hidden, n2.num_groups, n2.weight, n2.bias, n2.eps, channel_offset=offset))
    # conv2's and the 1x1 shortcut's biases go into the residual add's one pass.
    hidden, bias2 = _conv_without_bias(self.conv2, hidden)
    shortcut_bias = None
    if self.conv_shortcut is not None:
        input_tensor, shortcut_bias = _conv_without_bias(self.conv_shortcut, input_tensor)
    if input_tensor.shape == hidden.shape and input_tensor.dtype == hidden.dtype:
        out = add_bias(input_tensor, hidden, bias2, shortcut_bias)
    else:  # PyTorch's promotion and broadcasting rules, as diffusers' forward would apply them
        out = add_bias_reference(input_tensor, hidden, bias2, shortcut_bias)
    # A division by 1 is still a pass over the tensor (and a launch): SDXL's factor is 1.
    return out / self.output_scale_factor if self.output_scale_factor != 1 else out


def batch_time_embeddings(backbone: nn.Module) -> int:
    """After install_fused, on an unsharded backbone: the time-embedding projections of every
    resnet that runs _resnet_forward become one SiLU -> linear over the time embedding they all
    read (a SharedProjection), their weights moved into it. Each resnet's conv1 bias, which
    _resnet_forward adds to that projection anyway (both are per-channel offsets of norm2's input),
    goes into the stacked bias. SDXL at batch 1: 17 matmuls of one row (5 us each on an H200),
    17 SiLUs and 17 bias adds become one SiLU and one matmul over 35 MB of weights. Returns how
    many resnets it serves; fewer than two: left as they are."""
    from rtdiff_cluster.ops.shared_projection import SharedProjection, Slot, plain_linear, stacked

    mods = [m for m in backbone.modules()
            if getattr(m.forward, "__func__", None) is _resnet_forward and getattr(m, "temb_slot", None) is None
            and plain_linear(getattr(m, "time_emb_proj", None)) and not m.skip_time_act]
    if len(mods) < 2 or len({(m.time_emb_proj.in_features, m.time_emb_proj.weight.dtype) for m in mods}) != 1:
        return 0
    # Exactly the biases _conv_without_bias hands back as bias1, which _resnet_forward then leaves out.
    conv1_bias = [m.conv1.bias if _bias_handed_back(m.conv1) else None for m in mods]
    shared = SharedProjection(nn.Sequential(nn.SiLU(), stacked([m.time_emb_proj for m in mods], conv1_bias)))
    offset = 0
    for m in mods:
        width = m.time_emb_proj.out_features
        m.temb_slot = Slot(shared, offset, width)
        m.time_emb_proj = None
        offset += width
    backbone.rtdiff_time_embeddings = shared
    shared.install(backbone)
    return len(mods)


def _bias_handed_back(conv) -> bool:
    """Whether _conv_without_bias hands conv's bias back rather than adding it: a plain zero-padded
    nn.Conv2d (the bias may be None)."""
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros"


def _conv_without_bias(conv, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(conv(x) without its bias, the bias) for a plain zero-padded nn.Conv2d; (conv(x), None) for
    anything else (a row-parallel, LoRA-wrapped or quantised convolution adds its own)."""
    if _bias_handed_back(conv):
        return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups), conv.bias
    return conv(x), None


def _conv_with_bias_pass(conv, x: torch.Tensor) -> torch.Tensor:
    """conv(x), its bias added by add_bias's vectorised pass (a channels-last convolution's own
    bias add is PyTorch's strided broadcast kernel)."""
    from rtdiff_kernels.add_bias import add_bias

    out, bias = _conv_without_bias(conv, x)
    return add_bias(out, None, bias) if bias is not None else out


def _resnet_fusable(block) -> bool:
    # Without a time embedding, diffusers' forward treats every norm type but scale_shift as
    # "default" (the KL VAE decoder's up blocks are built with "group").
    plain_norm = block.time_embedding_norm == "default" or (
        block.time_emb_proj is None and block.time_embedding_norm != "scale_shift")
    return (plain_norm and isinstance(block.nonlinearity, nn.SiLU)
            and isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm))


def _block_chain(block, h, pending, encoder_hidden_states, attention_mask=None, encoder_attention_mask=None):
    """diffusers' BasicTransformerBlock (norm_type="layer_norm": self-attention, cross-attention,
    feed-forward, each pre-normed with a residual add) with each residual add fused into the norm
    that follows it. Returns (h, ff): the block's output is ff + h, an add left to the next block's
    norm1 (or to the caller). pending: the previous block's ff, or None."""
    from rtdiff_kernels.add_layer_norm import add_layer_norm, add_layer_norm_fp8

    n1, a1 = block.norm1, block.attn1
    if pending is None:
        attn = a1(n1(h), attention_mask=attention_mask)  # [B, L, C]
    elif attention_mask is None and FP8_QKV_FROM_NORM and _attention_takes_fp8_input(a1, h):
        # norm1's add+LayerNorm hands the fused q/k/v projection its output quantised, as norm3 does the ff's.
        h, q, scale = add_layer_norm_fp8(pending, h, n1.weight, n1.bias, n1.eps)
        qkv = a1.to_qkv.forward_fp8(q, scale, h.dtype).view(*h.shape[:-1], a1.to_qkv.out_features)
        attn = a1.processor.attend(a1, *qkv.chunk(3, dim=-1))
    else:
        h, normed = add_layer_norm(pending, h, n1.weight, n1.bias, n1.eps)
        attn = a1(normed, attention_mask=attention_mask)
    h, normed = add_layer_norm(attn, h, block.norm2.weight, block.norm2.bias, block.norm2.eps)
    attn = block.attn2(normed, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask)
    ff, n3 = block.ff, block.norm3
    if _takes_fp8_input(ff, h):
        h, q, scale = add_layer_norm_fp8(attn, h, n3.weight, n3.bias, n3.eps)
        proj = ff.net[0].proj
        return h, _geglu_feed_forward(ff, proj.forward_fp8(q, scale, h.dtype).view(*h.shape[:-1], proj.out_features))
    h, normed = add_layer_norm(attn, h, n3.weight, n3.bias, n3.eps)
    return h, ff(normed)


def _transformer_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                               encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                               class_labels=None, added_cond_kwargs=None):
    """diffusers' BasicTransformerBlock.forward through _block_chain. Calls with
    cross_attention_kwargs (GLIGEN, LoRA scales) take diffusers' forward."""
    if cross_attention_kwargs or hidden_states.dim() != 3:
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    h, ff = _block_chain(self, hidden_states, None, encoder_hidden_states, attention_mask, encoder_attention_mask)
    return ff + h


def _transformer2d_forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
                           class_labels=None, cross_attention_kwargs=None, attention_mask=None,
                           encoder_attention_mask=None, return_dict=True):
    """diffusers' Transformer2DModel.forward for continuous inputs whose blocks all fuse: each
    block's last residual add goes into the next block's norm1 (_block_chain). Masks, extra
    attention kwargs and gradient checkpointing take diffusers' forward."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    if (cross_attention_kwargs or attention_mask is not None or encoder_attention_mask is not None
            or (torch.is_grad_enabled() and self.gradient_checkpointing)):
        return type(self).forward(self, hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, class_labels,
                                  cross_attention_kwargs, attention_mask, encoder_attention_mask, return_dict)
    batch, _, height, width = hidden_states.shape
    residual = hidden_states
    h, inner_dim = self._operate_on_continuous_inputs(hidden_states)  # [B, H*W, C]
    ff = None
    for block in self.transformer_blocks:
        h, ff = _block_chain(block, h, ff, encoder_hidden_states)
    out = self._get_output_for_continuous_inputs(ff + h, residual, batch, height, width, inner_dim)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _transformer_block_fusable(block) -> bool:
    return (block.norm_type == "layer_norm" and block.pos_embed is None and not block.only_cross_attention
            and block.attn2 is not None and block._chunk_size is None
            and all(_plain_layer_norm(n) for n in (block.norm1, block.norm2, block.norm3)))


def _transformer2d_output(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """diffusers' Transformer2DModel._get_output_for_continuous_inputs (linear projections):
    proj_out's [B, H*W, C] tokens viewed as [B, C, H, W] with channels-last strides, which is
    the residual's layout on our fast paths, so the add needs no copy and its result stays
    channels-last for the convolutions that follow."""
    if not (self.use_linear_projection and residual.is_contiguous(memory_format=torch.channels_last)):
        return type(self)._get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width,
                                                           inner_dim)
    out = self.proj_out(hidden_states).view(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return out + residual


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    from rtdiff_kernels.activations import geglu

    return geglu(self.proj(hidden_states))


def _dropout_active(ff) -> bool:
    return ff.training and any(m.p for m in ff.net if isinstance(m, nn.Dropout))


def _feed_forward_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' FeedForward with a GEGLU (proj, gating, dropout, out projection[, dropout]); the
    dropouts are identities at inference. Training with dropout takes diffusers' forward."""
    if _dropout_active(self):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    from rtdiff_kernels.linear import geglu_config, linear_geglu

    proj = self.net[0].proj
    if type(proj) is nn.Linear and (config := geglu_config(hidden_states, proj.weight)) is not None:
        # The projection's [..., 2N] output never goes through memory (kernels/linear.py).
        return self.net[2](linear_geglu(hidden_states, proj.weight, proj.bias, config))
    return _geglu_feed_forward(self, proj(hidden_states))


def _geglu_feed_forward(ff, h: torch.Tensor) -> torch.Tensor:
    """The rest of a GEGLU FeedForward from its projection h [..., 2N]: the gating, then the out
    projection, which takes the gating's output in float8 when it is an Fp8Linear."""
    from rtdiff_cluster.quant.fp8 import Fp8Linear
    from rtdiff_kernels._launch import triton_runs
    from rtdiff_kernels.activations import geglu, geglu_fp8

    out = ff.net[2]
    if isinstance(out, Fp8Linear) and triton_runs(h):
        q, scale = geglu_fp8(h)
        return out.forward_fp8(q, scale, h.dtype).view(*h.shape[:-1], out.out_features)
    return out(geglu(h))


# The fused q/k/v projection takes norm1's quantised output (_block_chain); False: it quantises
# norm1's bf16 output itself, as before (an A/B knob for benchmarks/unet_profile.py --knob).
FP8_QKV_FROM_NORM = True


def _attention_takes_fp8_input(attn, h: torch.Tensor) -> bool:
    """Whether a self-attention runs our processor with q/k/v fused into one FP8 linear and
    nothing between the norm and that linear (no spatial or group norm), so norm1 can hand its
    output over quantised."""
    from rtdiff_cluster.ops.processors import UNetAttnProcessor
    from rtdiff_cluster.quant.fp8 import Fp8Linear
    from rtdiff_kernels._launch import triton_runs

    return (isinstance(attn.processor, UNetAttnProcessor) and isinstance(getattr(attn, "to_qkv", None), Fp8Linear)
            and attn.spatial_norm is None and attn.group_norm is None and not attn.residual_connection
            and attn.rescale_output_factor == 1 and triton_runs(h))


def _takes_fp8_input(ff, h: torch.Tensor) -> bool:
    """Whether ff (a FeedForward) runs our forward with an FP8 input projection, so the norm in
    front of it can hand over its output quantised."""
    from rtdiff_cluster.quant.fp8 import Fp8Linear
    from rtdiff_kernels._launch import triton_runs

    return (getattr(ff.forward, "__func__", None) is _feed_forward_forward and isinstance(ff.net[0].proj, Fp8Linear)
            and not _dropout_active(ff) and triton_runs(h))


def _geglu_feed_forward_fusable(ff) -> bool:
    from diffusers.models.activations import GEGLU

    net = list(ff.net)
    return (len(net) in (3, 4) and type(net[0]) is GEGLU and all(type(m) is nn.Dropout for m in net[1::2])
            and hasattr(net[2], "out_features"))


def geglu_projections_fusable(backbone: nn.Module, device: torch.device) -> int:
    """How many patched GEGLU feed-forwards can compute their projection and gating in one
    Triton GEMM (kernels/linear.py geglu_config; which calls do depends on their size): half-
    precision nn.Linear projections on a Hopper or newer GPU, with the fused GEMM switched on."""
    import rtdiff_kernels.linear as linear_mod

    if not linear_mod._FUSED_GEGLU or device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return 0
    return sum(1 for m in backbone.modules()
               if getattr(getattr(m, "forward", None), "__func__", None) is _feed_forward_forward
               and type(m.net[0].proj) is nn.Linear and m.net[0].proj.weight.dtype in (torch.float16, torch.bfloat16))


def geglu_feed_forward_outputs(backbone: nn.Module) -> set[int]:
    """ids of the out projections of the GEGLU feed-forwards install_fused patches: FP8 linears
    there take their input from geglu_fp8."""
    from diffusers.models.attention import FeedForward

    return {id(m.net[2]) for m in backbone.modules() if type(m) is FeedForward and _geglu_feed_forward_fusable(m)}


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


def _upsample_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Upsample, nearest, by an integer factor (the tiny VAE decoder's)."""
    from rtdiff_kernels.upsample_nearest import upsample_nearest

    return upsample_nearest(x, int(self.scale_factor))


def _upsample_fusable(m: nn.Upsample) -> bool:
    sf = m.scale_factor
    return (m.mode == "nearest" and m.size is None and isinstance(sf, (int, float)) and float(sf).is_integer()
            and sf >= 1 and not m.recompute_scale_factor)


def _upsample2d_forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
    """diffusers' Upsample2D (nearest x2, then its convolution) with the upsampling as our kernel
    and the convolution's bias added by our vectorised pass (add_bias with no second tensor)."""
    from rtdiff_kernels.upsample_nearest import upsample_nearest

    h, w = hidden_states.shape[-2:]
    if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
        hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
    else:
        hidden_states = upsample_nearest(hidden_states, 2)
    return _conv_with_bias_pass(self.conv, hidden_states)


def _downsample2d_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' Downsample2D with a strided convolution (the VAE encoder's and the UNet's), its
    bias added by our vectorised pass."""
    if self.padding == 0:  # diffusers pads right and bottom only
        hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)
    return _conv_with_bias_pass(self.conv, hidden_states)


def _downsample2d_fusable(m) -> bool:
    return m.norm is None and m.use_conv and isinstance(m.conv, nn.Conv2d)


def _upsample2d_fusable(m) -> bool:
    return (m.norm is None and not m.use_conv_transpose and m.interpolate and m.use_conv and m.name == "conv"
            and isinstance(m.conv, nn.Conv2d))


def _cudnn_conv_args(conv: nn.Conv2d) -> tuple:
    return conv.stride, conv.padding, conv.dilation, conv.groups


def _tiny_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """diffusers' AutoencoderTinyBlock, relu(conv3(relu(conv2(relu(conv1(x))))) + skip(x)), with
    each convolution's bias, ReLU and (for the last) the skip add in cuDNN's fused
    convolution-bias-add-activation call. Eagerly a channels-last convolution adds its bias in a
    separate broadcast pass (PyTorch's slow strided elementwise kernel) and each ReLU and the add
    are passes of their own: seven passes over the activation per block, here none."""
    c1, _, c2, _, c3 = self.conv
    skip = self.skip(x)
    if not x.is_cuda:  # cuDNN's fused calls exist on CUDA only
        return self.fuse(self.conv(x) + skip)
    h = torch.cudnn_convolution_relu(x, c1.weight, c1.bias, *_cudnn_conv_args(c1))
    h = torch.cudnn_convolution_relu(h, c2.weight, c2.bias, *_cudnn_conv_args(c2))
    return torch.cudnn_convolution_add_relu(h, c3.weight, skip, 1.0, c3.bias, *_cudnn_conv_args(c3))


def _plain_conv(m) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
            and m.weight.dim() == 4)


def _tiny_block_fusable(block) -> bool:
    parts = list(block.conv)
    return (len(parts) == 5 and all(_plain_conv(parts[i]) for i in (0, 2, 4))
            and all(type(parts[i]) is nn.ReLU for i in (1, 3)) and type(block.fuse) is nn.ReLU
            and (type(block.skip) is nn.Identity or _plain_conv(block.skip)))


def _plain_layer_norm(norm) -> bool:
    return type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1


def install_fused(backbone: nn.Module) -> dict[str, int]:
    """Patches every module the kernels cover; returns how many of each kind."""
    from diffusers.models.activations import GEGLU, GELU
    from diffusers.models.attention import BasicTransformerBlock, FeedForward
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    done: Counter[str] = Counter()
    in_resnets = {id(m) for r in backbone.modules() if isinstance(r, ResnetBlock2D) and _resnet_fusable(r)
                  for m in (r.norm1, r.norm2)}

    def patch(module, forward, kind):
        module.forward = types.MethodType(forward, module)
        done[kind] += 1

    for module in backbone.modules():
        if isinstance(module, ResnetBlock2D) and _resnet_fusable(module):
            patch(module, _resnet_forward, "resnet group_norm+silu")
        elif isinstance(module, BasicTransformerBlock) and _transformer_block_fusable(module):
            patch(module, _transformer_block_forward, "transformer block add+layer_norm")
        elif type(module) is Transformer2DModel and module.is_input_continuous:
            module._get_output_for_continuous_inputs = types.MethodType(_transformer2d_output, module)
            done["transformer2d channels-last output"] += 1
            if len(module.transformer_blocks) and all(isinstance(b, BasicTransformerBlock) and _transformer_block_fusable(b)
                                                      for b in module.transformer_blocks):
                patch(module, _transformer2d_forward, "transformer2d chained blocks")
        elif type(module) is nn.GroupNorm and id(module) not in in_resnets:
            patch(module, _group_norm_forward, "group_norm")
        elif type(module) is FeedForward and _geglu_feed_forward_fusable(module):
            patch(module, _feed_forward_forward, "feed-forward geglu")
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
        elif type(module) is AutoencoderTinyBlock and _tiny_block_fusable(module):
            patch(module, _tiny_block_forward, "tiny vae block conv+bias+relu")
        elif type(module) is nn.Upsample and _upsample_fusable(module):
            patch(module, _upsample_forward, "upsample nearest")
        elif type(module) is Upsample2D and _upsample2d_fusable(module):
            patch(module, _upsample2d_forward, "upsample2d nearest")
        elif type(module) is Downsample2D and _downsample2d_fusable(module):
            patch(module, _downsample2d_forward, "downsample2d conv bias")
    done.update(flux_blocks.install(backbone))
    return dict(done)
