"""Exec probe for a gateway serving TLS: kubelet's own gRPC probe speaks plaintext only.

Asks grpc.health.v1 on 127.0.0.1 for the whole server's status. Exits 0 on SERVING and 1 otherwise,
with the reason on stderr (kubectl describe pod shows it). The server certificate is verified
against ca.crt of --tls-dir, or tls.crt itself when the secret holds no CA (a self-signed server).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls-dir", type=Path, required=True, help="the mounted TLS secret (tls.crt, optional ca.crt)")
    p.add_argument("--server-name", required=True, help="a name the server certificate holds")
    p.add_argument("--client-dir", type=Path, help="mutual TLS: tls.crt and tls.key to present")
    p.add_argument("--timeout", type=float, default=4.0)
    args = p.parse_args(argv)

    ca = args.tls_dir / "ca.crt"
    roots = (ca if ca.is_file() else args.tls_dir / "tls.crt").read_bytes()
    key = chain = None
    if args.client_dir:
        key = (args.client_dir / "tls.key").read_bytes()
        chain = (args.client_dir / "tls.crt").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
    options = [("grpc.ssl_target_name_override", args.server_name)]
    with grpc.secure_channel(f"127.0.0.1:{args.port}", creds, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"health check failed: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"health: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
