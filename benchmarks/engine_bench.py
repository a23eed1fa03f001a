"""What the engine-level benchmarks share: the model options with their per-device defaults, a
single-rank engine on its fast paths as a replica would load it, and device-stamped results.
(benchmarks/ is not a package; the scripts import this from their own folder.)"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Callable

from sharding import stamp

DEFAULTS = {"cuda": ("synthetic:sdxl", "tiny", 1024), "cpu": ("synthetic:tiny", "", 256)}


def add_model_args(ap: argparse.ArgumentParser, default_device: str) -> None:
    ap.add_argument("--device", default=default_device)
    ap.add_argument("--source", default="", help="model (default: SDXL on CUDA, the tiny preset on CPU)")
    ap.add_argument("--vae", default="", help="default: the tiny VAE on CUDA")
    ap.add_argument("--size", type=int, default=0, help="frame side (default: 1024 on CUDA, 256 on CPU)")


def resolve_model_args(args, cpu_size: int | None = None) -> None:
    """Fills the options left empty with the device's defaults."""
    source, vae, size = DEFAULTS["cuda" if args.device == "cuda" else "cpu"]
    args.source = args.source or source
    args.vae = args.vae or vae
    args.size = args.size or (cpu_size if cpu_size and args.device != "cuda" else size)


def load_engine(args):
    """(model, fast paths) on one rank of args.device, as a replica loads them by default."""
    import torch

    from rtdiff_cluster.config import FastPathConfig, ModelConfig
    from rtdiff_cluster.engine import fastpaths
    from rtdiff_cluster.models.registry import load_model
    from rtdiff_cluster.parallel import groups

    device = torch.device(args.device)
    groups.init_single(device)
    model = load_model(ModelConfig(source=args.source, device=device.type, vae=args.vae))
    fp8_min = getattr(args, "fp8_min_features", None)
    attention = getattr(args, "attention", None)
    cfg = FastPathConfig(quantization="fp8" if getattr(args, "fp8", False) else "none",
                         **({"fp8_min_features": fp8_min} if fp8_min else {}),
                         **({"attention": attention} if attention else {}),
                         compile_attention_for_new_shapes=getattr(args, "compile_attention_for_new_shapes", False),
                         # Benchmarks time steady states: captured aside, a new bucket's graph could
                         # land in the middle of the timed calls (they run step by step until then).
                         graph_capture_aside=False)
    return model, fastpaths.apply(model, cfg, world=1)


def source_tag(args) -> str:
    """"" for the device's default model, else the model's name as a file-name suffix."""
    default = DEFAULTS["cuda" if args.device == "cuda" else "cpu"][0]
    return "" if args.source == default else re.sub(r"[^a-z0-9]+", "-", args.source.lower()).strip("-")


def write_results(benchmark: str, device: str, fields: dict, out_dir: str, markdown: Callable[[dict], str],
                  tag: str = "") -> dict:
    """Stamps fields with the device, library versions and date, writes
    <benchmark>-<date>-<device>[-<tag>].{json,md} under out_dir, prints the markdown and returns the result."""
    st = stamp(device)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{device}-{st['gpu_name'] or st['cpu'] or 'unknown'}".lower()).strip("-")
    result = {"benchmark": benchmark, **st, "device_slug": slug, "date": st["date_utc"][:10], **fields}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{benchmark}-{result['date']}-{slug}" + (f"-{tag}" if tag else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / f"{name}.md").write_text(text)
    print(text)
    return result
