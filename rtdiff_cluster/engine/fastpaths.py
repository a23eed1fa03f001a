"""Puts a loaded model on the fast paths this replica's device supports, and says which it took.

On CUDA, by default: attention through the backend registry (ops/attention.py), the fused Triton
kernels in the backbone and the VAE (ops/fused.py, ops/processors.py), channels-last convolutions
for UNets and VAEs, optionally FP8 linears (quant/fp8.py), and CUDA graphs per shape bucket
(engine/graphs.py); its frames' JPEG encoding runs on the GPU (engine/gpu_jpeg.py). Every path
falls back cleanly: on a CPU replica, without Triton, on a GPU too
old for FP8, the model runs diffusers' modules as loaded, and the report says why.

The report (path -> what was done, or "off: why") goes to the replica's log and, through
ReplicaInfo, to the gateway's startup log.
"""

from __future__ import annotations

import logging

import torch

from rtdiff_cluster.config import FastPathConfig
from rtdiff_cluster.engine.gpu_jpeg import GpuJpeg, GpuJpegDecoder
from rtdiff_cluster.engine.graphs import GraphCache
from rtdiff_cluster.models.base import LoadedModel
from rtdiff_cluster.ops.attention import AttentionRegistry

log = logging.getLogger("rtdiff.fastpaths")


def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401

        import rtdiff_kernels.group_norm_silu  # noqa: F401
    except Exception as e:
        return f"Triton kernels unavailable ({type(e).__name__}: {e})"
    return None


def _counts(done: dict[str, int]) -> str:
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(done.items())) or "nothing to fuse"


class FastPaths:
    """What apply() did to one model, and the objects the pipeline needs from it."""

    def __init__(self) -> None:
        self.report: dict[str, str] = {}
        self.registry: AttentionRegistry | None = None
        self.graphs: GraphCache | None = None
        self.jpeg: GpuJpeg | None = None  # the frames' JPEG encoder on the GPU, where it runs
        self.jpeg_decoder: GpuJpegDecoder | None = None  # JPEG input frames' decoder on the GPU, where it runs
        self.compile_attention_for_new_shapes = True  # FastPathConfig's; set by apply()

    def seal_attention(self) -> None:
        """After the warm-up frame: unless configured otherwise, attention shapes met from now on
        go to backends that build no kernel per shape (ops/attention.py)."""
        if self.registry is not None and not self.compile_attention_for_new_shapes:
            self.registry.seal()

    def attention_choices(self) -> str:
        """After the warm-up: which backend each kind of attention call took."""
        if self.registry is None:
            return self.report.get("attention", "")
        return "; ".join(f"{k}: {v}" for k, v in self.registry.choices().items()) or "no call yet"


def fp8_applies(model: LoadedModel, cfg: FastPathConfig) -> bool:
    """Whether apply() converts the model's linears to FP8: asked for, on a GPU with FP8 tensor cores."""
    return (cfg.quantization == "fp8" and model.device.type == "cuda"
            and torch.cuda.get_device_capability(model.device) >= (8, 9))


def fp8_linears(backbone: torch.nn.Module, cfg: FastPathConfig, fused_inputs: bool) -> dict:
    """The backbone's linears wide enough to gain from FP8 (cfg.fp8_min_features output features;
    any input width) in float8, in place; quantize_linears' report. fused_inputs (the fused kernels
    are on): also the out projection of every GEGLU feed-forward, whatever its width, since its
    input comes quantised from the GEGLU kernel (ops/fused.py). The resnets' stacked time-embedding
    projection (ops/fused.batch_time_embeddings) stays in the model's dtype whenever this runs: it
    is one row of conditioning that offsets every resnet's norm2 input, where FP8 saves a few
    microseconds and quantises the conditioning itself. (benchmarks/roofline.py converts a built
    model, so there it was FP8 once: roofline-2026-11-25-*-sdxl-temb.md, FP8 step error against
    fp32 1.92e-2, against 1.76e-2 in the run before the batching.)"""
    from rtdiff_cluster.ops.fused import geglu_feed_forward_outputs
    from rtdiff_cluster.quant.fp8 import quantize_linears

    ff_outs = geglu_feed_forward_outputs(backbone) if fused_inputs else set()
    return quantize_linears(backbone, min_features=16, min_out_features=cfg.fp8_min_features,
                            skip=lambda name, linear: name.startswith("rtdiff_time_embeddings."),
                            any_width=lambda name, linear: id(linear) in ff_outs)


def fuse_vae(vae: torch.nn.Module) -> bool:
    """Whether a VAE runs our fused modules in channels-last: the tiny VAE (its blocks as cuDNN's
    fused calls; 1024 decode 1.78 ms against 3.77 as loaded) and the KL VAE (resnets' GroupNorm +
    SiLU, upsampling, convolution biases; 1024 decode 22.4 ms against 84.0 as loaded and 35.7
    compiled, encode 12.5 against 46.1; H200, benchmarks/results/roofline-2026-11-25-*-vae.md).
    Others stay as loaded."""
    return type(vae).__name__ in ("AutoencoderTiny", "AutoencoderKL")


def prepare_vae(vae: torch.nn.Module, registry: AttentionRegistry, kernels: bool) -> dict[str, str]:
    """A CUDA replica's VAE, in place: its attention (the KL VAE's mid-blocks) through the
    registry, and where fuse_vae says so and the kernels run, our fused modules in channels-last.
    Returns what was done, for the report: {"attention": ..., "kernels": ...}."""
    from rtdiff_cluster.ops import fused, processors

    done = {"attention": f"{processors.install(vae, registry, fused=False)} attention modules"}
    if kernels and fuse_vae(vae):
        done["kernels"] = _counts(fused.install_fused(vae))
        vae.to(memory_format=torch.channels_last)
    return done


def apply(model: LoadedModel, cfg: FastPathConfig, world: int) -> FastPaths:
    """Modifies model in place. world: ranks of the replica (graphs capture single-rank replicas)."""
    fp = FastPaths()
    r = fp.report
    if model.device.type != "cuda":
        for path in ("attention", "kernels", "fp8", "cuda_graphs"):
            r[path] = "off: CPU replica (diffusers' modules as loaded)"
        r["jpeg"] = r["jpeg_decode"] = "off: CPU replica (PIL on the host)"
        if cfg.quantization == "fp8":
            log.warning("%s: fast_paths.quantization=fp8 ignored: FP8 matmuls need a CUDA GPU", model.limits.name)
        return fp

    from rtdiff_cluster.ops import fused, processors

    backbone, vae = model.backbone, model.vae
    missing = None if not cfg.kernels else _triton_missing()
    why_not_kernels = "off: fast_paths.kernels is false" if not cfg.kernels else missing and f"off: {missing}"

    # Before quantising: the fused q/k/v layers are the ones FP8 then converts.
    fused_qkv = processors.fuse_projections(backbone)
    batched_kv = processors.batch_cross_kv(backbone) if model.kind != "flux" else 0
    if fp8_applies(model, cfg):
        q = fp8_linears(backbone, cfg, fused_inputs=why_not_kernels is None)
        r["fp8"] = (f"on: {q['replaced']} linears ({q['bytes_before'] / 2**30:.2f} -> "
                    f"{q['bytes_after'] / 2**30:.2f} GiB), {q['skipped']} left in {str(model.dtype).removeprefix('torch.')}")
    elif cfg.quantization == "fp8":
        major, minor = torch.cuda.get_device_capability(model.device)
        r["fp8"] = f"off: needs compute capability 8.9+, this GPU has {major}.{minor}"
    else:
        r["fp8"] = "off: fast_paths.quantization is none"

    allowed = None if cfg.attention == "auto" else [cfg.attention] + (["sdpa"] if cfg.attention not in ("sdpa", "math") else [])
    fp.registry = AttentionRegistry(allowed=allowed)
    fp.compile_attention_for_new_shapes = cfg.compile_attention_for_new_shapes
    usable = [name for name, why in fp.registry.installed().items() if why is None]
    n = processors.install(backbone, fp.registry, fused=why_not_kernels is None)
    vae_done = prepare_vae(vae, fp.registry, kernels=why_not_kernels is None)
    r["attention"] = (f"registry on {n} attention modules ({fused_qkv} with fused q/k/v projections, "
                      f"{batched_kv} cross-attentions' keys and values as one matmul) and {vae_done['attention']} "
                      f"of the VAE; usable here: {', '.join(usable)}")

    if why_not_kernels is None:
        done = fused.install_fused(backbone)
        if world == 1:  # a sharded replica's projections are split by its plan; they keep their own
            batched_temb = fused.batch_time_embeddings(backbone)
            if batched_temb:
                done["resnet time-embedding projections as one matmul"] = batched_temb
        gemm_geglu = fused.geglu_projections_fusable(backbone, model.device)
        if gemm_geglu:
            done["geglu projections in one Triton GEMM where the call is large"] = gemm_geglu
        # cuDNN's convolutions run NHWC natively (NCHW costs transposes around each one); the
        # fused GroupNorm reads either layout. Flux's backbone has no convolutions.
        if model.kind != "flux":
            backbone.to(memory_format=torch.channels_last)
        layouts = ([] if model.kind == "flux" else ["backbone"]) + (["vae"] if "kernels" in vae_done else [])
        r["kernels"] = (f"on: {_counts(done)}{'; vae: ' + vae_done['kernels'] if 'kernels' in vae_done else ''}; "
                        f"channels-last convolutions in {' and '.join(layouts) or 'nothing'}")
    else:
        r["kernels"] = why_not_kernels

    if not cfg.cuda_graphs:
        r["cuda_graphs"] = "off: fast_paths.cuda_graphs is false"
    elif world > 1:
        # Collectives inside captured graphs need every rank to capture and replay in step, and
        # NCCL's graph support checked on multi-GPU machines; not validated here yet.
        r["cuda_graphs"] = f"off: replica spans {world} ranks (single-rank replicas only for now)"
    else:
        fp.graphs = GraphCache(model.device, cfg.max_graphs, cfg.graph_memory_mb << 20,
                               eager_first=cfg.graph_capture_at_call == 2, aside=cfg.graph_capture_aside)
        r["cuda_graphs"] = (f"on: per (batch, height, width) bucket, loops of <= {cfg.loop_graph_max_steps} noise-free "
                            f"steps with the decode; <= {cfg.max_graphs} graphs, {cfg.graph_memory_mb} MiB; "
                            + ("regions, new stream sizes and batch sizes captured aside" if cfg.graph_capture_aside
                               else "every bucket captured on the serving path"))
    if not cfg.gpu_jpeg:
        r["jpeg"] = r["jpeg_decode"] = "off: fast_paths.gpu_jpeg is false"
    elif world > 1:
        # Its frames come back in host memory, and its inputs are broadcast to the ranks decoded.
        r["jpeg"] = r["jpeg_decode"] = f"off: replica spans {world} ranks (PIL on the host)"
    else:
        fp.jpeg, r["jpeg"] = GpuJpeg.probe(model.device)
        fp.jpeg_decoder, r["jpeg_decode"] = GpuJpegDecoder.probe(model.device)
    for path, what in r.items():
        log.info("%s fast path %s: %s", model.limits.name, path, what)
    return fp
