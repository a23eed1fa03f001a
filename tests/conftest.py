"""Shared fixtures: one real local Ray for the session, replicas shared by many gateways.

Each gateway runs on its own asyncio loop in a background thread (BackgroundGateway); tests talk to
it through the real client over loopback gRPC.
"""

from __future__ import annotations

import os

import torch

# Triton kernels run in Triton's interpreter where there is no GPU (CI); set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import datetime  # noqa: E402
import ipaddress
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from rtdiff_cluster.config import BatchingConfig, ModelConfig, ServerConfig, StreamCacheConfig
from rtdiff_cluster.gateway.background import BackgroundGateway

TINY = "synthetic:tiny"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from rtdiff_cluster.engine.group import connect_ray

    connect_ray("", 16)
    yield ray
    ray.shutdown()


def spawn(count: int = 1, **model_kw):
    """Started replicas (ReplicaGroups) of the tiny model, on CPU unless asked otherwise: the
    serving tests time their blockers for CPU speed, and CI has no GPU anyway (tests/test_gpu.py
    covers CUDA)."""
    import asyncio

    from rtdiff_cluster.engine.group import spawn_replicas

    model_kw.setdefault("device", "cpu")
    model_kw.setdefault("source", TINY)
    groups = spawn_replicas(ModelConfig(replicas=count, num_cpus=0.5, **model_kw), 0.2)

    async def start_all():
        await asyncio.gather(*(g.start() for g in groups))

    asyncio.run(start_all())
    return groups


@pytest.fixture(scope="session")
def tiny_actors(ray_cluster):
    groups = spawn(1)
    yield groups
    for g in groups:
        g.kill()


class GatewayThread(BackgroundGateway):
    def metrics(self) -> dict[tuple, float]:
        return scrape(self.gateway.metrics_port)


def scrape(port: int) -> dict[tuple, float]:
    """GET /metrics and parse it: {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def gateway_config(**kw) -> ServerConfig:
    """A loopback server on free ports serving the shared tiny replicas, without warm-up."""
    batching = kw.pop("batching", BatchingConfig())
    model = kw.pop("model", ModelConfig(source=TINY, warmup=False))
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=0, stats_interval_s=0.2, models=[model],
                        batching=batching, **kw)


@pytest.fixture
def make_gateway(tiny_actors):
    made: list[GatewayThread] = []

    def make(actors=None, **kw) -> GatewayThread:
        g = GatewayThread(gateway_config(**kw), {TINY: actors or tiny_actors})  # actors: ReplicaGroups
        made.append(g)
        return g

    yield make
    for g in made:
        g.stop()


# Small chunks, so the tests' small frames hold many of them.
FINE_CHUNKS = StreamCacheConfig(chunk_px=32, halo_px=32)


@pytest.fixture(scope="module")
def fine_chunks_gateway(ray_cluster):
    """A gateway over its own tiny replica whose stream chunk cache uses FINE_CHUNKS."""
    actors = spawn(1, stream_cache=FINE_CHUNKS)
    g = GatewayThread(gateway_config(model=ModelConfig(source=TINY, warmup=False, stream_cache=FINE_CHUNKS)),
                      {TINY: actors})
    yield g
    g.stop()
    for a in actors:
        a.kill()


@pytest.fixture(scope="session")
def shared_gateway(tiny_actors):
    g = GatewayThread(gateway_config(batching=BatchingConfig(max_queue_delay_ms=2.0)), {TINY: tiny_actors})
    yield g
    g.stop()


@pytest.fixture
def client(shared_gateway):
    from rtdiff_cluster.client.client import RtdiffClient

    with RtdiffClient(shared_gateway.target, timeout_s=120) as c:
        yield c


def wait_until(cond, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by a CA the server does not trust
    rogue_key: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = tmp_path_factory.mktemp("certs")
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path):
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    def make_ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(ca_key, ca_cert, cn, server: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("rtdiff test CA")
    rogue_ca_key, rogue_ca_cert = make_ca("rogue CA")
    files = {}
    for label, (k, c) in {"server": leaf(ca_key, ca_cert, "localhost", True),
                          "client": leaf(ca_key, ca_cert, "client", False),
                          "rogue": leaf(rogue_ca_key, rogue_ca_cert, "rogue", False)}.items():
        (d / f"{label}.crt").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        write_key(k, d / f"{label}.key")
        files[label] = (d / f"{label}.crt", d / f"{label}.key")
    (d / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return Certs(d / "ca.crt", *files["server"], *files["client"], *files["rogue"])
