"""TLS, mutual TLS and bearer-token auth, with their failing cases; health stays open for probes."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import metric
from rtdiff_cluster.client.client import ClientTLS, RtdiffClient
from rtdiff_cluster.config import AuthConfig, TLSConfig
from rtdiff_cluster.proto.rtdiff.v1 import diffusion_pb2 as pb

SMALL = dict(width=64, height=64, steps=1)


def fails_with(code: grpc.StatusCode, fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert err.value.code() == code, err.value
    return err.value


def test_tls(make_gateway, certs):
    gw = make_gateway(tls=TLSConfig(cert_file=str(certs.server_cert), key_file=str(certs.server_key)))
    with RtdiffClient(gw.target, tls=ClientTLS(ca_file=str(certs.ca)), timeout_s=60) as c:
        assert c.generate("secure", **SMALL).images[0].width == 64
    with RtdiffClient(gw.target, timeout_s=10) as plain:  # plaintext against a TLS port
        fails_with(grpc.StatusCode.UNAVAILABLE, lambda: plain.list_models())
    with RtdiffClient(gw.target, tls=ClientTLS(), timeout_s=10) as untrusted:  # system roots do not know our CA
        fails_with(grpc.StatusCode.UNAVAILABLE, lambda: untrusted.list_models())


def test_mutual_tls(make_gateway, certs):
    gw = make_gateway(tls=TLSConfig(cert_file=str(certs.server_cert), key_file=str(certs.server_key),
                                    client_ca_file=str(certs.ca)))
    good = ClientTLS(ca_file=str(certs.ca), cert_file=str(certs.client_cert), key_file=str(certs.client_key))
    with RtdiffClient(gw.target, tls=good, timeout_s=60) as c:
        assert c.generate("mutual", **SMALL).images[0].height == 64
    with RtdiffClient(gw.target, tls=ClientTLS(ca_file=str(certs.ca)), timeout_s=10) as no_cert:
        fails_with(grpc.StatusCode.UNAVAILABLE, lambda: no_cert.list_models())
    rogue = ClientTLS(ca_file=str(certs.ca), cert_file=str(certs.rogue_cert), key_file=str(certs.rogue_key))
    with RtdiffClient(gw.target, tls=rogue, timeout_s=10) as c:
        fails_with(grpc.StatusCode.UNAVAILABLE, lambda: c.list_models())


def test_token_auth(make_gateway, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("first-token\n\nsecond-token\n")
    gw = make_gateway(auth=AuthConfig(token_file=str(tokens)))
    for token in ("first-token", "second-token"):
        with RtdiffClient(gw.target, token=token, timeout_s=60) as c:
            assert c.generate("authorized", **SMALL).images
            assert [m.name for m in c.list_models()]
            assert len(list(c.stream([pb.FrameRequest(prompt="s", **SMALL)]))) == 1
    for token in ("", "wrong-token", "first-token-but-longer"):
        with RtdiffClient(gw.target, token=token, timeout_s=10) as c:
            err = fails_with(grpc.StatusCode.UNAUTHENTICATED, lambda: c.generate("no", **SMALL))
            assert "bearer token" in err.details()
            fails_with(grpc.StatusCode.UNAUTHENTICATED, lambda: c.list_models())
            fails_with(grpc.StatusCode.UNAUTHENTICATED, lambda: list(c.stream([pb.FrameRequest(prompt="s", **SMALL)])))
            # Probes carry no token: health stays open.
            health = health_pb2_grpc.HealthStub(c.channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    # A bare token without the Bearer scheme is refused as well.
    with RtdiffClient(gw.target, timeout_s=10) as c:
        fails_with(grpc.StatusCode.UNAUTHENTICATED,
                   lambda: c.stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "first-token"),)))
    assert metric(gw.metrics(), "rtdiff_requests_total", code="UNAUTHENTICATED") >= 10
