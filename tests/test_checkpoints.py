"""Local diffusers directories: each supported pipeline kind loads and reproduces the preset it
was saved from exactly; a sharded replica reads its slices from the directory and matches one
process; and every kind of broken directory fails before any actor starts, naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import save_pipeline, save_tiny_vae
from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.engine.pipeline import BatchSpec, FrameSpec, Pipeline
from rtdiff_cluster.models.registry import check_source, load_model
from rtdiff_cluster.parallel import groups


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "sd": save_pipeline("synthetic:tiny", root / "sd"),
        "sdxl": save_pipeline("synthetic:tiny-sdxl", root / "sdxl"),
        "flux": save_pipeline("synthetic:tiny-flux", root / "flux"),
        "lcm": save_pipeline("synthetic:tiny", root / "lcm", lcm=True),
        "taesd": save_tiny_vae(root / "taesd"),
    }


@pytest.fixture
def single():
    groups.init_single(torch.device("cpu"))
    yield
    groups.destroy()


def frames(model_config: ModelConfig, guidance: float, size: int = 128) -> np.ndarray:
    p = Pipeline(load_model(model_config), prompt_cache_size=4)
    batch = BatchSpec(size, size, 2, guidance, 0.0, [FrameSpec("a harbour", seed=1), FrameSpec("a harbour", seed=2)])
    images, _ = p.run(batch, ["a harbour"] * 2, ["blurry"] * 2)
    return images


@pytest.mark.parametrize("kind, preset, guidance", [
    ("sd", "synthetic:tiny", 5.0), ("sdxl", "synthetic:tiny-sdxl", 5.0), ("flux", "synthetic:tiny-flux", 3.5)])
def test_directory_reproduces_its_preset(single, dirs, kind, preset, guidance):
    check_source(ModelConfig(source=str(dirs[kind])))
    from_dir = frames(ModelConfig(source=str(dirs[kind]), device="cpu"), guidance)
    from_preset = frames(ModelConfig(source=preset, device="cpu"), guidance)
    assert from_dir.shape == (2, 128, 128, 3) and from_dir.std() > 1
    np.testing.assert_array_equal(from_dir, from_preset)


def test_lcm_student_embeds_guidance_and_cannot_split_cfg(single, dirs):
    cfg = ModelConfig(source=str(dirs["lcm"]), device="cpu")
    model = load_model(cfg)
    assert model.scheduler_class.__name__ == "LCMScheduler"
    a, b = frames(cfg, 2.0), frames(cfg, 8.0)
    assert not np.array_equal(a, b), "the guidance scale reaches the UNet through its embedding"
    with pytest.raises(ValueError, match=r"model.cfg_parallel: .* guidance-distilled"):
        check_source(ModelConfig(source=str(dirs["lcm"]), cfg_parallel=2))


def test_tiny_vae_override_decodes(single, dirs):
    full = frames(ModelConfig(source=str(dirs["sd"]), device="cpu"), 0.0)
    tiny = frames(ModelConfig(source=str(dirs["sd"]), device="cpu", vae=str(dirs["taesd"])), 0.0)
    assert tiny.shape == full.shape and not np.array_equal(tiny, full)
    check_source(ModelConfig(source=str(dirs["sd"]), vae=str(dirs["taesd"])))


def test_sharded_replica_reads_its_slices_from_the_directory(ray_cluster, dirs):
    from test_sharded_serving import SHARDING_TOLERANCE, images, serve

    from conftest import spawn

    source = str(dirs["flux"])
    single_g, sharded_g = spawn(1, source=source), spawn(1, source=source, tp=2)
    gws = [serve(single_g, source), serve(sharded_g, source, tp=2)]
    try:
        one = ray_cluster.get(single_g[0].leader.info.remote())
        two = ray_cluster.get(sharded_g[0].leader.info.remote())
        assert two.backbone_bytes < 0.75 * one.backbone_bytes
        ref, got = (images(gw, source, 3.5) for gw in gws)
        for a, b in zip(ref, got):
            assert np.abs(a - b).max() <= SHARDING_TOLERANCE
    finally:
        for gw in gws:
            gw.stop()
        for g in single_g + sharded_g:
            g.kill()


# ---- broken directories -------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _weights(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _break(case: str, d: Path) -> None:
    if case == "no index":
        (d / "model_index.json").unlink()
    elif case == "no config":
        (d / "transformer" / "config.json").unlink()
    elif case == "bad json":
        (d / "transformer" / "config.json").write_text("{ not json")
    elif case == "truncated weights":
        w = _weights(d / "transformer")
        w.write_bytes(w.read_bytes()[:64])
    elif case == "no weights":
        _weights(d / "transformer").unlink()
    elif case == "missing tensor":
        from safetensors.torch import load_file, save_file

        w = _weights(d / "transformer")
        tensors = load_file(w)
        tensors.pop("proj_out.weight")
        save_file(tensors, w)
    elif case == "config mismatch":
        _edit_json(d / "transformer" / "config.json", joint_attention_dim=40)
    elif case == "unsupported backbone":
        _edit_json(d / "model_index.json", transformer=["diffusers", "SD3Transformer2DModel"])
    elif case == "unsupported vae":
        _edit_json(d / "model_index.json", vae=["diffusers", "AutoencoderKLWan"])


@pytest.mark.parametrize("case, message", [
    ("no index", r"model_index.json: missing"),
    ("no config", r"transformer/config.json: missing"),
    ("bad json", r"transformer/config.json: not valid JSON"),
    ("truncated weights", r"diffusion_pytorch_model.safetensors: not a readable safetensors file"),
    ("no weights", r"transformer: no \*.safetensors weights"),
    ("missing tensor", r"the checkpoint has no tensor 'proj_out.weight'"),
    ("config mismatch", r"'context_embedder.weight' has shape \(64, 48\) where transformer/config.json needs \(64, 40\)"),
    ("unsupported backbone", r"SD3Transformer2DModel is not supported"),
    ("unsupported vae", r"'AutoencoderKLWan' is not a supported VAE"),
])
def test_broken_directory_is_rejected_naming_the_file(dirs, tmp_path, case, message):
    d = _copy(dirs["flux"], tmp_path / "model")
    _break(case, d)
    with pytest.raises(ValueError, match=message) as err:
        check_source(ModelConfig(source=str(d)))
    assert str(err.value).startswith("model.source: ")


def test_tp_that_does_not_divide_is_rejected(dirs):
    with pytest.raises(ValueError, match=r"model.tp: tp: 3 does not divide"):
        check_source(ModelConfig(source=str(dirs["flux"]), tp=3))
    check_source(ModelConfig(source=str(dirs["flux"]), tp=4))  # 4 heads, 64 features: fine
