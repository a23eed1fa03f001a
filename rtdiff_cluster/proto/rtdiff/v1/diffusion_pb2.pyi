from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_RAW_RGB8: _ClassVar[ImageFormat]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_RAW_RGB8: ImageFormat

class Image(_message.Message):
    __slots__ = ("format", "data", "width", "height", "channels", "seed")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    format: ImageFormat
    data: bytes
    width: int
    height: int
    channels: int
    seed: int
    def __init__(self, format: _Optional[_Union[ImageFormat, str]] = ..., data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "batch_wait_ms", "text_encode_ms", "denoise_ms", "decode_ms", "encode_ms", "total_ms", "replica_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    batch_wait_ms: float
    text_encode_ms: float
    denoise_ms: float
    decode_ms: float
    encode_ms: float
    total_ms: float
    replica_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., batch_wait_ms: _Optional[float] = ..., text_encode_ms: _Optional[float] = ..., denoise_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., replica_ms: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "num_images", "output_format", "jpeg_quality", "input_image", "strength", "sampler", "target_psnr_db", "step_cache_threshold")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    INPUT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    TARGET_PSNR_DB_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    output_format: ImageFormat
    jpeg_quality: int
    input_image: Image
    strength: float
    sampler: str
    target_psnr_db: float
    step_cache_threshold: float
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., jpeg_quality: _Optional[int] = ..., input_image: _Optional[_Union[Image, _Mapping]] = ..., strength: _Optional[float] = ..., sampler: _Optional[str] = ..., target_psnr_db: _Optional[float] = ..., step_cache_threshold: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("model", "images", "timing", "synthetic", "applied")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    timing: Timing
    synthetic: bool
    applied: Applied
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., synthetic: _Optional[bool] = ..., applied: _Optional[_Union[Applied, _Mapping]] = ...) -> None: ...

class Applied(_message.Message):
    __slots__ = ("steps", "sampler", "cache_threshold", "governed", "psnr_db_vs_reference", "steps_reused", "width", "height")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GOVERNED_FIELD_NUMBER: _ClassVar[int]
    PSNR_DB_VS_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    STEPS_REUSED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    steps: int
    sampler: str
    cache_threshold: float
    governed: bool
    psnr_db_vs_reference: float
    steps_reused: int
    width: int
    height: int
    def __init__(self, steps: _Optional[int] = ..., sampler: _Optional[str] = ..., cache_threshold: _Optional[float] = ..., governed: _Optional[bool] = ..., psnr_db_vs_reference: _Optional[float] = ..., steps_reused: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class FrameRequest(_message.Message):
    __slots__ = ("model", "frame_id", "prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "output_format", "jpeg_quality", "input_image", "strength", "cache_threshold", "sampler", "target_psnr_db", "target_fps", "min_steps", "max_cache_threshold", "step_cache_threshold", "min_scale")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    INPUT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    TARGET_PSNR_DB_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPS_FIELD_NUMBER: _ClassVar[int]
    MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_SCALE_FIELD_NUMBER: _ClassVar[int]
    model: str
    frame_id: int
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    output_format: ImageFormat
    jpeg_quality: int
    input_image: Image
    strength: float
    cache_threshold: float
    sampler: str
    target_psnr_db: float
    target_fps: float
    min_steps: int
    max_cache_threshold: float
    step_cache_threshold: float
    min_scale: float
    def __init__(self, model: _Optional[str] = ..., frame_id: _Optional[int] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., jpeg_quality: _Optional[int] = ..., input_image: _Optional[_Union[Image, _Mapping]] = ..., strength: _Optional[float] = ..., cache_threshold: _Optional[float] = ..., sampler: _Optional[str] = ..., target_psnr_db: _Optional[float] = ..., target_fps: _Optional[float] = ..., min_steps: _Optional[int] = ..., max_cache_threshold: _Optional[float] = ..., step_cache_threshold: _Optional[float] = ..., min_scale: _Optional[float] = ...) -> None: ...

class FrameResponse(_message.Message):
    __slots__ = ("frame_id", "image", "timing", "replica", "from_cache", "recomputed_fraction", "applied")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    image: Image
    timing: Timing
    replica: str
    from_cache: bool
    recomputed_fraction: float
    applied: Applied
    def __init__(self, frame_id: _Optional[int] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., replica: _Optional[str] = ..., from_cache: _Optional[bool] = ..., recomputed_fraction: _Optional[float] = ..., applied: _Optional[_Union[Applied, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "synthetic", "size_multiple", "min_size", "max_size", "default_width", "default_height", "min_steps", "max_steps", "default_steps", "max_images_per_request", "max_prompt_chars", "max_guidance_scale", "replicas", "replicas_ready", "samplers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_READY_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    synthetic: bool
    size_multiple: int
    min_size: int
    max_size: int
    default_width: int
    default_height: int
    min_steps: int
    max_steps: int
    default_steps: int
    max_images_per_request: int
    max_prompt_chars: int
    max_guidance_scale: float
    replicas: int
    replicas_ready: int
    samplers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., synthetic: _Optional[bool] = ..., size_multiple: _Optional[int] = ..., min_size: _Optional[int] = ..., max_size: _Optional[int] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., min_steps: _Optional[int] = ..., max_steps: _Optional[int] = ..., default_steps: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_prompt_chars: _Optional[int] = ..., max_guidance_scale: _Optional[float] = ..., replicas: _Optional[int] = ..., replicas_ready: _Optional[int] = ..., samplers: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
