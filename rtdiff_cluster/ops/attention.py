"""Attention with the fastest backend that can run each call: a registry of backends, each with
guard checks (installed, device, dtype, head dim, mask), tried in order.

Order, fastest first as measured at our shapes (DESIGN.md; benchmarks/results/ for this repo's
runs): FlashAttention 4 (`flash_attn.cute`, on Hopper and newer, for calls that fill the GPU over
more than 128 keys: 0.80-0.94x the next fastest backend's time on an H200 at SDXL's and Flux's
self-attention) and 3 (`flash_attn_interface`) when installed, our Triton kernel for small calls
(SMALL_ATTENTION_SCORES: calls too small for cuDNN's kernels to fill the SMs, such as SDXL's text
cross-attention, and its 1024-token self-attention at batch 1 when FA4 is absent), then
PyTorch's cuDNN backend (480-670 TFLOP/s on H100 at head dims 64 and 128, against 290-360 for
PyTorch's own flash backend), FlashAttention 2, PyTorch's flash backend, our Triton kernel (kernels/attention.py), two GEMMs per
block of queries for head dims over 256 (the KL VAE's 512-wide head), then PyTorch's own choice
(`sdpa`), which runs anything; the math reference is there for tests. FlashAttention 4 and 2 are
optional extras (`pip install rtdiff-cluster[flash4]` or `[flash]`); nothing needs them.

diffusers has a dispatcher of its own (attention_dispatch), but it picks one backend per model at
set-up and checks only that the package imports; this one decides per call, so a UNet's
head-dim-64 self-attention and 77-token cross-attention each get what can run them, and a CPU
replica falls through to the math path without configuration. The choice for each kind of call
is made once per shape and remembered (`choices()` tells the startup log).

A serving replica meets shapes it has not seen (a batch of two, a new resolution, a chunk-cache
region), and cuDNN builds its attention kernels per shape, on the frame that brings them: on an
H200 host the first eager SDXL frame of a new bucket took 0.1-0.3 s longer with cuDNN than with
PyTorch's flash backend, whose kernels are built ahead of time, and warm replays were within 2%
(benchmarks/results/new_bucket-2026-11-24-*-ab.md). So once `seal()` is called (the replica calls
it after its warm-up frame), a backend that compiles per shape takes only the shapes it already
ran, and a new shape goes to the next backend whose guards admit it.

All functions take and return [B, H, L, D] tensors (SDPA's layout); no mask, not causal.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("rtdiff.attention")

MAX_REMEMBERED_SHAPES = 4096

Guard = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "str | None"]


@dataclass
class Backend:
    name: str
    installed: Callable[[], "str | None"]  # None when usable on this machine, else why not
    supports: Guard  # None when it can run these inputs, else why not
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None], torch.Tensor]
    compiles_per_shape: bool = False  # its first call at each new shape builds a kernel (seconds)


def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def _cuda_half(q, k, v) -> str | None:
    if q.device.type != "cuda":
        return f"runs on CUDA, not {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"needs float16 or bfloat16, got {q.dtype}"
    return None


def _head_dim(limit: int, multiple: int = 8) -> Guard:
    def check(q, k, v):
        d = q.shape[-1]
        if d > limit or d % multiple or v.shape[-1] != d:
            return f"head dim {d} outside its range (<= {limit}, multiple of {multiple}, same for v)"
        return None
    return check


def _aligned(q, k, v) -> str | None:
    """flash-attn's Hopper kernels load through TMA: 16-byte aligned addresses and strides, the head
    dim contiguous (the fused q/k/v projection's views qualify)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            return f"{name}'s head dim is not contiguous"
        if t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
            return f"{name} is not 16-byte aligned (strides {t.stride()})"
    return None


def _all(*guards: Guard) -> Guard:
    def check(q, k, v):
        for g in guards:
            why = g(q, k, v)
            if why:
                return why
        return None
    return check


def _sdpa(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, scale):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return run


def _sdpa_enabled(flag: str) -> Callable[[], "str | None"]:
    def installed():
        if not torch.cuda.is_available():
            return "no CUDA device"
        if not getattr(torch.backends.cuda, flag)():
            return f"torch.backends.cuda.{flag}() is off"
        return None
    return installed


def _flash_attn(module: str, func: str) -> tuple[Callable, Callable]:
    """flash-attn's packages take [B, L, H, D]; ours are [B, H, L, D] views of that same layout."""
    def installed():
        # flash-attn-4 installs a `flash_attn` package holding only `cute`: FA2's import succeeds
        # there without its function.
        mod = _module(module)
        if mod is None:
            return f"{module} is not installed"
        return None if callable(getattr(mod, func, None)) else f"{module} has no {func}"

    def run(q, k, v, scale):
        fn = getattr(_module(module), func)
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    return installed, run


def _triton_installed() -> str | None:
    try:
        from rtdiff_kernels import attention  # noqa: F401
    except Exception as e:
        return f"kernels unavailable ({type(e).__name__}: {e})"
    return None


def _triton_supports(q, k, v) -> str | None:
    from rtdiff_kernels.attention import supports

    return supports(q, k, v)


def _triton_run(q, k, v, scale):
    from rtdiff_kernels.attention import flash_attention

    return flash_attention(q, k, v, scale=scale)


def _sdpa_default(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _math(q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


# Scores held at once by the blocked-matmul backend (fp32): 256 MiB, a 4096-query block of the
# SDXL VAE's 16,384-token attention at 1024x1024.
BLOCKED_SCORE_BYTES = 1 << 28


def _wide_heads(q, k, v) -> str | None:
    d = q.shape[-1]
    return None if d > 256 else f"head dim {d}: the flash-type backends above run it (this one is for d > 256)"


def _scores(q_block: torch.Tensor, k_t: torch.Tensor) -> torch.Tensor:
    """q_block @ k_t in fp32 ([BH, r, D] x [BH, D, Lk]). On CUDA the half-precision GEMM writes
    fp32 directly (out_dtype): a logit of 20 rounded to bf16 is off by up to 0.06, which moves its
    softmax weight by 6%. Elsewhere (CPU tests) in fp32."""
    if q_block.is_cuda:
        return torch.bmm(q_block, k_t, out_dtype=torch.float32)
    return torch.bmm(q_block.float(), k_t.float())


def _blocked_matmul(q, k, v, scale):
    """Exact attention as two GEMMs per block of queries, the scores in fp32 and the softmax
    weights rounded to the input dtype before the second GEMM (as flash kernels do). For head dims
    no flash-type kernel here takes: the KL VAE's single 512-wide head over 16,384 tokens at 1024
    ran 3.7 ms in PyTorch's memory-efficient kernel (145 TFLOP/s, H200); as cuBLAS GEMMs and a
    softmax pass it is bound by the GEMMs and the scores' bytes. Blocks keep the scores within
    BLOCKED_SCORE_BYTES, so memory does not grow with Lq. The scale goes into q (one pass over
    q, not over the scores; baddbmm's alpha with an fp32 out_dtype cost a copy of the scores)."""
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    scale = d ** -0.5 if scale is None else scale
    qf = (q * scale).reshape(b * h, lq, d)
    k_t = k.reshape(b * h, lk, d).transpose(1, 2)
    vf = v.reshape(b * h, lk, dv)
    out = torch.empty(b * h, lq, dv, device=q.device, dtype=q.dtype)
    rows = max(1, BLOCKED_SCORE_BYTES // (4 * b * h * max(lk, 1)))
    for i in range(0, lq, rows):
        weights = torch.softmax(_scores(qf[:, i:i + rows], k_t), dim=-1).to(v.dtype)
        torch.bmm(weights, vf, out=out[:, i:i + rows])  # in place where the slice is contiguous (b * h == 1)
    return out.view(b, h, lq, dv)


# Score-matrix size (B * H * Lq * Lk) up to which our Triton kernel beats cuDNN. Timed inside CUDA
# graphs on an H200 (benchmarks/results/kernels/bench_attention-2026-11-24-nvidia-h200-graphed.md),
# Triton against cuDNN: SDXL's 1024-token self-attention at batch 1 (2^24.3 scores) 19 against
# 24 us, its 77-token cross-attentions 9 against 11 us (4096 queries) and 6 against 9 us (1024);
# at batch 2 the 1024-token self-attention (2^25.3) is even (32 against 34 us), and from the
# 4096-token self-attention at batch 1 (2^27.3) up cuDNN is faster (112 against 118 us).
SMALL_ATTENTION_SCORES = 2**25


def _small_scores(q, k, v) -> str | None:
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    return None if scores <= SMALL_ATTENTION_SCORES else f"{scores} scores, more than {SMALL_ATTENTION_SCORES}"


# Where FlashAttention 4 is the fastest here, timed in CUDA graphs on an H200
# (benchmarks/results/kernels/bench_attention-2026-11-25-nvidia-h200-fa4.md and the step A/B in
# benchmarks/NOTES.md): its 128-query tiles must fill the GPU, and the keys must be more than one of
# our Triton kernel's short-key passes.
# - SDXL at 1024, self-attention: 160 tiles (20 heads x 8) over 1024 keys, 15.5 against our 19.2 and
#   cuDNN's 23.7 us; 320 tiles over 4096 keys, 94 against cuDNN's 112 us.
# - SDXL at 512, self-attention: 80 and 40 tiles (10 heads x 8, 20 x 2): our Triton kernel was faster
#   (the step's 70 calls, 0.56 ms in FA4 against about 0.4 in ours).
# - Text cross-attention, 77 keys: under one of FA4's 128-wide key tiles, against one or two of our
#   64-wide blocks: 9.0 against 10.2 us at batch 1 (4096 queries), 13.9 against 18.4 at batch 2.
FA4_MIN_KEYS = 129


def _fa4_shape(q, k, v) -> str | None:
    """Only measured on Hopper: on older GPUs FA4 runs a port of its Ampere kernel, and cuDNN or
    FA2 take those calls. Asked once per shape (the registry remembers its choice)."""
    from rtdiff_kernels._launch import sm_count  # torch only: importable without Triton

    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if lk < FA4_MIN_KEYS:
        return f"{lk} keys: our Triton kernel runs fewer than {FA4_MIN_KEYS} faster"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 9:
        return f"compute capability {major}.{minor}: measured on Hopper (9.0) and newer only"
    tiles, sms = b * h * -(-lq // 128), sm_count(q)
    return None if tiles >= sms else f"{tiles} query tiles of 128 on {sms} SMs: the GPU is not filled"


def _registry() -> list[Backend]:
    fa4 = _flash_attn("flash_attn.cute", "flash_attn_func")
    fa3 = _flash_attn("flash_attn_interface", "flash_attn_func")
    fa2 = _flash_attn("flash_attn", "flash_attn_func")
    return [
        Backend("flash-attn 4", fa4[0], _all(_cuda_half, _head_dim(256), _aligned, _fa4_shape), fa4[1]),
        Backend("flash-attn 3", fa3[0], _all(_cuda_half, _head_dim(256), _aligned), fa3[1]),
        # Triton autotunes at the first call of each size bucket: on the serving path that is a stall
        # like cuDNN's per-shape build, so after the warm-up it keeps the shapes it already ran.
        Backend("triton (small)", _triton_installed, _all(_cuda_half, _small_scores, _triton_supports), _triton_run,
                compiles_per_shape=True),
        Backend("cudnn", _sdpa_enabled("cudnn_sdp_enabled"), _all(_cuda_half, _head_dim(128)), _sdpa("CUDNN_ATTENTION"),
                compiles_per_shape=True),
        Backend("flash-attn 2", fa2[0], _all(_cuda_half, _head_dim(256)), fa2[1]),
        Backend("torch flash", _sdpa_enabled("flash_sdp_enabled"), _all(_cuda_half, _head_dim(256)), _sdpa("FLASH_ATTENTION")),
        Backend("triton", _triton_installed, _triton_supports, _triton_run),
        Backend("blocked matmul", lambda: None, _all(_cuda_half, _wide_heads), _blocked_matmul),
        # PyTorch's own pick runs what no guard above admits (fp32 on the GPU, anything on CPU);
        # the math reference is reached only when named alone (tests, debugging).
        Backend("sdpa", lambda: None, lambda q, k, v: None, _sdpa_default),
        Backend("math", lambda: None, lambda q, k, v: None, _math),
    ]


class AttentionRegistry:
    def __init__(self, backends: list[Backend] | None = None, allowed: list[str] | None = None):
        """allowed: backend names to consider, in registry order (None: all)."""
        self.backends = [b for b in (backends or _registry()) if allowed is None or b.name in allowed]
        self._installed = {b.name: b.installed() for b in self.backends}
        self._choice: dict[tuple, Backend] = {}  # kind of call -> its first choice (the startup log's)
        self._later: dict[tuple, set[str]] = {}  # kind of call -> other backends that took some of its shapes
        self._by_shape: dict[tuple, Backend] = {}  # (kind, shapes and strides) -> backend
        self._broken: set[tuple] = set()  # (kind of call, backend name) that raised although its guards passed
        self._sealed = False
        self._warm: set[tuple] = set()  # (backend name, kind, shapes) a per-shape compiling backend has built

    def installed(self) -> dict[str, str | None]:
        """Backend name -> None (usable here) or why not."""
        return dict(self._installed)

    def seal(self) -> None:
        """From now on a backend that compiles per shape runs only the shapes it already ran."""
        self._sealed = True

    def _key(self, q, k, v) -> tuple:
        return (q.device.type, q.dtype, q.shape[-1], q.shape[-2] == k.shape[-2])

    def _admits(self, b: Backend, key: tuple, shape: tuple, q, k, v) -> bool:
        if self._installed[b.name] is not None or (key, b.name) in self._broken or b.supports(q, k, v) is not None:
            return False
        return not (self._sealed and b.compiles_per_shape and (b.name, key, shape) not in self._warm)

    def pick(self, q, k, v) -> Backend:
        key = self._key(q, k, v)
        shape = (q.shape, q.stride(), k.shape, k.stride(), v.stride())
        chosen = self._by_shape.get((key, shape))
        if chosen is not None:
            return chosen
        chosen = next((b for b in self.backends if self._admits(b, key, shape, q, k, v)), None)
        if chosen is None:
            why = "; ".join(f"{b.name}: {self._installed[b.name] or b.supports(q, k, v) or 'not built for this shape'}"
                            for b in self.backends)
            raise RuntimeError(f"attention: no allowed backend runs {q.device.type} {q.dtype} head dim {q.shape[-1]} ({why})")
        if chosen.compiles_per_shape:
            self._warm.add((chosen.name, key, shape))
        if len(self._by_shape) >= MAX_REMEMBERED_SHAPES:
            self._by_shape.clear()  # chunk-cache regions make many shapes; a re-pick is microseconds
        self._by_shape[(key, shape)] = chosen
        new_kind = key not in self._choice
        first = self._choice.setdefault(key, chosen)
        if new_kind:
            log.info("attention for %s %s head dim %d (%s): %s", q.device.type, str(q.dtype).removeprefix("torch."),
                     q.shape[-1], "self" if key[3] else "cross", chosen.name)
        elif first is not chosen and chosen.name not in self._later.setdefault(key, set()):
            self._later[key].add(chosen.name)
            why = ("would build a kernel for this shape, new since the warm-up" if self._sealed and first.compiles_per_shape
                   else "does not run it")
            log.info("attention for %s %s head dim %d (%s), shape %s: %s (%s %s)", q.device.type,
                     str(q.dtype).removeprefix("torch."), q.shape[-1], "self" if key[3] else "cross", tuple(q.shape),
                     chosen.name, first.name, why)
        return chosen

    def __call__(self, q, k, v, scale: float | None = None) -> torch.Tensor:
        if (q.dim() != 4 or q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2] or k.shape[-2] != v.shape[-2]
                or q.shape[-1] != k.shape[-1]):
            raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit [B, H, L, D]")
        backend = self.pick(q, k, v)
        try:
            return backend.run(q, k, v, scale)
        except Exception as e:  # noqa: BLE001 - library kernels raise assertions and value errors too
            # A guard cannot foresee every constraint of a library kernel (strides, alignment): the
            # backend is dropped for this kind of call, loudly, and the next one runs it.
            if backend is self.backends[-1]:
                raise
            key = self._key(q, k, v)
            log.warning("attention backend %s failed on %s (%s); the next backend takes these calls",
                        backend.name, key, str(e).splitlines()[0][:200])
            self._broken.add((key, backend.name))
            self._by_shape = {s: b for s, b in self._by_shape.items() if not (s[0] == key and b is backend)}
            if self._choice.get(key) is backend:
                del self._choice[key]
            return self(q, k, v, scale)

    def choices(self) -> dict[str, str]:
        """What each kind of call seen so far runs on, for the startup log: its first choice, and
        the backends that took the shapes that choice would have had to build a kernel for."""
        return {f"{dev} {str(dt).removeprefix('torch.')} d{d} {'self' if same else 'cross'}":
                b.name + (f" (new shapes: {', '.join(sorted(self._later[(dev, dt, d, same)]))})"
                          if self._later.get((dev, dt, d, same)) else "")
                for (dev, dt, d, same), b in self._choice.items()}
