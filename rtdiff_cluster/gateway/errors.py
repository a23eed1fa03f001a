"""The one exception type that carries a gRPC status from anywhere in the gateway to the RPC."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, message: str) -> RequestError:
    """INVALID_ARGUMENT whose message starts with the offending field's name."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}")
