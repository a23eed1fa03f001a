"""kernels/linear.py (Triton GEMM, optionally with the GEGLU gating in its epilogue) against
F.linear and diffusers' GEGLU module.

Tolerance policy as in test_kernels_pointwise.py (`check`): in float16/bfloat16 at most twice
PyTorch's own error against an fp32 reference from the same inputs, plus one ulp of the output's
magnitude; in float32 1e-5 relative. The fused GEGLU is, if anything, closer to fp32 than
diffusers' (its projection is never rounded to the low precision before the gating). On CPU the
kernel runs in Triton's interpreter at small, awkward sizes (rows, columns and K that no block
divides, leading dimensions, no bias); the SDXL sizes run on the GPU.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from rtdiff_kernels.linear import Config, linear, linear_geglu, linear_geglu_reference, linear_reference
from test_kernels_pointwise import DTYPES, check

SMALL = Config(32, 32, 32, 4, 2, group_m=2)  # small blocks: the interpreter runs every program in Python
SMALL_TMA = Config(32, 32, 32, 4, 2, group_m=2, tma=True)
# Where the CPU tensors' kernels would not run (a machine with a GPU, no interpreter), the wrappers
# take the reference and there is no launch to observe.
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="observes launches of Triton's interpreter on CPU tensors")


def _inputs(lead, k, n_out, dtype, seed, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n_out, k, generator=g) / k ** 0.5).to(dtype).to(device)
    b = (torch.randn(n_out, generator=g) * 0.1).to(dtype).to(device) if bias else None
    return x, w, b


def _fp32(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", [((37,), 96, 40), ((2, 9), 200, 70), ((1,), 64, 32), ((5,), 33, 17)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_geglu_matches_reference(dtype, lead, k, n, bias):
    x, w, b = _inputs(lead, k, 2 * n, dtype, seed=k + n, bias=bias)
    h = _fp32(x, w, b)
    ref32 = h[..., :n] * F.gelu(h[..., n:])
    out = linear_geglu(x, w, b, SMALL)
    assert out.shape == (*lead, n)
    check(out, linear_geglu_reference(x, w, b), ref32.to(torch.float32), dtype, f"linear_geglu {lead} {k} {n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", [((37,), 96, 40), ((2, 9), 200, 70), ((3,), 48, 130)])
def test_linear_matches_reference(dtype, lead, k, n):
    x, w, b = _inputs(lead, k, n, dtype, seed=3 * k + n)
    out = linear(x, w, b, SMALL)
    assert out.shape == (*lead, n)
    check(out, linear_reference(x, w, b), _fp32(x, w, b), dtype, f"linear {lead} {k} {n}")


def test_linear_geglu_equals_diffusers_geglu_module():
    from diffusers.models.activations import GEGLU

    torch.manual_seed(5)
    module = GEGLU(48, 40).to(torch.bfloat16)
    x = torch.randn(2, 7, 48).to(torch.bfloat16)
    with torch.no_grad():
        theirs = module(x)
        ours = linear_geglu(x, module.proj.weight, module.proj.bias, SMALL)
        h = _fp32(x, module.proj.weight, module.proj.bias)
    check(ours, theirs, h[..., :40] * F.gelu(h[..., 40:]), torch.bfloat16, "vs diffusers GEGLU")


# TMA's rules hold (K and N times the element size are multiples of 16 bytes), but no block
# divides M, N or K: the descriptors' zero fill and clipped stores do the masking. M = 37 rows make
# 2 row blocks; with 4 programs (the interpreter's SM count) the persistent loop runs more than
# one tile per program.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", [((37,), 96, 40), ((2, 9), 200, 72), ((1,), 48, 8), ((70,), 40, 104)])
@pytest.mark.parametrize("gated", [True, False], ids=["geglu", "plain"])
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "tile-per-program"])
def test_tma_kernel_matches_reference(dtype, lead, k, n, gated, persistent):
    import rtdiff_kernels.linear as linear_mod

    config = dataclasses.replace(SMALL_TMA, persistent=persistent)
    x, w, b = _inputs(lead, k, 2 * n if gated else n, dtype, seed=k + 3 * n)
    assert linear_mod.tma_ready(x.reshape(-1, k), w, torch.empty(x.numel() // k, n, dtype=dtype))
    h = _fp32(x, w, b)
    if gated:
        check(linear_geglu(x, w, b, config), linear_geglu_reference(x, w, b), h[..., :n] * F.gelu(h[..., n:]),
              dtype, f"tma linear_geglu {lead} {k} {n}")
    else:
        check(linear(x, w, b, config), linear_reference(x, w, b), h, dtype, f"tma linear {lead} {k} {n}")


@needs_interpreter
def test_tma_config_falls_back_where_tma_cannot_read(monkeypatch):
    """Rows of 70 bf16 values (140 bytes) break TMA's 16-byte rule: the pointer kernel runs and
    gives the same answer; an aligned call takes the TMA kernel."""
    import rtdiff_kernels.linear as linear_mod

    launched = []
    for name in ("_linear_kernel", "_linear_tma_kernel"):
        kernel = getattr(linear_mod, name)
        monkeypatch.setattr(linear_mod, name, _Recorded(kernel, name, launched))
    x, w, b = _inputs((9,), 70, 64, torch.bfloat16, seed=2)
    out = linear_geglu(x, w, b, SMALL_TMA)
    assert launched == ["_linear_kernel"]
    check(out, linear_geglu_reference(x, w, b), (lambda h: h[:, :32] * F.gelu(h[:, 32:]))(_fp32(x, w, b)),
          torch.bfloat16, "fallback")
    linear_geglu(*_inputs((9,), 64, 64, torch.bfloat16, seed=2), SMALL_TMA)
    assert launched == ["_linear_kernel", "_linear_tma_kernel"]


class _Recorded:
    """A Triton kernel whose launches are recorded by name."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@needs_interpreter
def test_geglu_config_takes_large_half_precision_calls_that_tma_can_read(monkeypatch):
    import rtdiff_kernels.linear as linear_mod

    monkeypatch.setattr(linear_mod, "_GEGLU_MIN_OUTPUTS", 2048 * 64)
    x, w = torch.randn(2048, 64).to(torch.bfloat16), torch.randn(128, 64).to(torch.bfloat16)
    assert linear_mod.geglu_config(x, w) == Config(linear_mod._GEGLU_BLOCK_M, linear_mod._GEGLU_BLOCK_N,
                                                   linear_mod._GEGLU_BLOCK_K, linear_mod._GEGLU_WARPS,
                                                   linear_mod._GEGLU_STAGES, linear_mod._GEGLU_GROUP_M,
                                                   tma=bool(linear_mod._GEGLU_TMA),
                                                   persistent=bool(linear_mod._GEGLU_PERSISTENT))
    assert linear_mod.geglu_config(x[:-1], w) is None  # too few outputs: cuBLAS + geglu
    assert linear_mod.geglu_config(x.float(), w.float()) is None  # fp32 keeps F.linear's exact product
    assert linear_mod.geglu_config(x.t().contiguous().t(), w) is None  # columns apart: TMA cannot read x
    odd = torch.randn(2048, 60).to(torch.bfloat16)
    assert linear_mod.geglu_config(odd, torch.randn(128, 60).to(torch.bfloat16)) is None  # 120-byte rows
    monkeypatch.setattr(linear_mod, "_FUSED_GEGLU", 0)
    assert linear_mod.geglu_config(x, w) is None


def test_strided_rows_and_empty():
    x, w, b = _inputs((6,), 64, 48, torch.float32, seed=9)
    wide = torch.cat([x, x], dim=-1)[:, :64]  # rows 128 apart
    check(linear(wide, w, b, SMALL), linear_reference(x, w, b), _fp32(x, w, b), torch.float32, "strided rows")
    assert linear_geglu(torch.empty(0, 64), w, b, SMALL).shape == (0, 24)
    # K = 0: the product is empty, the bias alone remains.
    e = linear(torch.empty(3, 0), torch.empty(5, 0), torch.arange(5.0), SMALL)
    assert torch.equal(e, torch.arange(5.0).expand(3, 5))


def test_bad_input():
    x = torch.randn(4, 8)
    cases = [
        (lambda: linear([1.0], torch.ones(2, 8)), "^x must be a tensor"),
        (lambda: linear(x.int(), torch.ones(2, 8)), "^x must be float32"),
        (lambda: linear(x, torch.ones(2, 7)), "^weight must be \\[N, K\\]"),
        (lambda: linear(x, torch.ones(2, 8, dtype=torch.float16)), "^weight must have x's dtype"),
        (lambda: linear(x, torch.ones(2, 8), torch.ones(3)), "^bias must be None or \\[2\\]"),
        (lambda: linear_geglu(x, torch.ones(3, 8)), "^weight: GEGLU needs an even number"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# SDXL's transformer linears at 1024 and 512 (tokens, K, N out) and a ragged shape, with the
# configurations kernels/bench_linear.py found fastest.
GPU_SHAPES = [(1024, 1280, 10240, True), (4096, 640, 5120, True), (256, 1280, 10240, True), (1024, 1280, 1280, False),
              (256, 1280, 1280, False), (4096, 640, 640, False), (1000, 1000, 2002, True), (1000, 1000, 2000, True),
              (77, 2048, 520, False)]  # the last two: TMA's rules hold, no block divides M, N or K


GPU_CONFIGS = [Config(128, 128, 64, 8, 3), Config(64, 128, 64, 4, 4), Config(128, 64, 64, 4, 4),
               Config(128, 128, 64, 8, 3, tma=True), Config(128, 64, 64, 4, 4, tma=True),
               Config(128, 128, 64, 8, 3, tma=True, persistent=False), Config(128, 256, 64, 8, 3, tma=True)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,k,n_out,gated", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=str)
def test_gpu_sdxl_shapes(m, k, n_out, gated, dtype, config):
    if gated and config.block_n == 256:
        # A GEGLU stage holds x's tile and two of W's: 80 KB at 128 x 256 x 64, three stages over
        # the 227 KB of shared memory a Hopper block may have.
        pytest.skip("does not fit in shared memory with the gate's tiles")
    x, w, b = _inputs((m,), k, n_out, dtype, seed=m + k, device="cuda")
    h = _fp32(x, w, b)
    if gated:
        n = n_out // 2
        check(linear_geglu(x, w, b, config), linear_geglu_reference(x, w, b), h[:, :n] * F.gelu(h[:, n:]), dtype,
              f"linear_geglu {m}x{k}x{n_out}")
    else:
        check(linear(x, w, b, config), linear_reference(x, w, b), h, dtype, f"linear {m}x{k}x{n_out}")
