"""Typed configuration: one ServerConfig flows from the CLI or a TOML file to every component.

Bounds are checked at construction; a bad value raises ValueError naming the field by its path
(for example `models[0].replicas`). No module reads environment variables on its own.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {message}")


ATTENTION_CHOICES = ("auto", "flash-attn 4", "flash-attn 3", "cudnn", "flash-attn 2", "torch flash", "triton", "sdpa", "math")


@dataclass
class FastPathConfig:
    """Which fast paths a CUDA replica takes (engine/fastpaths.py); the startup log says which it
    took and why it skipped the others. A CPU replica runs diffusers' modules as they are."""

    kernels: bool = True
    """Fused Triton kernels (GroupNorm+SiLU, adaLN, QK RMSNorm+rotary, GEGLU, GEMM+GELU) and
    channels-last convolutions."""
    attention: str = "auto"
    """`auto`: per call, the fastest backend that can run it (flash-attn 4/3, our Triton kernel for
    small calls, cuDNN, flash-attn 2, PyTorch flash, Triton); a backend's name: only that one, then
    the math reference."""
    compile_attention_for_new_shapes: bool = False
    """Whether an attention backend that builds a kernel per shape (cuDNN; our Triton kernel for
    small calls, which autotunes per size bucket) may take shapes first met after the replica's
    warm-up frame. Off: those run on the next backend (PyTorch's flash), so a new batch size,
    resolution or chunk-cache region builds or tunes no attention kernel on the serving path: a
    new SDXL bucket's first frame took 0.1-0.3 s longer with cuDNN building, and warm replays were
    within 2% (H200, benchmarks/results/new_bucket-2026-11-24-*-ab.md)."""
    quantization: str = "none"
    """`none` or `fp8`: the backbone's large linears in float8 (per-channel weights, per-token
    activations; needs compute capability 8.9 or newer). It pays on large token counts only: an
    SDXL step on an H200 took 16.75 ms against 17.8 in bf16 at 1024x1024, and 8.74 against 8.30 at
    512x512, where cuBLAS's FP8 matmuls of a few hundred tokens are slower than its bf16 ones
    (benchmarks/results/unet_profile-2026-11-24-*-batched-kv.md)."""
    fp8_min_features: int = 2048
    """Linears with fewer output features stay in bf16. Quantising a linear's input per token costs
    in proportion to its input features K, the matmul it speeds up to K x N: small N does not pay
    (kernels/bench_fp8.py on an H200, end to end against bf16: 1280->1280 0.78x, 5120->1280 1.04x,
    1280->10240 1.26x, 3072->12288 1.54x). With the fused kernels on, a GEGLU feed-forward's out
    projection is converted whatever its width: the GEGLU kernel writes its input quantised."""
    cuda_graphs: bool = True
    """Capture the step, the decode and short noise-free loops as CUDA graphs per shape bucket."""
    max_graphs: int = 64
    """Captured graphs kept (least recently used dropped first). They share one memory pool, so a
    graph costs its static inputs and outputs beyond the largest working set."""
    graph_memory_mb: int = 16384
    """Device memory the kept graphs may hold (their shared pool, inputs and outputs), in MiB;
    beyond it every graph is dropped and the pool starts over."""
    loop_graph_max_steps: int = 8
    """Schedules of at most this many steps run as one graph with the decode."""
    graph_capture_at_call: int = 1
    """Which call of a new (batch, size, schedule) bucket captures its graph. 1: the first (after
    warm-up runs): one slow frame per new bucket, the better choice for streams. 2: the first runs
    eagerly and the second captures without warm-up runs: the slowest call is 30-45% shorter and a
    bucket met once is never captured (services of many one-off sizes), but a stream meeting a new
    size pays two slow frames (H200: a new 768x1024 SDXL frame 269-333 ms, then 103-135 ms, against
    390-591 ms once; benchmarks/NOTES.md)."""
    graph_capture_aside: bool = True
    """Capture on a thread of its own, off the serving path, the graphs a frame can do without for
    a while: a chunk-cache region (computed meanwhile as a larger region whose graphs are ready,
    else as a whole frame), a frame at a size new to its stream (computed at the stream's last
    size meanwhile, input and output resized on the GPU, and the response's applied size says
    so), a whole loop of a step count new at its size (run step by step meanwhile) and a batch
    size that captured sizes cover (split into them meanwhile). Off: each is captured on the
    serving path when first needed (0.2-0.6 s for an SDXL frame on an H200). On an H200 a governed
    SDXL stream's worst frames while it met new buckets went from 1.2-2.3 s to 0.12-0.14 s, and it
    held the same rate after them (54.3 against 54.8 fps); a chunk-cache stream's region shapes
    first met later fall back to whole frames once each (benchmarks/NOTES.md)."""
    gpu_jpeg: bool = True
    """Encode JPEG frames on the GPU (nvJPEG through torchvision) where it imports: 0.2-0.4 ms a
    1024 frame against 4.2-7.0 ms on a host core with PIL (benchmarks/image_codec.py, H200). Its
    frames keep full-resolution colour (4:4:4), so they are larger than PIL's 4:2:0 at the same
    quality. Also decode JPEG input frames there: the gateway then checks only their headers and
    sends them on compressed. Single-GPU replicas; others encode and decode on the host."""

    def validate(self, path: str) -> None:
        _check(self.attention in ATTENTION_CHOICES, f"{path}.attention",
               f"must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")
        _check(self.quantization in ("none", "fp8"), f"{path}.quantization", f"must be none or fp8, got {self.quantization!r}")
        _check(16 <= self.fp8_min_features <= 1 << 20, f"{path}.fp8_min_features",
               f"must be in 16..1048576, got {self.fp8_min_features}")
        _check(1 <= self.max_graphs <= 1024, f"{path}.max_graphs", f"must be in 1..1024, got {self.max_graphs}")
        _check(64 <= self.graph_memory_mb <= 1 << 22, f"{path}.graph_memory_mb",
               f"must be in 64..4194304, got {self.graph_memory_mb}")
        _check(0 <= self.loop_graph_max_steps <= 1000, f"{path}.loop_graph_max_steps",
               f"must be in 0..1000, got {self.loop_graph_max_steps}")
        _check(self.graph_capture_at_call in (1, 2), f"{path}.graph_capture_at_call",
               f"must be 1 or 2, got {self.graph_capture_at_call!r}")


@dataclass
class StreamCacheConfig:
    """Chunk-based caching of image-to-image streams (cache/chunk_cache.py): only the chunks whose
    input changed are recomputed; a frame with none changed is answered from the cache."""

    enabled: bool = True
    """Off: every stream frame is computed whole. A frame can also turn it off (cache_threshold < 0)."""
    chunk_px: int = 64
    """Side of a chunk in pixels: the unit of change detection and of reuse."""
    threshold: float = 2.0
    """A chunk is recomputed when its input's mean absolute change since it was last computed
    exceeds this many 0-255 levels (a webcam's sensor noise is about 1-2); frames may override it."""
    halo_px: int = 64
    """Context computed around the changed chunks and then discarded: the convolutions and the
    attention at the region's edge see real neighbours instead of padding."""
    max_region_fraction: float = 0.5
    """A region larger than this fraction of the frame is not worth cutting out: the whole frame is
    computed."""
    region_buckets: int = 4
    """Region sizes are rounded up to multiples of 1/region_buckets of the frame per axis, so a
    moving object reuses a few shapes (each one CUDA graph) instead of one per frame."""
    region_batch: int = 4
    """At most this many frames' regions of one shape (a stream's consecutive frames, or several
    streams') are computed in one launch on a single-GPU replica; 1: one by one. A batch of 4
    regions of 512 cost 2.2x one on an H200 (SDXL at 1024, results/region_batch-*.md): at those
    sizes the backbone is bound by its launches and its occupancy, not by its arithmetic."""
    hold_regions: bool = True
    """On a single-GPU replica, regions wait while the GPU has not yet started the replica's latest
    launch, so that the regions of the batches arriving meanwhile join them (up to region_batch);
    they are queued behind that launch as it starts. Off: each batch's regions are launched at its
    end."""
    memory_mb: int = 1024
    """Cache memory per replica, in MiB: a 1024x1024 stream holds 3 MiB of reference input on the
    model's device (where changes are measured), 3 MiB of output in host memory and, on a GPU,
    3 MiB of pinned host memory its frames are uploaded from. The least
    recently used streams are dropped beyond it and start again with a whole frame."""
    dit_token_kv: bool = False
    """DiTs (Flux) on a single-GPU replica: a region's attention also sees the keys and values of
    the frame's static image tokens, recorded by the stream's last whole frame (cache/token_kv.py).
    At one step the region's tokens then get exactly the whole frame's output. Costs device memory
    per stream, counted in memory_mb: for Flux-dev at 1024, about 2.9 GiB per denoising step, and
    time: with 10% of the frame moving, Flux-dev at 1024 on an H200 ran 2.17x faster than whole
    frames with it, 2.97x without, for +4.7 dB on the recomputed chunks (67.5 against 62.8). Off
    by default: both are far above what a viewer sees, and the regions alone are faster."""

    def validate(self, path: str) -> None:
        _check(8 <= self.chunk_px <= 1024, f"{path}.chunk_px", f"must be in 8..1024, got {self.chunk_px}")
        _check(math.isfinite(self.threshold) and 0 <= self.threshold <= 255, f"{path}.threshold",
               f"must be in 0..255, got {self.threshold}")
        _check(0 <= self.halo_px <= 1024, f"{path}.halo_px", f"must be in 0..1024, got {self.halo_px}")
        _check(0 < self.max_region_fraction <= 1, f"{path}.max_region_fraction",
               f"must be in (0, 1], got {self.max_region_fraction}")
        _check(1 <= self.region_buckets <= 64, f"{path}.region_buckets", f"must be in 1..64, got {self.region_buckets}")
        _check(1 <= self.region_batch <= 64, f"{path}.region_batch", f"must be in 1..64, got {self.region_batch}")
        _check(1 <= self.memory_mb <= 1 << 22, f"{path}.memory_mb", f"must be in 1..4194304, got {self.memory_mb}")


@dataclass
class AdaptiveStepsConfig:
    """Requests with target_psnr_db run the fewest steps whose output stays within that PSNR of the
    8-step output (engine/adaptive_steps.py): measured per size, sampler and strength on the first
    frame that asks, then re-checked on live frames."""

    audit_every_frames: int = 200
    """Every this many frames of one setting, a frame is also computed with 8 steps and the chosen
    steps' PSNR re-measured; below the target, the setting is calibrated again. 0: never re-checked."""
    max_settings: int = 64
    """Calibrations kept per replica (least recently used dropped)."""

    def validate(self, path: str) -> None:
        _check(0 <= self.audit_every_frames <= 1_000_000, f"{path}.audit_every_frames",
               f"must be in 0..1000000, got {self.audit_every_frames}")
        _check(1 <= self.max_settings <= 65536, f"{path}.max_settings", f"must be in 1..65536, got {self.max_settings}")


@dataclass
class ModelConfig:
    source: str = "synthetic:tiny"
    """What to serve: a synthetic preset (`synthetic:tiny`, `synthetic:sdxl`, `synthetic:flux-dev`, ...)
    or the path of a local diffusers directory (model_index.json; SD, SDXL or Flux)."""
    name: str = ""
    """The name clients use; empty means the source."""
    replicas: int = 1
    """Engine replicas of this model (data parallel); the gateway routes across them."""
    tp: int = 1
    """Tensor-parallel degree: GPUs (one Ray actor each) that hold one shard of the backbone."""
    cfg_parallel: int = 1
    """2: classifier-free guidance's unconditional and conditional passes run on two GPU groups
    (each of tp GPUs) at once; a replica then spans tp x 2 GPUs."""
    vae: str = ""
    """Empty: the model's own VAE. `tiny`: (presets) a seeded AutoencoderTiny of TAESD's shape. A path:
    a diffusers VAE folder (e.g. an AutoencoderTiny) used instead of the model's."""
    variant: str = ""
    """Weights variant of a diffusers directory (e.g. `fp16` reads `*.fp16.safetensors`)."""
    device: str = "auto"
    """`auto` (CUDA when the replica has a GPU), `cpu` or `cuda`."""
    dtype: str = "auto"
    """`auto` (bfloat16 on CUDA, float32 on CPU), `float32`, `float16` or `bfloat16`."""
    num_cpus: float = 1.0
    """Ray CPUs reserved per rank."""
    num_gpus: float = -1.0
    """Ray GPUs per rank (a replica has tp x cfg_parallel ranks); -1: one when the Ray cluster has
    GPUs and device is not `cpu`."""
    torch_threads: int = 0
    """Intra-op threads per rank; 0: on CPU the node's cores but one (left to serving) divided
    among the model's ranks, on CUDA 2 (more only spin on a GPU rank's small host-side work)."""
    prompt_cache_size: int = 256
    """Prompt embeddings kept per replica (LRU)."""
    max_images_per_request: int = 8
    """Upper bound of GenerateRequest.num_images."""
    max_prompt_chars: int = 1000
    """Longest prompt accepted, in characters."""
    weights_seed: int = 0
    """Seed of a synthetic preset's random weights."""
    max_restarts: int = -1
    """How often Ray restarts a dead replica; -1: always."""
    warmup: bool = True
    """Run one frame at the default size before reporting ready."""
    fast_paths: FastPathConfig = field(default_factory=FastPathConfig)
    """Kernels, attention backends, quantisation and CUDA graphs (CUDA replicas)."""
    stream_cache: StreamCacheConfig = field(default_factory=StreamCacheConfig)
    """Chunk-based caching of image-to-image streams."""
    adaptive_steps: AdaptiveStepsConfig = field(default_factory=AdaptiveStepsConfig)
    """Steps chosen by measured error for requests with a quality target."""

    @property
    def served_name(self) -> str:
        return self.name or self.source

    @property
    def ranks(self) -> int:
        """Processes (and GPUs, on GPU) per replica."""
        return self.tp * self.cfg_parallel

    def validate(self, path: str) -> None:
        _check(bool(self.source.strip()), f"{path}.source", "must not be empty")
        _check(1 <= self.replicas <= 1024, f"{path}.replicas", f"must be in 1..1024, got {self.replicas}")
        _check(1 <= self.tp <= 64, f"{path}.tp", f"must be in 1..64, got {self.tp}")
        _check(self.cfg_parallel in (1, 2), f"{path}.cfg_parallel", f"must be 1 or 2, got {self.cfg_parallel}")
        _check(self.device in ("auto", "cpu", "cuda"), f"{path}.device", f"must be auto, cpu or cuda, got {self.device!r}")
        _check(self.dtype in ("auto", "float32", "float16", "bfloat16"), f"{path}.dtype",
               f"must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        _check(0 <= self.num_cpus <= 1024, f"{path}.num_cpus", f"must be in 0..1024, got {self.num_cpus}")
        _check(self.num_gpus == -1 or 0 <= self.num_gpus <= 64, f"{path}.num_gpus",
               f"must be -1 (auto) or in 0..64, got {self.num_gpus}")
        _check(self.num_gpus <= 0 or self.device != "cpu", f"{path}.num_gpus",
               "must be 0 or -1 when device is cpu")
        _check(0 <= self.torch_threads <= 1024, f"{path}.torch_threads", f"must be in 0..1024, got {self.torch_threads}")
        _check(0 <= self.prompt_cache_size <= 1_000_000, f"{path}.prompt_cache_size",
               f"must be in 0..1000000, got {self.prompt_cache_size}")
        _check(1 <= self.max_images_per_request <= 256, f"{path}.max_images_per_request",
               f"must be in 1..256, got {self.max_images_per_request}")
        _check(1 <= self.max_prompt_chars <= 100_000, f"{path}.max_prompt_chars",
               f"must be in 1..100000, got {self.max_prompt_chars}")
        _check(0 <= self.weights_seed < 2**63, f"{path}.weights_seed", "must be in 0..2^63-1")
        _check(self.max_restarts >= -1, f"{path}.max_restarts", f"must be -1 or more, got {self.max_restarts}")
        self.fast_paths.validate(f"{path}.fast_paths")
        self.stream_cache.validate(f"{path}.stream_cache")
        self.adaptive_steps.validate(f"{path}.adaptive_steps")


@dataclass
class BatchingConfig:
    max_batch_size: int = 8
    """Frames in one batch sent to a replica."""
    max_queue_delay_ms: float = 5.0
    """How long the oldest queued frame may wait for a batch to fill while its replica is busy. An idle
    replica takes a batch at once, and so does a busy one when no caller outside the batch sent a
    frame in the last second (a lone live stream: nothing could join it)."""
    max_queue_size: int = 64
    """Frames queued per model; beyond it requests get RESOURCE_EXHAUSTED at once."""
    max_queue_time_s: float = 60.0
    """A frame queued longer than this is answered DEADLINE_EXCEEDED, even without a client deadline."""
    max_inflight_batches_per_replica: int = 2
    """Batches a replica holds at once: 2 lets one encode on CPU while the next computes."""
    stream_max_inflight: int = 4
    """Frames of one stream in flight; beyond it the server stops reading the stream (flow control)."""

    def validate(self, path: str) -> None:
        _check(1 <= self.max_batch_size <= 256, f"{path}.max_batch_size", f"must be in 1..256, got {self.max_batch_size}")
        _check(0 <= self.max_queue_delay_ms <= 10_000, f"{path}.max_queue_delay_ms",
               f"must be in 0..10000, got {self.max_queue_delay_ms}")
        _check(1 <= self.max_queue_size <= 100_000, f"{path}.max_queue_size",
               f"must be in 1..100000, got {self.max_queue_size}")
        _check(0 < self.max_queue_time_s <= 3600, f"{path}.max_queue_time_s",
               f"must be in (0, 3600], got {self.max_queue_time_s}")
        _check(1 <= self.max_inflight_batches_per_replica <= 64, f"{path}.max_inflight_batches_per_replica",
               f"must be in 1..64, got {self.max_inflight_batches_per_replica}")
        _check(1 <= self.stream_max_inflight <= 256, f"{path}.stream_max_inflight",
               f"must be in 1..256, got {self.stream_max_inflight}")


@dataclass
class TLSConfig:
    cert_file: str = ""
    """PEM server certificate; with key_file enables TLS."""
    key_file: str = ""
    """PEM private key of cert_file."""
    client_ca_file: str = ""
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def validate(self, path: str) -> None:
        _check(bool(self.cert_file) == bool(self.key_file), f"{path}.key_file" if self.cert_file else f"{path}.cert_file",
               "cert_file and key_file must be given together")
        _check(not self.client_ca_file or self.enabled, f"{path}.client_ca_file", "mutual TLS needs cert_file and key_file")
        for name in ("cert_file", "key_file", "client_ca_file"):
            value = getattr(self, name)
            _check(not value or Path(value).is_file(), f"{path}.{name}", f"no such file: {value}")


@dataclass
class AuthConfig:
    token_file: str = ""
    """File of accepted bearer tokens, one per line; when set every call but health needs one."""

    def validate(self, path: str) -> None:
        if self.token_file:
            p = Path(self.token_file)
            _check(p.is_file(), f"{path}.token_file", f"no such file: {self.token_file}")
            _check(any(line.strip() for line in p.read_text().splitlines()), f"{path}.token_file",
                   f"{self.token_file} holds no token")


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    """Address the gRPC server binds."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int = 9400
    """Prometheus /metrics port; 0 picks a free one, -1 disables."""
    ray_address: str = ""
    """Empty: start a local Ray in-process; `auto` or `host:port`: join that cluster."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long queued and running work may take before it is answered UNAVAILABLE."""
    stats_interval_s: float = 1.0
    """How often the gateway polls replicas for GPU power, energy and cache statistics."""
    fps_window_s: float = 10.0
    """Sliding window of the frames-per-second gauge."""
    log_level: str = "INFO"
    models: list[ModelConfig] = field(default_factory=lambda: [ModelConfig()])
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check(bool(self.host), "host", "must not be empty")
        _check(0 <= self.port <= 65535, "port", f"must be in 0..65535, got {self.port}")
        _check(-1 <= self.metrics_port <= 65535, "metrics_port", f"must be -1 or in 0..65535, got {self.metrics_port}")
        _check(self.port == 0 or self.port != self.metrics_port, "metrics_port", "must differ from port")
        _check(0 <= self.drain_timeout_s <= 3600, "drain_timeout_s", f"must be in 0..3600, got {self.drain_timeout_s}")
        _check(0.05 <= self.stats_interval_s <= 600, "stats_interval_s", f"must be in 0.05..600, got {self.stats_interval_s}")
        _check(1 <= self.fps_window_s <= 3600, "fps_window_s", f"must be in 1..3600, got {self.fps_window_s}")
        _check(self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
               f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        _check(len(self.models) >= 1, "models", "at least one model must be served")
        names = [m.served_name for m in self.models]
        for i, m in enumerate(self.models):
            m.validate(f"models[{i}]")
            _check(m.served_name not in names[:i], f"models[{i}].name", f"duplicate model name {m.served_name!r}")
        self.batching.validate("batching")
        self.tls.validate("tls")
        self.auth.validate("auth")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServerConfig":
        return _build(cls, data, "")

    @classmethod
    def from_file(cls, path: str | Path) -> "ServerConfig":
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"config: no such file: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config: {p} is not valid TOML: {e}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ServerConfig":
        return dataclasses.replace(self, **changes)


def _build(cls: type, data: Any, path: str) -> Any:
    """Builds dataclass `cls` from plain data, type-checking every field and naming unknown keys."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path + '.' if path else ''}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    if cls is ServerConfig:
        return cls(**kwargs)
    obj = cls(**kwargs)
    return obj


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {type(value).__name__}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported config type {hint}")
