"""Transport security: TLS / mutual-TLS server credentials and a bearer-token interceptor."""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from rtdiff_cluster.config import AuthConfig, TLSConfig

# Probes must reach health without a token (Kubernetes gRPC probes send none).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials | None:
    if not tls.enabled:
        return None
    key = Path(tls.key_file).read_bytes()
    cert = Path(tls.cert_file).read_bytes()
    ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def load_tokens(auth: AuthConfig) -> list[bytes]:
    if not auth.token_file:
        return []
    return [line.strip().encode() for line in Path(auth.token_file).read_text().splitlines() if line.strip()]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except health checks."""

    def __init__(self, tokens: list[bytes], on_reject=None):
        self._tokens = tokens
        self._on_reject = on_reject

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                raw = value.encode() if isinstance(value, str) else value
                if not raw.startswith(b"Bearer "):
                    return False
                presented = raw[len(b"Bearer "):].strip()
                # compare_digest against every token: the time taken says nothing about which matched
                return any([hmac.compare_digest(presented, t) for t in self._tokens])
        return False

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES) or self._authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if self._on_reject:
            self._on_reject(method)
        return _rejecting_handler(handler)


def _rejecting_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that answers UNAUTHENTICATED."""
    message = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream_out(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)

    async def stream_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(streaming, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream_out, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)
