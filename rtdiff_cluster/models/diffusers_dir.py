"""Local diffusers directories (a `model_index.json` and one folder per component), as
`save_pretrained` writes them and as checkpoints are distributed.

Supported: the SD 1.x/2.x and SDXL UNet pipelines (their Turbo and LCM students too: the scheduler
and, for LCM, the guidance embedding come from the checkpoint) and Flux. The VAE may be an
AutoencoderTiny when model_index.json names one, or ModelConfig.vae points at a tiny VAE folder.

`inspect_dir` runs in the gateway before any actor starts: it reads model_index.json, every
component's config and the backbone's safetensors headers (not the weights), builds the backbone
on the meta device and shards it for the requested tp, so a missing or corrupt file, an
unsupported class or a tp that does not divide the model fails at once, naming the file or field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rtdiff_cluster.models.base import LoadedModel, ModelLimits
from rtdiff_cluster.models.weights import SafetensorsWeights, WeightsError, build

BACKBONES = {"UNet2DConditionModel": "unet", "FluxTransformer2DModel": "transformer"}
VAES = ("AutoencoderKL", "AutoencoderTiny")
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


class ModelDirError(ValueError):
    """A directory that cannot be served; the message names the file or field."""


@dataclass
class DirLayout:
    root: Path
    kind: str  # sd | sdxl | flux
    backbone_folder: str  # "unet" or "transformer"
    backbone_cls: str
    backbone_config: dict
    vae_folder: Path
    vae_cls: str
    encoders: list[tuple[str, str]]  # (text encoder folder, class) in pipeline order
    tokenizers: list[tuple[str, str]]
    scheduler_cls: str
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool


def _json(path: Path) -> dict:
    if not path.is_file():
        raise ModelDirError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ModelDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return data


def _component(index: dict, name: str, root: Path) -> tuple[str, str] | None:
    entry = index.get(name)
    if entry is None or entry == [None, None]:
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
        raise ModelDirError(f"{root / 'model_index.json'}: {name}: expected [library, class], got {entry!r}")
    return entry[0], entry[1]


def read_layout(root: str | Path, vae_override: str = "") -> DirLayout:
    root = Path(root)
    if not root.is_dir():
        raise ModelDirError(f"model: {root} is not a directory")
    index = _json(root / "model_index.json")
    backbone_name = next((n for n in ("transformer", "unet") if _component(index, n, root)), None)
    if backbone_name is None:
        raise ModelDirError(f"{root / 'model_index.json'}: names neither a unet nor a transformer")
    _, backbone_cls = _component(index, backbone_name, root)
    if backbone_cls not in BACKBONES:
        raise ModelDirError(f"{root / 'model_index.json'}: {backbone_name}: {backbone_cls} is not supported "
                            f"(supported: {', '.join(BACKBONES)})")
    backbone_config = _json(root / backbone_name / "config.json")

    encoders, tokenizers = [], []
    for suffix in ("", "_2"):
        enc = _component(index, f"text_encoder{suffix}", root)
        tok = _component(index, f"tokenizer{suffix}", root)
        if enc is None:
            continue
        if enc[1] not in TEXT_ENCODERS:
            raise ModelDirError(f"{root / 'model_index.json'}: text_encoder{suffix}: {enc[1]} is not supported "
                                f"(supported: {', '.join(TEXT_ENCODERS)})")
        if tok is None:
            raise ModelDirError(f"{root / 'model_index.json'}: text_encoder{suffix} has no tokenizer{suffix}")
        _json(root / f"text_encoder{suffix}" / "config.json")
        if not (root / f"tokenizer{suffix}").is_dir():
            raise ModelDirError(f"{root / f'tokenizer{suffix}'}: missing")
        encoders.append((f"text_encoder{suffix}", enc[1]))
        tokenizers.append((f"tokenizer{suffix}", tok[1]))

    if backbone_cls == "FluxTransformer2DModel":
        kind = "flux"
        if [c for _, c in encoders] != ["CLIPTextModel", "T5EncoderModel"]:
            raise ModelDirError(f"{root / 'model_index.json'}: Flux needs text_encoder CLIPTextModel and "
                                f"text_encoder_2 T5EncoderModel, got {[c for _, c in encoders]}")
    elif len(encoders) == 2:
        kind = "sdxl"
    elif len(encoders) == 1:
        kind = "sd"
    else:
        raise ModelDirError(f"{root / 'model_index.json'}: a UNet pipeline needs one or two text encoders, "
                            f"got {len(encoders)}")
    if kind == "sdxl" and backbone_config.get("addition_embed_type") != "text_time":
        raise ModelDirError(f"{root / 'unet' / 'config.json'}: addition_embed_type: an SDXL pipeline's UNet must "
                            f"use 'text_time', got {backbone_config.get('addition_embed_type')!r}")

    if vae_override:
        vae_folder = Path(vae_override)
        vae_cls = _json(vae_folder / "config.json").get("_class_name", "")
    else:
        vae = _component(index, "vae", root)
        if vae is None:
            raise ModelDirError(f"{root / 'model_index.json'}: names no vae")
        vae_folder, vae_cls = root / "vae", vae[1]
        _json(vae_folder / "config.json")
    if vae_cls not in VAES:
        raise ModelDirError(f"{vae_folder / 'config.json'}: {vae_cls!r} is not a supported VAE (supported: {', '.join(VAES)})")

    sched = _component(index, "scheduler", root)
    if sched is None:
        raise ModelDirError(f"{root / 'model_index.json'}: names no scheduler")
    import diffusers

    if not hasattr(diffusers, sched[1]):
        raise ModelDirError(f"{root / 'model_index.json'}: scheduler: diffusers has no {sched[1]}")
    scheduler_config = _json(root / "scheduler" / "scheduler_config.json")
    return DirLayout(root, kind, backbone_name, backbone_cls, backbone_config, vae_folder, vae_cls, encoders, tokenizers,
                     sched[1], scheduler_config, bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl")))


def backbone_meta(layout: DirLayout) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, layout.backbone_cls)
    try:
        with torch.device("meta"):
            return cls.from_config(layout.backbone_config)
    except Exception as e:
        raise ModelDirError(f"{layout.root / layout.backbone_folder / 'config.json'}: {layout.backbone_cls} cannot be "
                            f"built from it ({type(e).__name__}: {e})") from None


def inspect_dir(root: str | Path, vae_override: str = "", variant: str = "") -> DirLayout:
    """Everything about the files that can be checked without reading weights (the caller checks
    the tp split); raises ModelDirError or WeightsError."""
    layout = read_layout(root, vae_override)
    model = backbone_meta(layout)
    full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    weights = SafetensorsWeights(layout.root / layout.backbone_folder, variant)
    try:
        for name, shape in full_shapes.items():
            file = weights.files.get(name)
            if file is None:
                raise WeightsError(f"{weights.folder}: the checkpoint has no tensor {name!r}")
            stored = tuple(weights._handle(file).get_slice(name).get_shape())
            if stored != shape:
                raise WeightsError(f"{file}: {name!r} has shape {stored} where "
                                   f"{layout.backbone_folder}/config.json needs {shape}")
    finally:
        weights.close()
    return layout


def limits_for(layout: DirLayout, served_name: str, max_images: int, max_prompt_chars: int) -> ModelLimits:
    if layout.kind == "flux":
        return ModelLimits(served_name, "dit", False, 16, 64, 2048, 1024, 1024, 1, 50, 4, 3.5, 20.0,
                           max_images, max_prompt_chars, 8)
    native = int(layout.backbone_config.get("sample_size", 64)) * 8  # the UNet's training resolution
    return ModelLimits(served_name, "unet", False, 64, 64, 2048, native, native, 1, 50, 4, 0.0, 20.0,
                       max_images, max_prompt_chars, 8)


def load_dir(root: str | Path, *, served_name: str, vae_override: str, variant: str, tp: int, tp_rank: int,
             device: torch.device, dtype: torch.dtype, max_images: int, max_prompt_chars: int) -> LoadedModel:
    import diffusers
    import transformers

    from rtdiff_cluster.parallel.plans import plan_for

    layout = read_layout(root, vae_override)
    backbone_cls = getattr(diffusers, layout.backbone_cls)
    plan = plan_for(backbone_meta(layout)) if tp > 1 else None
    weights = SafetensorsWeights(layout.root / layout.backbone_folder, variant)
    try:
        backbone, _ = build(backbone_cls, layout.backbone_config, plan=plan, tp=tp, rank=tp_rank, device=device,
                            dtype=dtype, source=weights)
    finally:
        weights.close()

    vae_config = _json(layout.vae_folder / "config.json")
    vae_weights = SafetensorsWeights(layout.vae_folder, variant if not vae_override else "")
    try:
        vae, _ = build(getattr(diffusers, layout.vae_cls), vae_config, plan=None, tp=1, rank=0, device=device,
                       dtype=dtype, source=vae_weights)
    finally:
        vae_weights.close()

    tokenizers, encoders = [], []
    for (enc_folder, enc_cls), (tok_folder, tok_cls) in zip(layout.encoders, layout.tokenizers):
        tok_class = getattr(transformers, tok_cls, None) or transformers.AutoTokenizer
        try:
            tokenizers.append(tok_class.from_pretrained(layout.root / tok_folder, local_files_only=True))
            encoder = getattr(transformers, enc_cls).from_pretrained(layout.root / enc_folder, local_files_only=True,
                                                                     dtype=dtype, variant=variant or None)
        except (OSError, ValueError) as e:
            raise ModelDirError(f"{layout.root / enc_folder}: cannot load {enc_cls} ({type(e).__name__}: {e})") from None
        encoders.append(encoder.to(device).eval().requires_grad_(False))

    scheduler_class = getattr(diffusers, layout.scheduler_cls)
    scheduler_config = dict(scheduler_class.from_config(layout.scheduler_config).config)
    extras = {"force_zeros_for_empty_prompt": layout.force_zeros_for_empty_prompt}
    if layout.kind == "flux":
        # T5 tokens: FluxPipeline's defaults (512 for dev, 256 for schnell), within what the tokenizer allows
        wanted = 512 if backbone.config.guidance_embeds else 256
        extras["max_sequence_length"] = min(wanted, int(getattr(tokenizers[1], "model_max_length", wanted)))
    return LoadedModel(limits_for(layout, served_name, max_images, max_prompt_chars), layout.kind, tokenizers, encoders,
                       backbone, vae, scheduler_config, scheduler_class, device, dtype, extras=extras, tp=tp)
