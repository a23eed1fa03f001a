"""FP8 linears: float8_e4m3fn weights with one scale per output channel, activations quantised
per token at run time, and the product on FP8 tensor cores through torch._scaled_mm.

Why: on Hopper the FP8 tensor cores have twice the bf16 throughput (1979 against 989 dense
TFLOP/s on H100/H200 SXM) and the weights take half the bytes. The big linears of SDXL's
transformer blocks and most of Flux's FLOPs are GEMMs of thousands of tokens, so they are
compute-bound and gain the most. Accuracy: e4m3 keeps 3 mantissa bits, a relative rounding error
of at most 2^-4 per element (about 2.5% rms on normal data). Scaling per token and per channel,
rather than per tensor, keeps one outlier row or column from wasting the others' range.

Dynamic activation scales cost one extra pass over the input (rtdiff_kernels.fp8_quant, a single
read of x and a write of 1 byte per element); torch._scaled_mm applies both scales and the bias in
its epilogue (row-wise scaling: scale_a [M, 1], scale_b [1, N], both fp32).

Off CUDA, or on GPUs older than sm_89 (no FP8 tensor cores), forward() computes the same numbers
by dequantising to fp32 (`forward_reference`); the tests compare the fast path against it.

Model pass: `quantize_linears` swaps eligible nn.Linear modules in place, after the model has its
final device and dtype. A tensor-parallel RowParallelLinear keeps its order of operations: partial
product, all-reduce over the tp group, then the bias, added once.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import nn

from rtdiff_cluster.parallel import groups
from rtdiff_cluster.parallel.layers import RowParallelLinear
from rtdiff_kernels.fp8_quant import quantize_per_token, quantize_per_token_reference

ALIGN = 16  # torch._scaled_mm needs K and N to be multiples of 16 (16-byte aligned fp8 rows)
_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (out_dtype, with bias) -> whether this torch accepts it for row-wise _scaled_mm. Row-wise
# scaling began as bf16-only (CUTLASS); newer builds (cuBLAS >= 12.9) also take fp16, and fp32
# output with a bias is refused, so the first call finds out and the rest remember.
_NATIVE_OUT: dict[tuple[torch.dtype, bool], bool] = {}


@functools.lru_cache(maxsize=None)
def _fp8_tensor_cores(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _uses_scaled_mm(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    return _fp8_tensor_cores(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _scaled_mm(q: torch.Tensor, w: torch.Tensor, scale_x: torch.Tensor, scale_w: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    """q [M, K] fp8 row-major, w [N, K] fp8 (w.t() is the column-major [K, N] that cuBLAS wants),
    scale_x [M, 1], scale_w [1, N] fp32 -> [M, N] in out_dtype."""
    key = (out_dtype, bias is not None)
    native = _NATIVE_OUT.get(key)
    if native is not False:
        try:
            y = torch._scaled_mm(q, w.t(), scale_a=scale_x, scale_b=scale_w, bias=bias, out_dtype=out_dtype,
                                 use_fast_accum=fast_accum)
            _NATIVE_OUT[key] = True
            return y
        except RuntimeError:
            if native:  # worked before: a real error, not an unsupported combination
                raise
            _NATIVE_OUT[key] = False
    # bf16 output is what every row-wise backend supports; its extra rounding (2^-9 relative) is
    # far below fp8's own error.
    y = torch._scaled_mm(q, w.t(), scale_a=scale_x, scale_b=scale_w, out_dtype=torch.bfloat16,
                         use_fast_accum=fast_accum).to(out_dtype)
    return y if bias is None else y + bias


class Fp8Linear(nn.Module):
    """y = x @ (W_fp8 * scale_w)^T + b with x quantised per token on the fly.

    weight: [N, K] float8_e4m3fn buffer; weight_scale: [N] float32 buffer; bias: [N] parameter in
    the activation dtype, or None. row_parallel: the layer was a RowParallelLinear, so the product
    is summed over the tensor-parallel group before the bias is added. fast_accum: passed to
    torch._scaled_mm (faster, but the tensor cores then accumulate without periodic promotion to
    fp32); off by default.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 row_parallel: bool = False, fast_accum: bool = False):
        super().__init__()
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D float8_e4m3fn tensor [N, K], got {weight.dtype} {tuple(weight.shape)}")
        n, k = weight.shape
        if n % ALIGN or k % ALIGN:
            raise ValueError(f"weight: both dims must be multiples of {ALIGN} for torch._scaled_mm, got {tuple(weight.shape)}")
        if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (n,):
            raise ValueError(f"weight_scale must be float32 [{n}], got {weight_scale.dtype} {tuple(weight_scale.shape)}")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be None or [{n}], got {tuple(bias.shape)}")
        self.in_features, self.out_features = k, n
        self.row_parallel = row_parallel
        self.fast_accum = fast_accum
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.contiguous())
        # A parameter, like nn.Linear's, so diffusers' `model.dtype` (first floating parameter)
        # never sees float8; the weight is a buffer for the same reason.
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fast_accum: bool = False) -> "Fp8Linear":
        """Quantises linear's weight once, per output channel (scale = amax over K / 448)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        row_parallel = isinstance(linear, RowParallelLinear)
        if not row_parallel and type(linear).forward is not nn.Linear.forward:
            raise ValueError(f"linear: {type(linear).__name__} overrides nn.Linear.forward; only nn.Linear and "
                             "RowParallelLinear are supported")
        w = linear.weight
        if w.dtype not in _ACT_DTYPES or w.device.type == "meta":
            raise ValueError(f"linear: weight must be a materialised float32/float16/bfloat16 tensor, got {w.dtype} on {w.device}")
        if linear.in_features % ALIGN or linear.out_features % ALIGN:
            raise ValueError(f"linear: in_features and out_features must be multiples of {ALIGN} for torch._scaled_mm, "
                             f"got {linear.in_features} -> {linear.out_features}")
        with torch.no_grad():
            q, scale = quantize_per_token_reference(w.detach())  # a weight row is an output channel
        return cls(q, scale.view(-1), linear.bias, row_parallel=row_parallel, fast_accum=fast_accum)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every floating tensor, fp8 and its fp32 scales included;
        # only device moves may apply to those two. The bias follows the model's dtype.
        weight, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != weight.dtype:
            self.weight = weight.to(self.weight.device)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}], got {getattr(x, 'shape', type(x))}")
        if x.dtype not in _ACT_DTYPES:
            raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
        return x.reshape(-1, self.in_features).contiguous()  # no copy when x is contiguous

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        b = self.bias
        return b if b is None or b.dtype == dtype else b.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x.dtype."""
        x2 = self._flatten(x)
        if x2.shape[0] == 0 or not _uses_scaled_mm(x2):
            return self.forward_reference(x)
        q, scale_x = quantize_per_token(x2)
        return self.forward_fp8(q, scale_x, x2.dtype).view(*x.shape[:-1], self.out_features)

    def forward_fp8(self, q: torch.Tensor, scale_x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The product of an input already quantised per token, by a kernel that produced it
        (rtdiff_kernels: geglu_fp8, add_layer_norm_fp8) or by quantize_per_token: q [M, K]
        float8_e4m3fn, scale_x [M, 1] float32 -> [M, N] in out_dtype. Off the FP8 tensor cores,
        the dequantised fp32 product."""
        if not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn or q.dim() != 2 \
                or q.shape[1] != self.in_features or not q.is_contiguous():
            raise ValueError(f"q must be a contiguous float8_e4m3fn [M, {self.in_features}], "
                             f"got {getattr(q, 'dtype', type(q))} {tuple(getattr(q, 'shape', ()))}")
        if not isinstance(scale_x, torch.Tensor) or scale_x.dtype != torch.float32 \
                or tuple(scale_x.shape) != (q.shape[0], 1):
            raise ValueError(f"scale_x must be float32 [{q.shape[0]}, 1], "
                             f"got {getattr(scale_x, 'dtype', type(scale_x))} {tuple(getattr(scale_x, 'shape', ()))}")
        if out_dtype not in _ACT_DTYPES:
            raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
        if q.shape[0] == 0 or not _uses_scaled_mm(q):
            return self._dequantised(q, scale_x, out_dtype)
        bias = self._bias(out_dtype)
        y = _scaled_mm(q, self.weight, scale_x, self.weight_scale.view(1, -1), None if self.row_parallel else bias,
                       out_dtype, self.fast_accum)
        if self.row_parallel:
            y = groups.all_reduce_tp(y)
            if bias is not None:
                y = y + bias
        return y

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same numbers by dequantising: (x_fp8 * scale_x) @ (W_fp8 * scale_w)^T (+ all-reduce)
        + bias, in fp32, cast to x.dtype. Runs anywhere (the CPU path, and the tests' reference)."""
        x2 = self._flatten(x)
        q, scale_x = quantize_per_token(x2)
        return self._dequantised(q, scale_x, x2.dtype).view(*x.shape[:-1], self.out_features)

    def _dequantised(self, q: torch.Tensor, scale_x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        w = self.weight.float() * self.weight_scale[:, None]
        y = (q.float() * scale_x) @ w.t()
        if self.row_parallel:
            y = groups.all_reduce_tp(y)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"row_parallel={self.row_parallel}, fast_accum={self.fast_accum}")


def _eligible(linear: nn.Linear, min_features: int, min_out_features: int, any_width: bool = False) -> bool:
    n, k = linear.out_features, linear.in_features
    if n % ALIGN or k % ALIGN:
        return False
    if not any_width and (n < max(min_features, min_out_features) or k < min_features):
        return False
    if linear.weight.dtype not in _ACT_DTYPES or linear.weight.device.type == "meta":
        return False
    return isinstance(linear, RowParallelLinear) or type(linear).forward is nn.Linear.forward


def quantize_linears(module: nn.Module, min_features: int = 1024, min_out_features: int = 0,
                     skip: Callable[[str, nn.Linear], bool] | None = None, fast_accum: bool = False,
                     any_width: Callable[[str, nn.Linear], bool] | None = None) -> dict:
    """Replaces, in place, every nn.Linear (RowParallelLinear included) under module whose in and
    out features are both >= min_features and multiples of 16, and whose out features are also >=
    min_out_features, unless skip(qualified_name, linear) says so, with an Fp8Linear. (The output
    width is what pays for the per-token quantisation of the input: that costs in proportion to K,
    the matmul it speeds up to K x N.) Subclasses that override forward are left alone. A Linear shared
    by several parents becomes one Fp8Linear. any_width(qualified_name, linear), when given and
    true, waives the two minimums for that linear (one whose input arrives already quantised, so
    the per-token pass that makes narrow layers lose is not paid). Run it after the model has its
    device and dtype.

    Returns {"replaced": n, "skipped": n, "bytes_before": n, "bytes_after": n}: counts of distinct
    nn.Linear modules, and the weight + bias + scale bytes of the replaced ones.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, nn.Linear):
        raise ValueError("module: is itself an nn.Linear and has no parent to swap it in; use Fp8Linear.from_linear")
    if not isinstance(min_features, int) or min_features < 1:
        raise ValueError(f"min_features must be a positive int, got {min_features!r}")
    if not isinstance(min_out_features, int) or min_out_features < 0:
        raise ValueError(f"min_out_features must be a non-negative int, got {min_out_features!r}")
    done: dict[int, nn.Module] = {}  # id(original) -> its replacement, or itself when skipped
    report = {"replaced": 0, "skipped": 0, "bytes_before": 0, "bytes_after": 0}
    for parent_name, parent in list(module.named_modules()):
        # _modules, not named_children(): that skips a module already seen under another name.
        for child_name, child in list(parent._modules.items()):
            if not isinstance(child, nn.Linear):
                continue
            if id(child) not in done:
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                wide_enough = any_width is not None and any_width(name, child)
                if (_eligible(child, min_features, min_out_features, wide_enough)
                        and not (skip is not None and skip(name, child))):
                    new = Fp8Linear.from_linear(child, fast_accum=fast_accum)
                    bias_bytes = 0 if child.bias is None else child.bias.numel() * child.bias.element_size()
                    report["replaced"] += 1
                    report["bytes_before"] += child.weight.numel() * child.weight.element_size() + bias_bytes
                    report["bytes_after"] += new.weight.numel() + new.weight_scale.numel() * 4 + bias_bytes
                    done[id(child)] = new
                else:
                    report["skipped"] += 1
                    done[id(child)] = child
            if done[id(child)] is not child:
                setattr(parent, child_name, done[id(child)])
    return report


def fidelity(reference: torch.Tensor, test: torch.Tensor) -> dict:
    """How close test is to reference (same shape), computed in float64: rel_l2 = |t - r| / |r|,
    max_abs = max |t - r|, psnr_db = 10 log10(range(r)^2 / mse) with range = max(r) - min(r)
    (inf when equal, nan for a constant reference), cosine = <r, t> / (|r| |t|)."""
    if not isinstance(reference, torch.Tensor) or reference.numel() == 0:
        raise ValueError(f"reference must be a non-empty tensor, got {getattr(reference, 'shape', type(reference))}")
    if not isinstance(test, torch.Tensor) or test.shape != reference.shape:
        raise ValueError(f"test must have reference's shape {tuple(reference.shape)}, got {getattr(test, 'shape', type(test))}")
    r = reference.detach().to(torch.float64).flatten()
    t = test.detach().to(device=r.device, dtype=torch.float64).flatten()
    d = t - r
    err, ref_norm, test_norm = d.norm().item(), r.norm().item(), t.norm().item()
    mse = err * err / r.numel()
    rng = (r.max() - r.min()).item()
    if ref_norm > 0:
        rel = err / ref_norm
    else:
        rel = 0.0 if err == 0 else math.inf
    if ref_norm > 0 and test_norm > 0:
        cos = torch.dot(r, t).item() / (ref_norm * test_norm)
    else:
        cos = 1.0 if ref_norm == test_norm else 0.0
    psnr = math.inf if mse == 0 else (10 * math.log10(rng * rng / mse) if rng > 0 else math.nan)
    return {"rel_l2": rel, "max_abs": d.abs().max().item(), "psnr_db": psnr, "cosine": cos}
