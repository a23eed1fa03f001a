"""GroupNorm(+SiLU), adaLN LayerNorm-modulate, gated residual (+ LayerNorm-modulate) and add+LayerNorm
kernels against their PyTorch references.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
at small, awkward sizes; with CUDA the same small cases run on the GPU and the full SDXL / Flux
shapes are added.

Tolerance policy (`assert_close_to_reference`):
  * float32: max abs error <= 1e-5 * max(1, max|ref|). Both sides compute in fp32; the only
    difference is summation order, a few ulps of the O(1) normalised values.
  * float16 / bfloat16: the reference is computed in float32 from the same low-precision inputs
    upcast. PyTorch's own error is measured in the test by running the same reference natively in
    the low dtype; ours may be at most 2x that, plus one ulp of the dtype at the output's largest
    magnitude so that a case where PyTorch happens to be exact does not demand exactness from a
    kernel that rounds differently. The kernels keep everything in fp32 and round once at the
    store, so in practice they sit well below PyTorch's error (which rounds after the norm and
    again after the SiLU / modulation).
"""

from __future__ import annotations

import math

import pytest
import torch

import rtdiff_kernels.group_norm_silu as gn_mod
from rtdiff_kernels.ada_layer_norm import (gated_residual, gated_residual_layer_norm_modulate,
                                           gated_residual_layer_norm_modulate_reference, gated_residual_reference,
                                           layer_norm_modulate, layer_norm_modulate_reference)
from rtdiff_kernels.add_layer_norm import add_layer_norm, add_layer_norm_reference
from rtdiff_kernels.group_norm_silu import group_norm_silu, group_norm_silu_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # on CPU the wrappers run the kernels in Triton's interpreter
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cuda = pytest.mark.skipif(not CUDA, reason="full-size kernel checks need a CUDA GPU")


def _ulp(dtype: torch.dtype, magnitude: float) -> float:
    if magnitude <= 0:
        return torch.finfo(dtype).tiny
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def assert_close_to_reference(ours: torch.Tensor, ref32: torch.Tensor, native: torch.Tensor | None,
                              dtype: torch.dtype) -> None:
    """ours: kernel output in `dtype`; ref32: reference in fp32 from the upcast inputs; native: the
    same reference run in `dtype` (None for fp32). See the module docstring for the policy."""
    assert ours.dtype == dtype and ours.shape == ref32.shape
    assert torch.isfinite(ours).all()
    err = (ours.float() - ref32).abs().max().item()
    amax = ref32.abs().max().item()
    if dtype == torch.float32:
        tol = 1e-5 * max(1.0, amax)
    else:
        torch_err = (native.float() - ref32).abs().max().item()
        tol = 2.0 * torch_err + _ulp(dtype, amax)
    assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g} ({dtype}, max|ref| {amax:.3g})"


# ---------------------------------------------------------------------------- GroupNorm (+SiLU)

def _gn_inputs(shape, dtype, channels_last, affine, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A non-zero mean and non-unit spread so centring and scaling both matter.
    x = (torch.randn(shape, generator=g) * 3 + 2).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.randn(c, generator=g).to(dtype) if affine else None
    b = torch.randn(c, generator=g).to(dtype) if affine else None
    to = (lambda t: None if t is None else t.to(device))
    return to(x), to(w), to(b)


def _offset(shape, rows, dtype, device=DEVICE, seed=5):
    """A [rows, C] per-(sample, channel) offset (a resnet's time embedding), large enough to move
    the group statistics; None for rows=0."""
    if not rows:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, shape[1], generator=g) * 4).to(dtype).to(device)


def _check_group_norm(shape, groups, dtype, channels_last, affine, silu, eps=1e-5, offset_rows=0):
    x, w, b = _gn_inputs(shape, dtype, channels_last, affine)
    t = _offset(shape, offset_rows, dtype)
    ours = group_norm_silu(x, groups, w, b, eps, silu, channel_offset=t)
    up = (lambda t: None if t is None else t.float())
    ref32 = group_norm_silu_reference(up(x), groups, up(w), up(b), eps, silu, up(t))
    native = None if dtype == torch.float32 else group_norm_silu_reference(x, groups, w, b, eps, silu, t)
    assert_close_to_reference(ours, ref32, native, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert ours.is_contiguous(memory_format=fmt), f"output strides {ours.stride()} lost x's memory format"


GN_SMALL = [  # (shape, groups, affine, silu)
    ((2, 12, 5, 7), 3, True, True),
    ((2, 10, 5, 7), 5, False, True),
    ((2, 12, 5, 7), 3, True, False),
    ((1, 6, 3, 1), 6, True, True),  # one channel per group (instance norm), a width-1 image
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups,affine,silu", GN_SMALL)
def test_group_norm_small(shape, groups, affine, silu, channels_last, dtype):
    _check_group_norm(shape, groups, dtype, channels_last, affine, silu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("rows", [2, 1], ids=["per_sample", "shared"])
def test_group_norm_with_channel_offset(rows, channels_last, dtype):
    """silu(group_norm(x + t[:, :, None, None])): the resnet's time-embedding add folded into norm2,
    with t per sample or one row for all."""
    _check_group_norm((2, 12, 5, 7), 3, dtype, channels_last, True, True, offset_rows=rows)


def test_group_norm_offset_on_split_paths(monkeypatch):
    """The offset moves channel means before the merges across chunks and across slices of a group."""
    monkeypatch.setattr(gn_mod, "_TILE_ELEMS", 16)
    monkeypatch.setattr(gn_mod, "_MAX_BLOCK_C_NCHW", 5)
    monkeypatch.setattr(gn_mod, "_MAX_BLOCK_C_CL", 5)
    for channels_last in (False, True):
        _check_group_norm((2, 13, 5, 7), 1, torch.float32, channels_last, True, False, offset_rows=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_3d(dtype):
    _check_group_norm((2, 12, 35), 4, dtype, False, True, True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("knobs,shape,groups", [
    # Tiny tiles: several tiles per chunk and several chunks, the last one short (35 = 4*8 + 3).
    ({"_TILE_ELEMS": 64}, (2, 12, 5, 7), 3),
    # Capped block width: one 13-channel group cut into slices of 5, 5 and 3 channels.
    ({"_TILE_ELEMS": 16, "_MAX_BLOCK_C_NCHW": 5, "_MAX_BLOCK_C_CL": 5}, (2, 13, 5, 7), 1),
    # Capped groups per block: 12 groups of 1 channel in blocks of 4, with chunks.
    ({"_TILE_ELEMS": 32, "_MAX_GROUPS_PER_BLOCK": 4}, (2, 12, 5, 7), 12),
    # 8-channel-aligned blocks (the vectorised channels_last path): 6 groups of 8 in one block ...
    ({"_TILE_ELEMS": 128}, (2, 48, 3, 5), 6),
    # ... and 2 groups of 16 cut into aligned 8-channel slices.
    ({"_TILE_ELEMS": 32, "_MAX_BLOCK_C_NCHW": 8, "_MAX_BLOCK_C_CL": 8}, (2, 32, 3, 5), 2),
    # Large problems' path: the partials merged once per group by _gn_merge_kernel, with chunks ...
    ({"_LARGE_ELEMS": 1, "_LARGE_TILE_ELEMS": 32, "_MAX_PARTIALS": 4}, (2, 12, 5, 7), 3),
    # ... and with slices of a group as well.
    ({"_LARGE_ELEMS": 1, "_LARGE_TILE_ELEMS": 16, "_MAX_BLOCK_C_NCHW": 5, "_MAX_BLOCK_C_CL": 5, "_MAX_PARTIALS": 2},
     (2, 13, 5, 7), 1),
])
def test_group_norm_split_paths(monkeypatch, knobs, shape, groups, channels_last):
    """The partial-statistics merges (across tiles, chunks and slices of a group, in the apply
    programs or in the large problems' merge kernel) at sizes the interpreter can run: the knobs
    shrink the blocks that SDXL-sized tensors would use."""
    for name, value in knobs.items():
        monkeypatch.setattr(gn_mod, name, value)
    gn_mod._plan.cache_clear()
    n, c = shape[:2]
    hw = shape[2] * (shape[3] if len(shape) > 3 else 1)
    plan = gn_mod._plan(n, c, hw, groups, channels_last, 4, gn_mod._knobs())
    assert plan[5] == ("_LARGE_ELEMS" in knobs), "the case meant for one merge path took the other"
    for dtype in (torch.float32, torch.bfloat16):
        _check_group_norm(shape, groups, dtype, channels_last, True, True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_large_mean_is_stable(monkeypatch, channels_last):
    """mean 1000, std 1: E[x^2] - E[x]^2 in fp32 loses the variance to cancellation (~10% error);
    the centred merges must stay near the float64 answer."""
    monkeypatch.setattr(gn_mod, "_TILE_ELEMS", 32)  # force several tile/chunk merges
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 9, 11, generator=g) + 1000
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ours = group_norm_silu(x.to(DEVICE), 2, None, None, 1e-6, silu=False).cpu().double()
    ref = group_norm_silu_reference(x.double(), 2, None, None, 1e-6, silu=False)
    # Inherent error: x itself is fp32 (ulp 6e-5 at 1000), so the centred values carry ~1e-4.
    assert (ours - ref).abs().max().item() < 1e-3


def test_group_norm_mixed_weight_dtype():
    """fp32 GroupNorm parameters with bf16 activations: weights are read in their own dtype."""
    x, _, _ = _gn_inputs((2, 12, 5, 7), torch.bfloat16, True, False)
    w = torch.randn(12).to(DEVICE)
    b = torch.randn(12).to(DEVICE)
    ours = group_norm_silu(x, 3, w, b, 1e-5)
    ref32 = group_norm_silu_reference(x.float(), 3, w, b, 1e-5)
    native = group_norm_silu_reference(x, 3, w, b, 1e-5)  # casts w, b to bf16
    assert_close_to_reference(ours, ref32, native, torch.bfloat16)


def test_group_norm_empty():
    x = torch.empty(0, 8, 4, 4, device=DEVICE)
    assert group_norm_silu(x, 4, None, None, 1e-5).shape == x.shape


@pytest.mark.parametrize("kwargs,name", [
    ({"weight": torch.ones(11)}, "weight"),
    ({"bias": torch.ones(12, 1)}, "bias"),
    ({"num_groups": 5}, "num_groups"),
    ({"num_groups": 0}, "num_groups"),
    ({"x": torch.randn(2, 12)}, "x"),
    ({"x": torch.randn(1, 2, 12, 3, 3)}, "x"),
    ({"x": torch.ones(2, 12, 3, 3, dtype=torch.int32)}, "x"),
    ({"eps": -1.0}, "eps"),
    ({"channel_offset": torch.ones(2, 11)}, "channel_offset"),
    ({"channel_offset": torch.ones(3, 12)}, "channel_offset"),
    ({"channel_offset": torch.ones(2, 12, 1, 1)}, "channel_offset"),
    ({"channel_offset": torch.ones(2, 12, dtype=torch.int64)}, "channel_offset"),
])
def test_group_norm_bad_input(kwargs, name):
    args = {"x": torch.randn(2, 12, 3, 3), "num_groups": 3, "weight": torch.ones(12), "bias": torch.zeros(12),
            "eps": 1e-5} | kwargs
    with pytest.raises(ValueError, match=name):
        group_norm_silu(**args)


# SDXL at 1024x1024 (latents 128x128, N = 2 for CFG): the resnets' GroupNorm(32) inputs, and a
# tensor-parallel shard (half the channels, half the groups).
GN_SDXL = [(2, 320, 128, 128, 32), (2, 640, 128, 128, 32), (2, 960, 128, 128, 32), (2, 640, 64, 64, 32),
           (2, 1280, 64, 64, 32), (2, 1920, 64, 64, 32), (2, 1280, 32, 32, 32), (2, 2560, 32, 32, 32),
           (2, 160, 128, 128, 16)]


@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,h,w,groups", GN_SDXL, ids=lambda v: str(v))
def test_group_norm_sdxl_shapes(n, c, h, w, groups, channels_last):
    _check_group_norm((n, c, h, w), groups, torch.bfloat16, channels_last, True, True)
    _check_group_norm((n, c, h, w), groups, torch.bfloat16, channels_last, True, True, offset_rows=n)


# The KL VAE decoder's at 1024x1024 (SDXL's: 512 channels at 128-512, 256 and 128 at 1024), on the
# large problems' path (_LARGE_ELEMS and up) but the first, and a batch of two with an offset.
GN_VAE = [(1, 512, 128, 128, 32), (1, 512, 256, 256, 32), (1, 512, 512, 512, 32), (1, 256, 512, 512, 32),
          (1, 256, 1024, 1024, 32), (1, 128, 1024, 1024, 32), (2, 128, 515, 301, 32)]


@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,h,w,groups", GN_VAE, ids=lambda v: str(v))
def test_group_norm_vae_shapes(n, c, h, w, groups, channels_last):
    _check_group_norm((n, c, h, w), groups, torch.bfloat16, channels_last, True, True)
    if n > 1:
        _check_group_norm((n, c, h, w), groups, torch.bfloat16, channels_last, True, True, offset_rows=n)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_sdxl_dtypes_no_silu(dtype):
    _check_group_norm((2, 640, 64, 64), 32, dtype, True, True, False, eps=1e-6)
    _check_group_norm((2, 1280, 32, 32), 32, dtype, False, True, True, eps=1e-6)


# ---------------------------------------------------------------------------- adaLN modulate

def _ln_inputs(b, l, d, dtype, affine, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    # x is a view with a padded token stride; shift/scale are chunks of one [B, 6D] projection
    # (stride 6D, like AdaLayerNormZero's emb.chunk(6, dim=1)).
    x = (torch.randn(b, l + 3, d, generator=g) * 2 + 1).to(dtype).to(device)[:, 2:-1]
    emb = (torch.randn(b, 6 * d, generator=g) * 0.5).to(dtype).to(device)
    shift, scale = emb.chunk(6, dim=1)[:2]
    w = torch.randn(d, generator=g).to(dtype).to(device) if affine else None
    bias = torch.randn(d, generator=g).to(dtype).to(device) if affine else None
    return x, shift, scale, w, bias


def _check_ln(b, l, d, dtype, affine, eps=1e-6, inputs=None):
    x, shift, scale, w, bias = inputs if inputs is not None else _ln_inputs(b, l, d, dtype, affine)
    ours = layer_norm_modulate(x, shift, scale, eps, w, bias)
    assert ours.is_contiguous()
    up = (lambda t: None if t is None else t.float())
    ref32 = layer_norm_modulate_reference(up(x), up(shift), up(scale), eps, up(w), up(bias))
    native = None if dtype == torch.float32 else layer_norm_modulate_reference(x, shift, scale, eps, w, bias)
    assert_close_to_reference(ours, ref32, native, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,l,d,affine", [(2, 5, 72, False), (1, 7, 200, True), (3, 4, 17, False), (1, 1, 1, False)])
def test_layer_norm_modulate_small(b, l, d, affine, dtype):
    _check_ln(b, l, d, dtype, affine)


def test_layer_norm_modulate_transposed_x():
    """A last dim that is not unit-stride is copied to a contiguous one first."""
    x, shift, scale, _, _ = _ln_inputs(2, 6, 40, torch.float32, False)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert xt.stride(2) != 1
    _check_ln(2, 6, 40, torch.float32, False, inputs=(xt, shift, scale, None, None))


def test_layer_norm_modulate_empty():
    x = torch.empty(2, 0, 8, device=DEVICE)
    s = torch.zeros(2, 8, device=DEVICE)
    assert layer_norm_modulate(x, s, s, 1e-6).shape == (2, 0, 8)


@pytest.mark.parametrize("kwargs,name", [
    ({"x": torch.randn(4, 8)}, "x"),
    ({"x": torch.ones(2, 4, 8, dtype=torch.int64)}, "x"),
    ({"shift": torch.randn(2, 7)}, "shift"),
    ({"shift": torch.randn(1, 8)}, "shift"),
    ({"scale": torch.randn(2, 8, 1)}, "scale"),
    ({"weight": torch.ones(9)}, "weight"),
    ({"bias": torch.ones(4)}, "bias"),
    ({"eps": float("nan")}, "eps"),
])
def test_layer_norm_modulate_bad_input(kwargs, name):
    args = {"x": torch.randn(2, 4, 8), "shift": torch.randn(2, 8), "scale": torch.randn(2, 8), "eps": 1e-6} | kwargs
    with pytest.raises(ValueError, match=name):
        layer_norm_modulate(**args)


@needs_cuda
@pytest.mark.parametrize("b,l,d,affine", [
    (1, 4096, 3072, False),  # Flux image tokens at 1024x1024 (AdaLayerNormZero)
    (1, 512, 3072, False),  # Flux text tokens
    (2, 4608, 3072, False),  # joint sequence of the single blocks, batch 2
    (1, 4096, 3072, True),  # AdaLayerNormContinuous with an affine LayerNorm
    (2, 1000, 1536, False),  # SD3-sized width, ragged length
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_norm_modulate_flux_shapes(b, l, d, affine, dtype):
    _check_ln(b, l, d, dtype, affine)


# ---------------------------------------------------------------------------- gated residual (+ adaLN modulate)

def _gated_inputs(b, l, d, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    # The residual stream x is large next to the branch output y, as in a Flux block; x is a view
    # with a padded token stride, y the second half of a joint [B, 2L, D] tensor (the split of a
    # single block's output); gate, shift and scale are chunks of one [B, 6D] adaLN projection.
    x = (torch.randn(b, l + 3, d, generator=g) * 4 + 1).to(dtype).to(DEVICE)[:, 2:-1]
    y = (torch.randn(b, 2 * l, d, generator=g) * 0.7).to(dtype).to(DEVICE)[:, l:]
    emb = (torch.randn(b, 6 * d, generator=g) * 0.5).to(dtype).to(DEVICE)
    gate, shift, scale = emb.chunk(6, dim=1)[2], emb.chunk(6, dim=1)[3], emb.chunk(6, dim=1)[4]
    w = torch.randn(d, generator=g).to(dtype).to(DEVICE) if affine else None
    bias = torch.randn(d, generator=g).to(dtype).to(DEVICE) if affine else None
    return x, y, gate, shift, scale, w, bias


def _check_gated(b, l, d, dtype, affine, eps=1e-6, inputs=None):
    x, y, gate, shift, scale, w, bias = inputs if inputs is not None else _gated_inputs(b, l, d, dtype, affine)
    up = (lambda t: None if t is None else t.float())
    s = gated_residual(x, y, gate)
    s2, n = gated_residual_layer_norm_modulate(x, y, gate, shift, scale, eps, w, bias)
    assert s.is_contiguous() and s2.is_contiguous() and n.is_contiguous() and s.shape == n.shape == x.shape
    s32, n32 = gated_residual_layer_norm_modulate_reference(up(x), up(y), up(gate), up(shift), up(scale), eps, up(w), up(bias))
    native = (None, None) if dtype == torch.float32 else gated_residual_layer_norm_modulate_reference(
        x, y, gate, shift, scale, eps, w, bias)
    assert_close_to_reference(s, s32, native[0], dtype)
    assert_close_to_reference(s2, s32, native[0], dtype)
    assert_close_to_reference(n, n32, native[1], dtype)
    torch.testing.assert_close(gated_residual_reference(up(x), up(y), up(gate)), s32, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,l,d,affine", [(2, 5, 72, False), (1, 7, 200, True), (3, 4, 17, False), (1, 1, 1, False)])
def test_gated_residual_small(b, l, d, affine, dtype):
    _check_gated(b, l, d, dtype, affine)


def test_gated_residual_transposed_inputs():
    """Last dims that are not unit-stride are copied first; the results are still the gated sum and its norm."""
    x, y, gate, shift, scale, _, _ = _gated_inputs(2, 6, 40, torch.float32, False)
    xt, yt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x, y))
    assert xt.stride(2) != 1 and yt.stride(2) != 1
    _check_gated(2, 6, 40, torch.float32, False, inputs=(xt, yt, gate, shift, scale, None, None))


def test_gated_residual_empty():
    x = torch.empty(2, 0, 8, device=DEVICE)
    g = torch.zeros(2, 8, device=DEVICE)
    assert gated_residual(x, x, g).shape == (2, 0, 8)
    s, n = gated_residual_layer_norm_modulate(x, x, g, g, g, 1e-6)
    assert s.shape == n.shape == (2, 0, 8)


@pytest.mark.parametrize("kwargs,name", [
    ({"x": torch.randn(4, 8)}, "x"),
    ({"y": torch.randn(2, 4, 7)}, "y"),
    ({"y": torch.randn(2, 4, 8, dtype=torch.float64)}, "y"),
    ({"gate": torch.randn(2, 7)}, "gate"),
    ({"gate": torch.ones(2, 8, dtype=torch.int64)}, "gate"),
    ({"shift": torch.randn(1, 8)}, "shift"),
    ({"weight": torch.ones(9)}, "weight"),
    ({"eps": float("nan")}, "eps"),
])
def test_gated_residual_bad_input(kwargs, name):
    args = {"x": torch.randn(2, 4, 8), "y": torch.randn(2, 4, 8), "gate": torch.randn(2, 8), "shift": torch.randn(2, 8),
            "scale": torch.randn(2, 8), "eps": 1e-6} | kwargs
    with pytest.raises(ValueError, match=name):
        gated_residual_layer_norm_modulate(**args)
    if name in ("x", "y", "gate"):
        with pytest.raises(ValueError, match=name):
            gated_residual(args["x"], args["y"], args["gate"])


@needs_cuda
@pytest.mark.parametrize("b,l,d", [
    (1, 4096, 3072),  # Flux image tokens at 1024x1024 (double blocks)
    (1, 512, 3072),  # Flux text tokens
    (2, 4608, 3072),  # the single blocks' joint sequence, batch 2
    (2, 1000, 1536),  # SD3-sized width, ragged length
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gated_residual_flux_shapes(b, l, d, dtype):
    _check_gated(b, l, d, dtype, affine=False)


# ---------------------------------------------------------------------------- residual add + LayerNorm

def _check_add_ln(shape, dtype, affine, eps=1e-5, seed=0, inputs=None):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    if inputs is None:
        # The residual stream is large next to the block's output it receives, as in a UNet.
        x = (torch.randn(*shape, generator=g) * 0.5).to(dtype).to(DEVICE)
        r = (torch.randn(*shape, generator=g) * 4 + 2).to(dtype).to(DEVICE)
        w = (torch.randn(d, generator=g) * 0.2 + 1).to(dtype).to(DEVICE) if affine else None
        b = (torch.randn(d, generator=g) * 0.2).to(dtype).to(DEVICE) if affine else None
    else:
        x, r, w, b = inputs
    h, y = add_layer_norm(x, r, w, b, eps)
    assert h.is_contiguous() and y.is_contiguous() and h.shape == y.shape == x.shape
    up = (lambda t: None if t is None else t.float())
    h32, y32 = add_layer_norm_reference(up(x), up(r), up(w), up(b), eps)
    native = (None, None) if dtype == torch.float32 else add_layer_norm_reference(x, r, w, b, eps)
    assert_close_to_reference(h, h32, native[0], dtype)
    assert_close_to_reference(y, y32, native[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,affine", [((2, 5, 72), True), ((1, 7, 200), False), ((3, 4, 17), True),
                                          ((1, 1, 1), True), ((11, 40), True), ((2, 3, 9, 96), True)])
def test_add_layer_norm_small(shape, affine, dtype):
    _check_add_ln(shape, dtype, affine)


@pytest.mark.parametrize("knobs", [(2048, 1, 256), (8192, 4, 1024), (4096, 2, 128)], ids=str)
def test_add_layer_norm_launch_geometries(knobs, monkeypatch):
    """The geometries benchmarks/tune_pointwise.py sweeps: rows per program, programs per SM, warps."""
    from rtdiff_kernels import add_layer_norm as aln

    for name, value in zip(("_TILE_ELEMS", "_MIN_PROGRAMS_PER_SM", "_ELEMS_PER_WARP"), knobs):
        monkeypatch.setattr(aln, name, value)
    for shape in [(1, 37, 320), (2, 9, 96), (3, 5, 1280)]:
        _check_add_ln(shape, torch.bfloat16, True)


def test_add_layer_norm_noncontiguous_inputs():
    """Transposed inputs are copied to contiguous ones; the outputs are still the sum and its norm."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 6, generator=g).to(DEVICE).transpose(1, 2)
    r = torch.randn(2, 40, 6, generator=g).to(DEVICE).transpose(1, 2)
    assert not x.is_contiguous()
    _check_add_ln(tuple(x.shape), torch.float32, False, inputs=(x, r, None, None))


def test_add_layer_norm_empty():
    x = torch.empty(2, 0, 8, device=DEVICE)
    h, y = add_layer_norm(x, x, None, None, 1e-5)
    assert h.shape == y.shape == (2, 0, 8)


@pytest.mark.parametrize("kwargs,name", [
    ({"x": torch.ones(2, 4, 8, dtype=torch.int64)}, "x"),
    ({"residual": torch.randn(2, 4, 7)}, "residual"),
    ({"residual": torch.randn(2, 4, 8, dtype=torch.float64)}, "residual"),
    ({"weight": torch.ones(9)}, "weight"),
    ({"bias": torch.ones(4)}, "bias"),
    ({"eps": -1.0}, "eps"),
])
def test_add_layer_norm_bad_input(kwargs, name):
    args = {"x": torch.randn(2, 4, 8), "residual": torch.randn(2, 4, 8), "weight": None, "bias": None, "eps": 1e-5} | kwargs
    with pytest.raises(ValueError, match=name):
        add_layer_norm(**args)


@needs_cuda
@pytest.mark.parametrize("shape", [
    (1, 4096, 640),  # SDXL transformer tokens at 1024x1024, second level
    (1, 1024, 1280),  # third level
    (2, 1024, 1280),  # batch 2 (classifier-free guidance)
    (1, 144, 1280),  # a 384x384 chunk-cache region, third level
    (3, 1000, 1000),  # ragged
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_add_layer_norm_sdxl_shapes(shape, dtype):
    _check_add_ln(shape, dtype, affine=True)
