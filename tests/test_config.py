"""Configuration: defaults are valid, every bad value names its field, files and flags compose."""

from __future__ import annotations

import pytest

from rtdiff_cluster.cli import build_parser, config_from_args
from rtdiff_cluster.config import BatchingConfig, ModelConfig, ServerConfig, TLSConfig


def test_defaults_are_valid():
    cfg = ServerConfig()
    assert cfg.models[0].served_name == "synthetic:tiny" and cfg.port == 50051


@pytest.mark.parametrize("make,field", [
    (lambda: ServerConfig(port=70000), "port"),
    (lambda: ServerConfig(metrics_port=-2), "metrics_port"),
    (lambda: ServerConfig(models=[]), "models"),
    (lambda: ServerConfig(models=[ModelConfig(replicas=0)]), "models[0].replicas"),
    (lambda: ServerConfig(models=[ModelConfig(), ModelConfig()]), "models[1].name"),
    (lambda: ServerConfig(models=[ModelConfig(device="tpu")]), "models[0].device"),
    (lambda: ServerConfig(models=[ModelConfig(device="cpu", num_gpus=1)]), "models[0].num_gpus"),
    (lambda: ServerConfig(batching=BatchingConfig(max_batch_size=0)), "batching.max_batch_size"),
    (lambda: ServerConfig(batching=BatchingConfig(max_queue_delay_ms=-1)), "batching.max_queue_delay_ms"),
    (lambda: ServerConfig(tls=TLSConfig(cert_file="/nonexistent.crt")), "tls.key_file"),
    (lambda: ServerConfig(tls=TLSConfig(client_ca_file="/x")), "tls.client_ca_file"),
    (lambda: ServerConfig(log_level="LOUD"), "log_level"),
])
def test_bad_values_name_their_field(make, field):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(f"{field}:"), str(err.value)


def test_toml_file_with_nested_sections(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("""
port = 6000
metrics_port = -1
[batching]
max_batch_size = 16
max_queue_delay_ms = 2.5
[[models]]
source = "synthetic:tiny"
name = "tiny-a"
replicas = 2
[[models]]
source = "synthetic:tiny"
name = "tiny-b"
""")
    cfg = ServerConfig.from_file(path)
    assert cfg.port == 6000 and cfg.metrics_port == -1
    assert cfg.batching.max_batch_size == 16 and cfg.batching.max_queue_delay_ms == 2.5
    assert [(m.served_name, m.replicas) for m in cfg.models] == [("tiny-a", 2), ("tiny-b", 1)]


@pytest.mark.parametrize("text,field", [
    ("prot = 1", "prot"),
    ("port = 'x'", "port"),
    ("[batching]\nmax_batch_size = 1.5", "batching.max_batch_size"),
    ("[[models]]\nreplicas = true", "models[0].replicas"),
    ("[[models]]\nflavour = 'x'", "models[0].flavour"),
    ("port = [", "config"),
])
def test_bad_file_names_field(tmp_path, text, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        ServerConfig.from_file(path)
    assert str(err.value).startswith(f"{field}:"), str(err.value)


def test_flags_override_file(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("port = 6000\n[batching]\nmax_batch_size = 16\n[[models]]\nreplicas = 3\n")
    args = build_parser().parse_args(["serve", "--config", str(path), "--port", "7000", "--replicas", "2",
                                      "--max-queue-delay-ms", "9", "--ray-address", "auto"])
    cfg = config_from_args(args)
    assert cfg.port == 7000 and cfg.ray_address == "auto"
    assert cfg.models[0].replicas == 2 and cfg.batching.max_batch_size == 16 and cfg.batching.max_queue_delay_ms == 9


def test_example_config_loads_and_matches_defaults():
    from pathlib import Path

    cfg = ServerConfig.from_file(Path(__file__).resolve().parent.parent / "deploy" / "config.example.toml")
    assert cfg == ServerConfig()
