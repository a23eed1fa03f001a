"""Fused RMSNorm+rotary (Flux QK-norm), GEGLU, linear+tanh-GELU, residual add with biases and nearest
upsampling against their PyTorch references
and against diffusers' own modules.

Tolerance policy. For float16/bfloat16 a fast path must stay within
    2 * (PyTorch's own error) + floor
of an fp32 reference computed from the same low-precision inputs upcast, where "PyTorch's own error"
is measured here, in the same test, as the max abs error of the same computation done natively at the
low precision (diffusers' eager code path) against that fp32 reference. Why 2x: the fast path makes
the same kind of rounding steps as PyTorch (the RMSNorm+rotary kernel even repeats diffusers'
intermediate roundings), but a rounding may go the other way (different summation order, rsqrt/erf
implementations, FMA contraction), so up to about twice PyTorch's worst case is "as accurate as
PyTorch". floor = finfo(dtype).eps * max|reference| (about 1 ulp at the output's magnitude) keeps a
case where PyTorch happens to be exact from becoming a zero tolerance. Real bugs (wrong pairing,
wrong eps, wrong scaling) give errors of order the values themselves, far above this.
On CPU the kernels run in Triton's interpreter, whose fp32->bf16 cast truncates instead of rounding
to nearest (triton/runtime/interpreter.py, _convert_float). The RMSNorm+rotary kernel rounds bf16 by
hand there (its three roundings would otherwise add up past the bound); GEGLU's single final cast
may be one ulp off in the interpreter, still inside the bound. On the GPU casts round to nearest.
For float32 the bound is fixed and tight: 1e-5 * max|reference| + 1e-6.
Nearest upsampling computes nothing: it must equal PyTorch's output bit for bit, in every dtype.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from rtdiff_kernels.add_bias import add_bias, add_bias_reference
from rtdiff_kernels.activations import geglu, geglu_reference, linear_gelu_tanh, linear_gelu_tanh_reference
from rtdiff_kernels.rms_norm_rope import rms_norm_rope, rms_norm_rope_reference
from rtdiff_kernels.upsample_nearest import upsample_nearest, upsample_nearest_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def bound(dtype: torch.dtype, ref32: torch.Tensor, torch_err: float) -> float:
    scale = ref32.abs().max().item()
    if dtype == torch.float32:
        return 1e-5 * scale + 1e-6
    return 2 * torch_err + torch.finfo(dtype).eps * scale


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check(ours: torch.Tensor, native: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype, what: str):
    """ours and native (PyTorch at the low precision) against the fp32 reference, per the policy."""
    assert ours.dtype == dtype and ours.shape == ref32.shape, (ours.dtype, ours.shape, ref32.shape)
    torch_err = max_err(native, ref32)
    err = max_err(ours, ref32)
    tol = bound(dtype, ref32, torch_err)
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g} (PyTorch's own error {torch_err:.3g})"


# --- RMSNorm + rotary -------------------------------------------------------------------------------

def make_qk(b, l, h, d, dtype, gen, strided=True):
    """x as the Flux processor sees it: a [B, L, H, D] view of a wider projection output."""
    if strided:  # the k third of a fused qkv projection: non-contiguous B and L strides
        qkv = torch.randn(b, l, 3 * h * d, dtype=torch.float32, generator=gen).to(dtype)
        return qkv[..., h * d:2 * h * d].unflatten(-1, (-1, d))
    return torch.randn(b, l, h, d, dtype=torch.float32, generator=gen).to(dtype)


def make_rope(l, d, gen):
    # Arbitrary angles, cos[2i] != cos[2i+1]: stricter than Flux's repeat-interleaved table.
    ang = torch.rand(l, d, generator=gen) * 12 - 6
    return ang.cos(), ang.sin()


def make_weight(d, mode, dtype, gen):
    if mode == "none":
        return None
    w = 1 + 0.5 * torch.randn(d, generator=gen)
    return w if mode == "fp32" else w.to(dtype)


def diffusers_qk(x, weight, eps, cos, sin):
    """diffusers 0.42's Flux path: RMSNorm module, then apply_rotary_emb(sequence_dim=1)."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    d = x.shape[-1]
    norm = RMSNorm(d, eps=eps, elementwise_affine=weight is not None).to(x.device)
    if weight is not None:
        with torch.no_grad():
            norm.weight.data = weight.clone()
    with torch.no_grad():
        y = norm(x)
        if cos is not None:
            y = apply_rotary_emb(y, (cos, sin), sequence_dim=1)
    return y


def check_rms_norm_rope(x, weight, eps, cos, sin, what):
    dtype = x.dtype
    ours = rms_norm_rope(x, weight, eps, cos, sin)
    assert ours.is_contiguous()
    ref32 = rms_norm_rope_reference(x.float(), None if weight is None else weight.float(), eps, cos, sin)
    native = rms_norm_rope_reference(x, weight, eps, cos, sin)
    check(ours, native, ref32, dtype, f"{what} vs reference")
    # diffusers returns the norm's dtype (fp32 for an fp32 weight); we return x.dtype.
    theirs = diffusers_qk(x, weight, eps, cos, sin).to(dtype)
    check(ours, theirs, ref32, dtype, f"{what} vs diffusers")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 3, 24), (1, 5, 5, 40), (1, 3, 2, 128)])
@pytest.mark.parametrize("rope", [True, False])
def test_rms_norm_rope_matches_reference_and_diffusers(dtype, shape, rope):
    gen = seeded(dtype, shape, rope)
    b, l, h, d = shape
    x = make_qk(b, l, h, d, dtype, gen)
    cos, sin = make_rope(l, d, gen) if rope else (None, None)
    modes = ["same", "none"] + (["fp32"] if dtype != torch.float32 else [])
    for mode in modes:
        weight = make_weight(d, mode, dtype, gen)
        check_rms_norm_rope(x, weight, 1e-6, cos, sin, f"{dtype} {shape} rope={rope} weight={mode}")


def test_rms_norm_rope_odd_layouts():
    gen = torch.Generator().manual_seed(1)
    # Odd D is fine without rotary.
    x = make_qk(2, 3, 3, 25, torch.float16, gen)
    check_rms_norm_rope(x, make_weight(25, "same", torch.float16, gen), 1e-5, None, None, "D=25")
    # L-major storage transposed into [B, L, H, D]; a large eps; contiguous x; a strided rotary table.
    x = torch.randn(6, 2, 4 * 40, generator=gen).to(torch.bfloat16).transpose(0, 1).unflatten(-1, (-1, 40))
    cos, sin = make_rope(6, 80, gen)
    check_rms_norm_rope(x, make_weight(40, "same", torch.bfloat16, gen), 0.5, cos[:, ::2], sin[:, ::2], "transposed")
    x = make_qk(1, 9, 7, 24, torch.bfloat16, gen, strided=False)
    cos, sin = make_rope(9, 24, gen)
    check_rms_norm_rope(x, make_weight(24, "same", torch.bfloat16, gen), 1e-6, cos, sin, "contiguous")


def _joint_rows(dtype, device, gen, text=5, image=9, b=2, h=3, d=24):
    """(text q, image q, their rotary rows, the joint [B, text + image, H, D] result written by
    rms_norm_rope(out=) into each stream's rows, the same concatenated after separate calls)."""
    xt, xi = make_qk(b, text, h, d, dtype, gen).to(device), make_qk(b, image, h, d, dtype, gen).to(device)
    cos, sin = (t.to(device) for t in make_rope(text + image, d, gen))
    w = make_weight(d, "same", dtype, gen).to(device)
    joint = torch.full((b, text + image, h, d), 7.0, dtype=dtype, device=device)
    got = [rms_norm_rope(xt, w, 1e-6, cos[:text], sin[:text], out=joint[:, :text]),
           rms_norm_rope(xi, w, 1e-6, cos[text:], sin[text:], out=joint[:, text:])]
    apart = torch.cat([rms_norm_rope(xt, w, 1e-6, cos[:text], sin[:text]),
                       rms_norm_rope(xi, w, 1e-6, cos[text:], sin[text:])], dim=1)
    return got, joint, apart


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rope_writes_each_streams_rows_of_a_joint_tensor(dtype):
    """out= the text or image rows of a joint query: the same values as separate calls and a
    concatenation, bit for bit, each call returning its rows."""
    got, joint, apart = _joint_rows(dtype, "cpu", torch.Generator().manual_seed(12))
    assert got[0].data_ptr() == joint.data_ptr() and got[1].data_ptr() == joint[:, 5:].data_ptr()
    torch.testing.assert_close(joint, apart, rtol=0, atol=0)


def test_rms_norm_rope_bad_out():
    x, w = torch.randn(1, 4, 2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="^out must be a"):
        rms_norm_rope(x, w, 1e-6, out=torch.empty(1, 4, 2, 7))
    with pytest.raises(ValueError, match="^out must be a"):
        rms_norm_rope(x, w, 1e-6, out=torch.empty(1, 4, 2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="^out must have packed heads"):
        rms_norm_rope(x, w, 1e-6, out=torch.empty(1, 4, 8, 2).transpose(2, 3))


def test_rms_norm_rope_tolerance_rejects_wrong_rotary():
    """The bound is tight enough to catch a plausible bug: the half-split rotary (unbind_dim=-2)."""
    gen = torch.Generator().manual_seed(2)
    x = make_qk(1, 5, 3, 24, torch.bfloat16, gen)
    w = make_weight(24, "same", torch.bfloat16, gen)
    cos, sin = make_rope(5, 24, gen)
    ref32 = rms_norm_rope_reference(x.float(), w.float(), 1e-6, cos, sin)
    tol = bound(torch.bfloat16, ref32, max_err(rms_norm_rope_reference(x, w, 1e-6, cos, sin), ref32))
    y = rms_norm_rope(x, w, 1e-6)
    first, second = y.float().chunk(2, dim=-1)
    wrong = y.float() * cos[None, :, None] + torch.cat([-second, first], -1) * sin[None, :, None]
    assert max_err(wrong, ref32) > 10 * tol


def test_rms_norm_rope_bad_input():
    x = torch.randn(1, 4, 2, 8)
    w = torch.ones(8)
    cos, sin = torch.ones(4, 8), torch.zeros(4, 8)
    cases = [
        ((torch.randn(4, 2, 8), w, 1e-6, cos, sin), "^x must be a 4-D"),
        ((x.int(), w, 1e-6, cos, sin), "^x must be float32"),
        ((torch.randn(1, 4, 8, 2).transpose(-1, -2), None, 1e-6, None, None), "^x must have a contiguous last dim"),
        ((x, torch.ones(7), 1e-6, cos, sin), "^weight must be"),
        ((x, w.int(), 1e-6, cos, sin), "^weight must be float"),
        ((x, w, -1.0, cos, sin), "^eps must be"),
        ((x, w, float("nan"), cos, sin), "^eps must be"),
        ((x, w, 1e-6, cos, None), "^cos and sin must both"),
        ((x, w, 1e-6, torch.ones(3, 8), sin), "^cos must be"),
        ((x, w, 1e-6, cos, torch.zeros(4, 6)), "^sin must be"),
        ((torch.randn(1, 4, 2, 7), torch.ones(7), 1e-6, torch.ones(4, 7), torch.ones(4, 7)), "^x: the rotary"),
    ]
    for args, word in cases:
        with pytest.raises(ValueError, match=word):
            rms_norm_rope(*args)


# --- GEGLU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 74), (2, 600), (4, 2560), (1, 2, 3, 10)])
def test_geglu_matches_reference(dtype, shape):
    gen = seeded(dtype, shape)
    h = (2 * torch.randn(*shape, generator=gen)).to(dtype)
    ref32 = geglu_reference(h.float())
    hidden, gate = h.chunk(2, dim=-1)
    native = hidden * F.gelu(gate)  # diffusers' GEGLU at the low precision
    check(geglu(h), native, ref32, dtype, f"geglu {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_strided_rows_and_diffusers_module(dtype):
    from diffusers.models.activations import GEGLU

    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 5, 80, generator=gen).to(dtype)
    h = wide[..., 3:77]  # rows 80 apart, N = 37
    hidden, gate = h.chunk(2, dim=-1)
    check(geglu(h), hidden * F.gelu(gate), geglu_reference(h.float()), dtype, "strided rows")

    torch.manual_seed(4)
    module = GEGLU(24, 37).to(dtype)
    x = torch.randn(2, 6, 24, generator=gen).to(dtype)
    with torch.no_grad():
        proj = module.proj(x)
        theirs = module(x)
        check(geglu(proj), theirs, geglu_reference(proj.float()), dtype, "vs diffusers GEGLU")


@pytest.mark.parametrize("knobs", [(256, 1024, 2), (512, 4096, 4), (2048, 8192, 8)], ids=str)
def test_geglu_launch_geometries(knobs, monkeypatch):
    """Every launch geometry the tuner (benchmarks/tune_pointwise.py) may ship: several rows per
    program with a ragged last row block, column blocks that divide N or not."""
    from rtdiff_kernels import activations

    for name, value in zip(("_MAX_BLOCK_N", "_TILE_ELEMS", "_NUM_WARPS"), knobs):
        monkeypatch.setattr(activations, name, value)
    gen = torch.Generator().manual_seed(11)
    for shape in [(7, 2 * 640), (3, 5, 2 * 300), (1, 2 * 2048), (13, 2 * 37)]:
        h = (2 * torch.randn(*shape, generator=gen)).to(torch.bfloat16)
        hidden, gate = h.chunk(2, dim=-1)
        check(geglu(h), hidden * F.gelu(gate), geglu_reference(h.float()), torch.bfloat16, f"geglu {knobs} {shape}")


def test_geglu_bad_input():
    with pytest.raises(ValueError, match="^h: the last dim must be even"):
        geglu(torch.randn(2, 7))
    with pytest.raises(ValueError, match="^h must be float32"):
        geglu(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="^h must be a tensor"):
        geglu([1.0, 2.0])


# --- linear + tanh-GELU -----------------------------------------------------------------------------

def gelu_tanh_formula(y):
    return 0.5 * y * (1 + torch.tanh(0.7978845608028654 * (y + 0.044715 * y ** 3)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gelu_tanh_cpu(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 40, generator=gen).to(dtype)
    w = (torch.randn(37, 40, generator=gen) / 6).to(dtype)
    b = torch.randn(37, generator=gen).to(dtype)
    ref32 = gelu_tanh_formula(F.linear(x.float(), w.float(), b.float()))
    check(linear_gelu_tanh(x, w, b), linear_gelu_tanh_reference(x, w, b), ref32, dtype, "with bias")
    ref32 = gelu_tanh_formula(F.linear(x.float(), w.float()))
    check(linear_gelu_tanh(x, w, None), linear_gelu_tanh_reference(x, w, None), ref32, dtype, "no bias")


def test_linear_gelu_tanh_bad_input():
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    with pytest.raises(ValueError, match="^weight must be"):
        linear_gelu_tanh(x, torch.randn(5, 7), b)
    with pytest.raises(ValueError, match="^weight dtype"):
        linear_gelu_tanh(x, w.half(), b)
    with pytest.raises(ValueError, match="^bias must be"):
        linear_gelu_tanh(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="^x must be"):
        linear_gelu_tanh(3.0, w, b)


# --- residual add with per-channel biases ---------------------------------------------------------------

def _add_bias_inputs(shape, dtype, layout, biases, device="cpu"):
    g = seeded("add_bias", shape, layout, biases)
    a, b = (torch.randn(shape, generator=g) * 3).to(dtype), torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    bias = [torch.randn(shape[1], generator=g) if i < biases else None for i in range(2)]
    bias[0] = bias[0].to(dtype) if bias[0] is not None else None  # conv2's, in the model's dtype; the other fp32
    to = (lambda t: None if t is None else t.to(device))
    return to(a), to(b), to(bias[0]), to(bias[1])


def _check_add_bias(shape, dtype, layout, biases, device="cpu", with_b=True):
    a, b, b1, b2 = _add_bias_inputs(shape, dtype, layout, biases, device)
    b = b if with_b else None  # a convolution's output and its bias alone
    ours = add_bias(a, b, b1, b2)
    up = (lambda t: None if t is None else t.float())
    check(ours, add_bias_reference(a, b, b1, b2), add_bias_reference(up(a), up(b), up(b1), up(b2)), dtype,
          f"add_bias {shape} {layout}")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert ours.is_contiguous(memory_format=fmt), f"{layout}: output strides {ours.stride()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,biases", [((2, 5, 3, 7), 2), ((1, 3, 4, 1), 1), ((2, 20, 3, 5), 0), ((1, 130, 2, 3), 2)])
def test_add_bias_matches_reference(shape, biases, layout, dtype):
    _check_add_bias(shape, dtype, layout, biases)
    _check_add_bias(shape, dtype, layout, biases, with_b=False)


def test_add_bias_mixed_layouts_fall_back_and_3d_runs():
    a, b, b1, _ = _add_bias_inputs((2, 6, 3, 5), torch.float32, "channels_last", 1)
    mixed = add_bias(a, b.contiguous(), b1)
    assert torch.allclose(mixed, add_bias_reference(a, b.contiguous(), b1))
    x, y = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    assert torch.allclose(add_bias(x, y, b1), x + y + b1[:, None], atol=1e-6)


def test_add_bias_bad_input():
    a = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="^a and b must match"):
        add_bias(a, torch.randn(1, 4, 3, 2))
    with pytest.raises(ValueError, match="^bias1 must be"):
        add_bias(a, a, torch.randn(3))
    with pytest.raises(ValueError, match="^bias2 must be"):
        add_bias(a, a, None, torch.randn(4, 1))
    with pytest.raises(ValueError, match="^a must be float32"):
        add_bias(a.int(), a.int())


# --- nearest upsampling ------------------------------------------------------------------------------

def _upsample_input(shape, dtype, layout, device="cpu"):
    x = torch.randn(shape, generator=seeded("upsample", shape, layout)).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # a view: every other column of a wider tensor
        x = torch.randn(*shape[:3], 2 * shape[3], generator=seeded("upsample", shape)).to(dtype)[..., ::2]
    return x.to(device)


def _check_upsample(shape, scale, dtype, layout, device="cpu"):
    x = _upsample_input(shape, dtype, layout, device)
    ours = upsample_nearest(x, scale)
    ref = upsample_nearest_reference(x, scale)
    assert ours.shape == ref.shape and torch.equal(ours, ref), (shape, scale, layout)
    fmt = torch.channels_last if layout == "channels_last" and shape[1] > 1 else torch.contiguous_format
    assert ours.is_contiguous(memory_format=fmt), f"{layout}: output strides {ours.stride()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape,scale", [((2, 5, 3, 7), 2), ((1, 3, 4, 1), 2), ((1, 20, 3, 5), 3), ((2, 6, 2, 3), 1)])
def test_upsample_nearest_equals_pytorch(shape, scale, layout, dtype):
    _check_upsample(shape, scale, dtype, layout)


def test_upsample_nearest_bad_input():
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="^scale must be"):
        upsample_nearest(x, 0)
    with pytest.raises(ValueError, match="^scale must be"):
        upsample_nearest(x, 2.0)
    with pytest.raises(ValueError, match="^x must be a 4-D"):
        upsample_nearest(torch.randn(4, 3, 3), 2)
    with pytest.raises(ValueError, match="^x must be float32"):
        upsample_nearest(x.to(torch.int32), 2)


def test_upsample_nearest_empty():
    assert upsample_nearest(torch.empty(0, 4, 3, 3), 2).shape == (0, 4, 6, 6)


# --- GPU, full model sizes ----------------------------------------------------------------------------

def flux_rope(text: int, side: int, device):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    txt = torch.zeros(text, 3)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(torch.cat([txt, img]).to(device))
    return cos.float(), sin.float()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rms_norm_rope_writes_a_joint_tensors_rows(dtype):
    got, joint, apart = _joint_rows(dtype, "cuda", torch.Generator().manual_seed(13), text=77, image=1000, b=2, h=24, d=128)
    torch.testing.assert_close(joint, apart, rtol=0, atol=0)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [24, 12, 3])  # Flux, tp=2, tp=8
def test_gpu_rms_norm_rope_flux(dtype, heads):
    gen = torch.Generator(device="cuda").manual_seed(6)
    d, text = 128, 512
    cos, sin = flux_rope(text, 64, "cuda")  # 512 text + 4096 image tokens
    qkv = torch.randn(1, text + 4096, 3 * heads * d, device="cuda", generator=gen).to(dtype)
    weight = (1 + 0.3 * torch.randn(d, device="cuda", generator=gen)).to(dtype)
    image = qkv[:, text:, :heads * d].unflatten(-1, (-1, d))  # the processor's image-stream q
    check_rms_norm_rope(image, weight, 1e-6, cos[text:], sin[text:], f"flux image q h={heads}")
    check_rms_norm_rope(qkv[:, :, :heads * d].unflatten(-1, (-1, d)), weight, 1e-6, cos, sin, "flux joint")
    check_rms_norm_rope(image, weight, 1e-6, None, None, "flux no rope")
    check_rms_norm_rope(image, None, 1e-6, cos[text:], sin[text:], "flux no weight")


@cuda
@pytest.mark.gpu
def test_gpu_rms_norm_rope_awkward():
    gen = torch.Generator().manual_seed(7)
    for dtype in DTYPES:
        for b, l, h, d in [(2, 7, 3, 24), (1, 33, 5, 40), (3, 9, 24, 128)]:
            x = make_qk(b, l, h, d, dtype, gen).cuda()
            cos, sin = (t.cuda() for t in make_rope(l, d, gen))
            for mode in ["same", "none", "fp32"]:
                w = make_weight(d, mode, dtype, gen)
                w = None if w is None else w.cuda()
                check_rms_norm_rope(x, w, 1e-6, cos, sin, f"{dtype} {(b, l, h, d)} {mode}")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4096, 10240), (2, 1024, 20480), (2, 4096, 5120), (3, 5, 74)])
def test_gpu_geglu(dtype, shape):
    gen = torch.Generator(device="cuda").manual_seed(8)
    h = (2 * torch.randn(*shape, device="cuda", generator=gen)).to(dtype)
    hidden, gate = h.chunk(2, dim=-1)
    check(geglu(h), hidden * F.gelu(gate), geglu_reference(h.float()), dtype, f"geglu {shape}")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(4096, 3072, 12288), (4608, 3072, 12288), (37, 40, 24), (1, 64, 48)])
def test_gpu_linear_gelu_tanh(dtype, mkn):
    m, k, n = mkn
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(1, m, k, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(dtype)
    b = (0.5 * torch.randn(n, device="cuda", generator=gen)).to(dtype)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference (and fp32 case)
    try:
        ref32 = gelu_tanh_formula(F.linear(x.float(), w.float(), b.float()))
        with torch.inference_mode():
            ours = linear_gelu_tanh(x, w, b)
            native = linear_gelu_tanh_reference(x, w, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    check(ours, native, ref32, dtype, f"linear_gelu_tanh {mkn}")


@cuda
@pytest.mark.gpu
def test_gpu_addmm_activation_is_tanh_gelu():
    """What linear_gelu_tanh relies on: CUDA _addmm_activation(use_gelu=True) is the tanh GELU (its
    CPU kernel is the erf one). Checked in fp32, where the two GELUs (up to 5e-4 apart around
    |y| = 2.7) are far apart in ulps; inputs are multiples of 1/4 so y is exact even under TF32.
    The criterion is the signed mean offset from the erf GELU towards the tanh one over the outputs
    where they differ by > 1e-4 (robust to an approximate hardware tanh in the epilogue), plus a max
    error. In bf16/fp16 the two GELUs are within an ulp of each other: there test_gpu_linear_gelu_tanh
    holds the fused path to the tolerance policy, and here we check the fast path is this op."""
    gen = torch.Generator(device="cuda").manual_seed(10)
    x = torch.randint(-4, 5, (4096, 16), device="cuda", generator=gen).float() / 4
    w = torch.randint(-3, 4, (512, 16), device="cuda", generator=gen).float() / 4
    b = torch.randint(-4, 5, (512,), device="cuda", generator=gen).float() / 4
    y = torch.addmm(b.double(), x.double(), w.double().t())
    tanh_gelu, erf_gelu = gelu_tanh_formula(y), F.gelu(y)
    with torch.inference_mode():
        fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).double()
    differ = (tanh_gelu - erf_gelu).abs() > 1e-4
    gap = (tanh_gelu - erf_gelu).abs()[differ].mean().item()
    towards_tanh = ((fused - erf_gelu) * torch.sign(tanh_gelu - erf_gelu))[differ].mean().item()
    assert abs(towards_tanh - gap) < 0.25 * gap, (towards_tanh, gap, max_err(fused, tanh_gelu))
    assert max_err(fused, tanh_gelu) < 2e-4, max_err(fused, tanh_gelu)

    for dtype in (torch.bfloat16, torch.float16):
        xl = torch.randn(300, 64, device="cuda", generator=gen).to(dtype)
        wl = torch.randn(96, 64, device="cuda", generator=gen).to(dtype)
        bl = torch.randn(96, device="cuda", generator=gen).to(dtype)
        with torch.inference_mode():
            assert torch.equal(linear_gelu_tanh(xl[None], wl, bl)[0],
                               torch._addmm_activation(bl, xl, wl.t(), use_gelu=True))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 64, 512, 512), (1, 64, 128, 128), (2, 1280, 32, 32), (1, 640, 64, 64), (1, 3, 17, 9)])
def test_gpu_upsample_nearest(dtype, shape):
    """The tiny VAE decoder's upsamplings at 1024 output and the SDXL UNet's, in both layouts."""
    for layout in ("channels_last", "nchw"):
        _check_upsample(shape, 2, dtype, layout, "cuda")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 320, 128, 128), (1, 1280, 32, 32), (2, 640, 64, 64), (1, 3, 17, 9)])
def test_gpu_add_bias(dtype, shape):
    """SDXL's resnet outputs at 1024 (conv2's bias and the shortcut's), in both layouts."""
    for layout in ("channels_last", "nchw"):
        _check_add_bias(shape, dtype, layout, 2, "cuda")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 512, 256, 256), (1, 256, 1024, 1024), (2, 1280, 64, 64), (1, 3, 17, 9)])
def test_gpu_add_bias_alone(dtype, shape):
    """A convolution's bias alone: the KL VAE decoder's upsampling convolutions at 1024 and the
    UNet's, in both layouts."""
    for layout in ("channels_last", "nchw"):
        _check_add_bias(shape, dtype, layout, 1, "cuda", with_b=False)
