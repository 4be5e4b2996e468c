"""Errors with TF Serving's status codes, and their REST / gRPC renderings."""
from __future__ import annotations

import grpc

# tensorflow_serving/model_servers/http_server.cc: ToHTTPStatusCode
_HTTP_FOR_CODE = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


class ServingError(Exception):
    """A request failure carrying a canonical (gRPC / absl) status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return _HTTP_FOR_CODE.get(self.code, 500)

    def __str__(self) -> str:  # pragma: no cover - trivial
        return f"{self.code.name}: {self.message}"


def invalid_argument(msg: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def not_found(msg: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, msg)


class ServingConfigError(ValueError):
    """A bad flag / option / file given to the server: one line naming the problem and the fix.

    Messages carry no ``privtrain serve:`` prefix; the command-line entry points add it once."""


class PortInUseError(ServingConfigError, OSError):
    """Raised by :class:`ModelServer.start` when a port cannot be bound."""

    def __init__(self, kind: str, host: str, port: int, flag: str):
        self.kind, self.host, self.port, self.flag = kind, host, port, flag
        super().__init__(
            f"the {kind} port {port} on {host} is already in use "
            f"(another `privtrain serve`?). Stop the process holding it "
            f"(e.g. `ss -ltnp 'sport = :{port}'` shows it) or choose another port with {flag} "
            f"(0 picks a free one)."
        )


class InsecureBindError(ServingConfigError):
    """Refusal to listen beyond loopback without TLS or authentication."""

    def __init__(self, host: str):
        self.host = host
        super().__init__(
            f"refusing to listen on {host} without TLS or authentication: anyone who can reach this "
            "address could query the models. Pass --tls-cert/--tls-key (optionally --tls-client-ca for "
            "mutual TLS) and/or --auth-token-file, or listen on loopback only (--host 127.0.0.1).")
