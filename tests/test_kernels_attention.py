"""kernels/attention.py: the Triton FlashAttention forward against its float32 reference.

Small awkward sizes (odd lengths, the 77-token text tail, padded head dims, strided views) run on
CUDA where there is one and in Triton's interpreter otherwise (tests/conftest.py sets
TRITON_INTERPRET=1 without CUDA); the full model shapes run on the GPU only (`-m gpu`).
"""

from __future__ import annotations

import math

import pytest
import torch

from rtdiff_kernels.attention import attention_reference, flash_attention, supports

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _native(q, k, v, scale):
    """The reference formula run in q's own dtype: what eager PyTorch gets at that precision."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def assert_close_to_reference(out, q, k, v, scale=None):
    """Tolerance policy. The reference is computed in float32 from the same (already rounded)
    inputs, so any difference is the kernel's own arithmetic.
    - float32: the kernel does the same sums in fp32 (tensor cores kept in IEEE fp32, not tf32) in a
      different order; 1e-5 of the output's magnitude covers that, plus 1e-6 absolute.
    - float16/bfloat16: at most 2x the error of PyTorch itself at that precision (the same formula
      run natively in the low dtype, measured here, not hard-coded): the kernel rounds p to the
      input dtype before the second matmul and rounds the output, as any half-precision attention
      must; plus one ulp of the dtype at the output's magnitude, so that a lucky near-exact
      PyTorch run cannot make the bound zero."""
    assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == q.dtype
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ref = attention_reference(q.float(), k.float(), v.float(), scale)
    assert torch.isfinite(out).all()
    err = (out.float() - ref).abs().max().item()
    mag = ref.abs().max().item()
    if q.dtype == torch.float32:
        tol = 1e-5 * mag + 1e-6
    else:
        torch_err = (_native(q, k, v, s).float() - ref).abs().max().item()
        tol = 2 * torch_err + torch.finfo(q.dtype).eps * mag
    assert err <= tol, f"{q.dtype} {tuple(q.shape)} x {tuple(k.shape)}: max error {err:.3g} > {tol:.3g}"


def _qkv(b, h, lq, lk, d, dtype, q_gain=1.0, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, lq, d, generator=g) * q_gain).to(device, dtype)
    k = torch.randn(b, h, lk, d, generator=g).to(device, dtype)
    v = torch.randn(b, h, lk, d, generator=g).to(device, dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq,lk,d", [(37, 37, 16), (37, 77, 40), (37, 77, 64), (45, 29, 24)])
def test_matches_reference(dtype, lq, lk, d):
    q, k, v = _qkv(2, 3, lq, lk, d, dtype)
    assert supports(q, k, v) is None
    assert_close_to_reference(flash_attention(q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views_of_blhd_and_packed_qkv(dtype):
    # What the attention processors pass: [B, L, H, D] projections viewed as [B, H, L, D], here
    # from one packed qkv tensor (row stride 3 * H * D) with keys of another length.
    g = torch.Generator().manual_seed(1)
    b, h, lq, lk, d = 2, 3, 37, 77, 40
    qkv = torch.randn(b, lq, 3, h, d, generator=g).to(DEV, dtype)
    kv = torch.randn(b, lk, 2, h, d, generator=g).to(DEV, dtype)
    q, k, v = qkv[:, :, 0].transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = flash_attention(q, k, v)
    assert_close_to_reference(out, q, k, v)
    # Output memory is [B, Lq, H, D], so the processors' transpose + reshape is a view.
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_peaked_softmax_and_custom_scale(dtype):
    # Logits with std ~ 6: the running max moves between key blocks, exercising the rescale.
    q, k, v = _qkv(1, 2, 33, 77, 32, dtype, q_gain=6.0, seed=2)
    assert_close_to_reference(flash_attention(q, k, v), q, k, v)
    assert_close_to_reference(flash_attention(q, k, v, scale=0.37), q, k, v, scale=0.37)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fold", [True, False], ids=["scale-folded", "scale-multiplied"])
def test_both_softmax_orders_and_a_negative_scale(monkeypatch, dtype, fold):
    # FOLD_SCALE takes the row max on the raw scores, valid for a positive scale only: a negative
    # one must take the multiply-first order whatever the setting, and both orders match.
    import rtdiff_kernels.attention as attention_mod

    monkeypatch.setattr(attention_mod, "FOLD_SCALE", fold)
    q, k, v = _qkv(1, 2, 40, 130, 64, dtype, q_gain=4.0, seed=5)
    assert_close_to_reference(flash_attention(q, k, v), q, k, v)
    assert_close_to_reference(flash_attention(q, k, v, scale=-0.2), q, k, v, scale=-0.2)


def test_single_query_single_key_and_empty_queries():
    q, k, v = _qkv(1, 1, 1, 1, 8, torch.float32, seed=3)
    out = flash_attention(q, k, v)
    torch.testing.assert_close(out, v, rtol=0, atol=0)  # softmax over one key is 1
    q0, k1, v1 = _qkv(2, 3, 0, 5, 16, torch.float16, seed=3)
    assert flash_attention(q0, k1, v1).shape == (2, 3, 0, 16)


def test_registry_picks_triton_and_matches(monkeypatch):
    """The contract with rtdiff_cluster/ops/attention.py: with only triton and math allowed, the
    registry takes our kernel for what it supports and falls through to math for the rest."""
    from rtdiff_cluster.ops.attention import AttentionRegistry

    reg = AttentionRegistry(allowed=["triton", "math"])
    assert reg.installed()["triton"] is None
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _qkv(2, 3, 37, 77, 40, dtype, seed=4)
        assert reg.pick(q, k, v).name == "triton"
        assert_close_to_reference(reg(q, k, v), q, k, v)
    q, k, v = _qkv(1, 2, 9, 9, 12, torch.float32, seed=5)  # head dim 12: not a multiple of 8
    assert reg.pick(q, k, v).name == "math"
    assert "triton" in reg.choices().values() and "math" in reg.choices().values()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,h,lq,lk,d", [(1, 1, 300, 300, 512), (2, 3, 37, 77, 264)])
def test_blocked_matmul_attention_in_blocks_of_queries(monkeypatch, dtype, b, h, lq, lk, d):
    """The registry's backend for head dims over 256 (the KL VAE's): exact attention computed
    block of queries by block, within the tolerance policy. Its score budget is shrunk so the
    queries take several blocks, the last one short."""
    import rtdiff_cluster.ops.attention as registry_mod

    monkeypatch.setattr(registry_mod, "BLOCKED_SCORE_BYTES", 4 * b * h * lk * 64)  # 64 queries a block
    q, k, v = _qkv(b, h, lq, lk, d, dtype, seed=6, device=DEV)
    assert_close_to_reference(registry_mod._blocked_matmul(q, k, v, None), q, k, v)
    assert_close_to_reference(registry_mod._blocked_matmul(q, k, v, 0.3), q, k, v, scale=0.3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 16384, 16384, 512), (2, 3, 1000, 333, 320)], ids=["vae-1024", "awkward"])
def test_gpu_registry_sends_wide_heads_to_blocked_matmul(shape, dtype):
    """Head dims over 256 (the SDXL VAE's single 512-wide head over 16,384 tokens at 1024) go
    to two GEMMs per block of queries, with the scores in fp32, within the tolerance policy."""
    from rtdiff_cluster.ops.attention import AttentionRegistry

    reg = AttentionRegistry()
    q, k, v = _blhd(*shape, dtype, seed=7)
    assert reg.pick(q, k, v).name == "blocked matmul"
    assert_close_to_reference(reg(q, k, v), q, k, v)


def test_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv(1, 1, 4, 4, 16, torch.float32, device="cpu")
    assert "CUDA" in supports(q, k, v)
    with pytest.raises(ValueError, match=r"flash_attention: q on cpu"):
        flash_attention(q, k, v)


def _bad_inputs():
    def mk(*shape, dtype=torch.float16):
        return torch.randn(*shape).to(DEV, dtype)

    q, k, v = mk(1, 2, 5, 16), mk(1, 2, 7, 16), mk(1, 2, 7, 16)
    return [
        ("q 3-D", (mk(2, 5, 16), k, v), {}, r"q must be 4-D"),
        ("k not a tensor", (q, [1.0], v), {}, r"k must be a torch.Tensor"),
        ("k heads", (q, mk(1, 3, 7, 16), v), {}, r"k batch and heads"),
        ("v batch", (q, k, mk(2, 2, 7, 16)), {}, r"v batch and heads"),
        ("k head dim", (q, mk(1, 2, 7, 24), v), {}, r"k head dim 24"),
        ("v head dim", (q, k, mk(1, 2, 7, 24)), {}, r"v head dim 24"),
        ("v length", (q, k, mk(1, 2, 6, 16)), {}, r"v length 6"),
        ("no keys", (q, mk(1, 2, 0, 16), mk(1, 2, 0, 16)), {}, r"k has no keys"),
        ("q int", (q.to(torch.int32), k.to(torch.int32), v.to(torch.int32)), {}, r"q dtype"),
        ("k dtype", (q, k.float(), v), {}, r"k dtype"),
        ("head dim 12", (mk(1, 2, 5, 12), mk(1, 2, 7, 12), mk(1, 2, 7, 12)), {}, r"q head dim D = 12"),
        ("head dim 264", (mk(1, 1, 5, 264), mk(1, 1, 7, 264), mk(1, 1, 7, 264)), {}, r"q head dim D = 264"),
        ("q last dim strided", (mk(1, 2, 16, 5).transpose(-1, -2), k, v), {}, r"q last dim not contiguous"),
        ("v last dim strided", (q, k, mk(1, 2, 16, 7).transpose(-1, -2)), {}, r"v last dim not contiguous"),
        ("scale nan", (q, k, v), {"scale": float("nan")}, r"scale must be finite"),
        ("scale str", (q, k, v), {"scale": "x"}, r"scale must be a number"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_value_error_naming_the_argument(case):
    _, args, kw, pattern = case
    with pytest.raises(ValueError, match=pattern):
        flash_attention(*args, **kw)
    if not kw:  # the registry guard gives the same reason instead of raising
        assert supports(*args) is not None


# ---- GPU: full model shapes (B, H, Lq, Lk, D) ------------------------------------------------------

FULL_SHAPES = {
    "sdxl-self-4096": (2, 10, 4096, 4096, 64),
    "sdxl-self-1024": (2, 20, 1024, 1024, 64),
    "sdxl-cross-77": (2, 10, 4096, 77, 64),
    "flux-joint-4608": (1, 24, 4608, 4608, 128),
}


def _blhd(b, h, lq, lk, d, dtype, seed):
    """Inputs as the processors make them: [B, L, H, D] tensors viewed as [B, H, L, D]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g, device="cuda").to(dtype).transpose(1, 2)
    k = torch.randn(b, lk, h, d, generator=g, device="cuda").to(dtype).transpose(1, 2)
    v = torch.randn(b, lk, h, d, generator=g, device="cuda").to(dtype).transpose(1, 2)
    return q, k, v


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(FULL_SHAPES))
def test_gpu_full_shapes(name, dtype):
    q, k, v = _blhd(*FULL_SHAPES[name], dtype, seed=10)
    assert supports(q, k, v) is None
    assert_close_to_reference(flash_attention(q, k, v), q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("d", [8, 40, 72, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_head_dims(d, dtype):
    q, k, v = _blhd(2, 4, 1000, 333, d, dtype, seed=d)
    assert_close_to_reference(flash_attention(q, k, v), q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_second_device():
    q, k, v = (t.to("cuda:1") for t in _qkv(2, 3, 300, 77, 64, torch.bfloat16, device="cpu"))
    out = flash_attention(q, k, v)
    assert out.device == q.device
    assert_close_to_reference(out, q, k, v)


def test_small_calls_are_what_the_small_triton_entry_admits():
    """The registry's "triton (small)" entry takes calls up to SMALL_ATTENTION_SCORES scores."""
    from rtdiff_cluster.ops.attention import SMALL_ATTENTION_SCORES, _small_scores

    def call(b, h, lq, lk):
        return (torch.empty(b, h, lq, 64, device="meta"), torch.empty(b, h, lk, 64, device="meta"),
                torch.empty(b, h, lk, 64, device="meta"))

    from rtdiff_cluster.ops.attention import _fa4_shape

    assert "keys" in _fa4_shape(*call(1, 10, 4096, 77))  # text cross-attention stays with Triton
    assert _small_scores(*call(1, 20, 1024, 1024)) is None  # SDXL 1024-token self-attention, batch 1
    assert _small_scores(*call(2, 10, 4096, 77)) is None  # its cross-attention, batch 2
    assert "more than" in _small_scores(*call(1, 10, 4096, 4096))  # 4096-token self-attention
    assert 1 * 20 * 1024 * 1024 <= SMALL_ATTENTION_SCORES < 10 * 4096 * 4096


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape,small", [((1, 20, 1024, 1024, 64), True), ((1, 10, 4096, 77, 64), True),
                                         ((1, 10, 4096, 4096, 64), False), ((1, 10, 1024, 1024, 64), True)],
                         ids=["self-1024", "cross-77", "self-4096", "self-1024-of-a-512-frame"])
def test_gpu_registry_sends_small_sdxl_calls_to_triton(shape, small):
    """Small calls go to our Triton kernel, except where FlashAttention 4 is installed and fills the
    GPU (at 1024: 160 and 320 tiles of 128 queries); a 512 frame's 80 tiles stay with Triton."""
    from rtdiff_cluster.ops.attention import AttentionRegistry, _fa4_shape

    reg = AttentionRegistry()
    q, k, v = _blhd(*shape, torch.bfloat16, seed=3)
    chosen = reg.pick(q, k, v).name
    if reg.installed()["flash-attn 4"] is None and _fa4_shape(q, k, v) is None:
        assert chosen == "flash-attn 4", chosen  # faster than both where its tiles fill the GPU
    elif reg.installed()["triton (small)"] is None:
        assert (chosen == "triton (small)") is small, chosen
    assert_close_to_reference(reg(q, k, v), q, k, v)


FLASH_ATTN = ["flash-attn 4", "flash-attn 3", "flash-attn 2"]
FLASH_SHAPES = {
    "sdxl-self-1024-b1": (1, 20, 1024, 1024, 64),
    "sdxl-self-4096-b1": (1, 10, 4096, 4096, 64),
    "sdxl-cross-256-b2": (2, 10, 4096, 256, 64),
    "flux-joint-4608": (1, 24, 4608, 4608, 128),
    "awkward-d40": (4, 6, 1000, 333, 40),
    "awkward-d256": (6, 27, 67, 1031, 256),
}


def _flash_registry(name):
    from rtdiff_cluster.ops.attention import AttentionRegistry

    reg = AttentionRegistry(allowed=[name])
    if reg.installed()[name] is not None:
        pytest.skip(reg.installed()[name])
    return reg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(FLASH_SHAPES))
@pytest.mark.parametrize("name", FLASH_ATTN)
def test_gpu_flash_attn_backend_matches_reference(name, shape, dtype):
    """Each flash-attn package that imports, called as the registry calls it (the [B, L, H, D]
    layout the processors make), under the same tolerance policy as our kernel."""
    reg = _flash_registry(name)
    q, k, v = _blhd(*FLASH_SHAPES[shape], dtype, seed=7)
    assert reg.pick(q, k, v).name == name
    assert_close_to_reference(reg(q, k, v), q, k, v)
    scale = 0.3  # a scale other than 1/sqrt(d), as attention processors may pass
    assert_close_to_reference(reg(q, k, v, scale), q, k, v, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", FLASH_ATTN)
def test_gpu_flash_attn_backend_replays_in_a_cuda_graph(name):
    """The replica captures whole steps: a captured call, replayed on new inputs written into the
    same buffers, gives what an eager call on those inputs gives."""
    reg = _flash_registry(name)
    q, k, v = _blhd(1, 20, 1024, 1024, 64, torch.bfloat16, seed=1)
    reg(q, k, v)  # first call outside the capture: JIT compilation, kernel selection
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = reg(q, k, v)
    q2, k2, v2 = _blhd(1, 20, 1024, 1024, 64, torch.bfloat16, seed=2)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, reg(q, k, v))
    assert_close_to_reference(out, q, k, v)


def test_flash_attn_2_is_not_taken_for_flash_attn_4s_package(monkeypatch):
    """flash-attn-4 installs a `flash_attn` package that holds only `cute`: FA2's entry must see
    that its function is missing rather than fail at the first call."""
    import sys
    import types

    from rtdiff_cluster.ops.attention import AttentionRegistry

    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert AttentionRegistry().installed()["flash-attn 2"] == "flash_attn has no flash_attn_func"


def test_a_backend_that_raises_is_dropped_for_that_kind_and_the_next_runs_it(caplog):
    """A library kernel may refuse inputs its guards admitted, with any exception (FA4 asserts):
    the call still returns the next backend's result, a warning names the backend, and later
    calls of that kind go straight to the next one."""
    from rtdiff_cluster.ops.attention import AttentionRegistry, Backend, _math

    calls = []

    def refuses(q, k, v, scale):
        calls.append(q.shape)
        raise AssertionError("head dim not supported by this build")

    flaky = Backend("flaky", lambda: None, lambda q, k, v: None, refuses)
    reference = Backend("math", lambda: None, lambda q, k, v: None, _math)
    reg = AttentionRegistry(backends=[flaky, reference])
    q, k, v = _qkv(1, 2, 17, 23, 16, torch.float32, device="cpu")
    with caplog.at_level("WARNING", logger="rtdiff.attention"):
        out = reg(q, k, v)
    assert_close_to_reference(out, q, k, v)
    assert "attention backend flaky failed" in caplog.text and "head dim not supported" in caplog.text
    q2, k2, v2 = _qkv(1, 2, 31, 23, 16, torch.float32, seed=1, device="cpu")
    assert reg.pick(q2, k2, v2).name == "math"  # the same kind of call, another shape
    assert_close_to_reference(reg(q2, k2, v2), q2, k2, v2)
    assert len(calls) == 1
