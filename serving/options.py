"""Server options: request limits, TLS and bearer-token auth, and the rule that only loopback may be
served without either. Shared by ``privtrain serve`` and ``python -m serving.server`` (same flags).

Every problem with a flag or a file raises :class:`~serving.errors.ServingConfigError` with one line
naming it and the fix; nothing here imports TensorFlow (so bad flags fail in milliseconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import hmac
import ipaddress
import os
import socket
import ssl
from typing import List, Optional

from .errors import InsecureBindError, ServingConfigError

MiB = 1024 * 1024


@dataclasses.dataclass
class ServerOptions:
    """Limits and security of the built-in server (defaults in brackets are the flags' defaults).

    max_body_bytes: largest REST request body, Content-Length or chunked [64 MiB]; larger: 413.
    max_header_bytes: largest request line + headers [64 KiB]; larger: 400 and the connection closed.
    read_timeout_s: time allowed to receive one request's headers, and again its body, and the
      longest a keep-alive connection may sit idle [30 s]; then the connection is closed.
    max_connections: open REST connections [512]; more are answered 503 and closed.
    max_concurrent_requests: REST requests being computed or queued for computation [128]; more
      are answered 429 (RESOURCE_EXHAUSTED). gRPC: ``maximum_concurrent_rpcs`` (RESOURCE_EXHAUSTED).
    max_tensor_elements: most elements one input tensor may declare (gRPC shape / REST values)
      [16,777,216 = the float32 values of a 64 MiB message]; more: INVALID_ARGUMENT.
    max_message_bytes: gRPC message limit, and what a tensor may expand to [64 MiB].
    rest_workers / grpc_workers: threads computing predictions [4 / 8].
    drain_timeout_s: on stop / SIGTERM, how long in-flight requests may take to finish [10 s].
    tls_cert / tls_key: PEM files; both or neither. tls_client_ca: PEM CA bundle; clients must
      present a certificate it signed (mutual TLS). Apply to REST (HTTPS) and gRPC alike.
    auth_token_file: file with one bearer token per line (blank lines and ``#`` comments ignored);
      every request must send ``Authorization: Bearer <token>`` (REST header, gRPC metadata).
    """

    max_body_bytes: int = 64 * MiB
    max_header_bytes: int = 64 * 1024
    read_timeout_s: float = 30.0
    max_connections: int = 512
    max_concurrent_requests: int = 128
    max_tensor_elements: int = 16 * MiB
    max_message_bytes: int = 64 * MiB
    rest_workers: int = 4
    grpc_workers: int = 8
    drain_timeout_s: float = 10.0
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    auth_token_file: Optional[str] = None

    # ---- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        for name, flag in (("max_body_bytes", "--max-body-mb"), ("max_header_bytes", None),
                           ("max_connections", "--max-connections"),
                           ("max_concurrent_requests", "--max-concurrent-requests"),
                           ("max_tensor_elements", "--max-tensor-elements"), ("max_message_bytes", None),
                           ("rest_workers", None), ("grpc_workers", None)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ServingConfigError(f"{flag or name} must be a positive integer, not {v!r}")
        for name, flag in (("read_timeout_s", "--read-timeout"), ("drain_timeout_s", "--drain-timeout")):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ServingConfigError(f"{flag} must be a positive number of seconds, not {v!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ServingConfigError("TLS needs both --tls-cert and --tls-key (PEM files); "
                                     f"only {'--tls-cert' if self.tls_cert else '--tls-key'} was given")
        if self.tls_client_ca and not self.tls_cert:
            raise ServingConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key as well")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--tls-client-ca", self.tls_client_ca),
                           ("--auth-token-file", self.auth_token_file)):
            if path:
                _read_file(flag, path)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def auth(self) -> bool:
        return bool(self.auth_token_file)

    # ---- TLS -------------------------------------------------------------------------------------
    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """Server-side context for REST (None without TLS)."""
        if not self.tls:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (ssl.SSLError, OSError) as e:
            raise ServingConfigError(
                f"--tls-cert {self.tls_cert} / --tls-key {self.tls_key} are not a matching PEM certificate "
                f"and private key ({_ssl_reason(e)}); pass the server's certificate chain and its key") from None
        if self.tls_client_ca:
            try:
                ctx.load_verify_locations(cafile=self.tls_client_ca)
            except (ssl.SSLError, OSError) as e:
                raise ServingConfigError(f"--tls-client-ca {self.tls_client_ca} is not a PEM CA certificate "
                                         f"bundle ({_ssl_reason(e)})") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def grpc_credentials(self):
        """``grpc.ServerCredentials`` for TLS (None without TLS)."""
        if not self.tls:
            return None
        import grpc

        self.ssl_context()   # the same checks and messages as REST before gRPC sees the files
        ca = _read_file("--tls-client-ca", self.tls_client_ca) if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(_read_file("--tls-key", self.tls_key), _read_file("--tls-cert", self.tls_cert))],
            root_certificates=ca, require_client_auth=ca is not None)

    # ---- auth ------------------------------------------------------------------------------------
    def tokens(self) -> List[bytes]:
        if not self.auth:
            return []
        text = _read_file("--auth-token-file", self.auth_token_file).decode("utf-8", "replace")
        tokens = [t.strip() for t in text.splitlines() if t.strip() and not t.strip().startswith("#")]
        if not tokens:
            raise ServingConfigError(f"--auth-token-file {self.auth_token_file} holds no token; write one "
                                     "token per line (e.g. `openssl rand -hex 32 > FILE`)")
        bad = [t for t in tokens if any(c.isspace() for c in t) or not t.isascii()]
        if bad:
            raise ServingConfigError(f"--auth-token-file {self.auth_token_file}: tokens must be single words "
                                     "of ASCII characters, one per line")
        return [t.encode("ascii") for t in tokens]


class TokenChecker:
    """Constant-time check of ``Authorization: Bearer <token>`` values against the allowed tokens."""

    def __init__(self, tokens: List[bytes]):
        self.tokens = list(tokens)

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def check(self, header: Optional[str]) -> Optional[str]:
        """None when allowed, else the error message."""
        if not header:
            return "Missing bearer token: send the header 'Authorization: Bearer <token>'"
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return "Malformed Authorization header: expected 'Bearer <token>'"
        got = value.strip().encode("utf-8", "replace")
        ok = False
        for t in self.tokens:          # no early exit: the time does not say which token matched
            ok |= hmac.compare_digest(got, t)
        return None if ok else "Invalid bearer token"


def _read_file(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ServingConfigError(f"cannot read {flag} {path}: {e.strerror or e}") from None


def _ssl_reason(e: BaseException) -> str:
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)


# ---- bind address ------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {i[4][0] for i in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_bind_allowed(host: str, options: ServerOptions) -> None:
    """Listening beyond loopback needs TLS or bearer-token auth."""
    if not is_loopback(host) and not (options.tls or options.auth):
        raise InsecureBindError(host or "all interfaces")


# ---- flags ---------------------------------------------------------------------------------------
def add_server_flags(p: argparse.ArgumentParser) -> None:
    """The security and limit flags (``--tls-*``, ``--auth-token-file``, ``--max-*``, timeouts)."""
    d = ServerOptions()
    g = p.add_argument_group("security (REST and gRPC)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate (chain) of the server: serve HTTPS and TLS gRPC")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", default=None,
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    g.add_argument("--auth-token-file", default=None,
                   help="file of bearer tokens, one per line: require 'Authorization: Bearer <token>'")
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MiB,
                   help="largest REST request body in MiB (default %(default)g)")
    g.add_argument("--max-tensor-elements", type=int, default=d.max_tensor_elements,
                   help="most elements one input tensor may have (default %(default)d)")
    g.add_argument("--read-timeout", type=float, default=d.read_timeout_s,
                   help="seconds to receive a request's headers, and its body; also the keep-alive idle limit "
                        "(default %(default)g)")
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open REST connections (default %(default)d)")
    g.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help="requests computed or queued at once, per API (default %(default)d)")
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                   help="seconds in-flight requests get to finish on SIGTERM (default %(default)g)")


def options_from_args(a: argparse.Namespace) -> ServerOptions:
    if not a.max_body_mb or a.max_body_mb <= 0:
        raise ServingConfigError(f"--max-body-mb must be a positive number, not {a.max_body_mb!r}")
    o = ServerOptions(max_body_bytes=int(a.max_body_mb * MiB), max_tensor_elements=a.max_tensor_elements,
                      read_timeout_s=a.read_timeout, max_connections=a.max_connections,
                      max_concurrent_requests=a.max_concurrent_requests, drain_timeout_s=a.drain_timeout,
                      tls_cert=a.tls_cert, tls_key=a.tls_key, tls_client_ca=a.tls_client_ca,
                      auth_token_file=a.auth_token_file)
    o.validate()
    return o

