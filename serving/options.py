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
METRICS_PATH = "/monitoring/prometheus/metrics"   # TF Serving's default Prometheus path


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
    max_request_elements: most elements all input tensors of one request may declare together
      [16,777,216]; more: INVALID_ARGUMENT, before anything is allocated.
    max_request_bytes: most bytes all input tensors of one request may take once decoded (numbers:
      their size; strings: their bytes plus ``STRING_ELEMENT_BYTES`` each) [256 MiB]; more:
      INVALID_ARGUMENT, before anything is allocated (a few values padded to a huge shape).
    max_message_bytes: gRPC message limit, and what a tensor may expand to [64 MiB].
    request_timeout_s: longest one request's model computation may run (TF Serving's
      ``--rest_api_timeout_in_ms``; gRPC: also the client's deadline if shorter) [30 s]; then the
      computation is cancelled and the request answered DEADLINE_EXCEEDED (REST 504).
    handshake_timeout_s: time a new connection has to finish its TLS handshake and send its first
      request's headers [5 s]; then it is closed (idle connections cannot fill the server). gRPC:
      its handshake timeout.
    max_connections_per_client: open REST connections from one client address [64]; more are
      refused (503 without TLS; closed with TLS).
    metrics: serve Prometheus metrics at ``METRICS_PATH`` on the REST port (same TLS and token).
    access_log: file to append one JSON line per REST request / gRPC call to (``-``: stderr);
      None: no access log.
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
    max_request_elements: int = 16 * MiB
    max_request_bytes: int = 256 * MiB
    max_message_bytes: int = 64 * MiB
    request_timeout_s: float = 30.0
    handshake_timeout_s: float = 5.0
    max_connections_per_client: int = 64
    rest_workers: int = 4
    grpc_workers: int = 8
    drain_timeout_s: float = 10.0
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    auth_token_file: Optional[str] = None
    metrics: bool = True
    access_log: Optional[str] = None

    # ---- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        for name, flag in (("max_body_bytes", "--max-body-mb"), ("max_header_bytes", None),
                           ("max_connections", "--max-connections"),
                           ("max_concurrent_requests", "--max-concurrent-requests"),
                           ("max_tensor_elements", "--max-tensor-elements"),
                           ("max_request_elements", "--max-request-elements"),
                           ("max_request_bytes", "--max-request-mb"),
                           ("max_connections_per_client", "--max-connections-per-client"),
                           ("max_message_bytes", None),
                           ("rest_workers", None), ("grpc_workers", None)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ServingConfigError(f"{flag or name} must be a positive integer, not {v!r}")
        for name, flag in (("read_timeout_s", "--read-timeout"), ("drain_timeout_s", "--drain-timeout"),
                           ("request_timeout_s", "--request-timeout"),
                           ("handshake_timeout_s", "--handshake-timeout")):
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
        if self.access_log and self.access_log != "-":
            try:
                with open(self.access_log, "a"):
                    pass
            except OSError as e:
                raise ServingConfigError(f"cannot append to --access-log {self.access_log}: "
                                         f"{e.strerror or e} (pass a writable file, or '-' for stderr)") from None

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


def check_port(flag: str, port) -> None:
    """A port is 0 (pick a free one) to 65535; None disables that API."""
    if port is None:
        return
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ServingConfigError(f"{flag} must be a port number from 0 to 65535 (0 picks a free one), "
                                 f"not {port!r}")


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
    g.add_argument("--max-request-elements", type=int, default=d.max_request_elements,
                   help="most elements all input tensors of one request may have together (default %(default)d)")
    g.add_argument("--max-request-mb", type=float, default=d.max_request_bytes / MiB,
                   help="most MiB all input tensors of one request may take once decoded (default %(default)g)")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                   help="seconds one request's model computation may run before it is cancelled "
                        "(DEADLINE_EXCEEDED, REST 504; default %(default)g)")
    g.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout_s,
                   help="seconds a new connection has to finish TLS and send its first request's headers "
                        "(default %(default)g)")
    g.add_argument("--max-connections-per-client", type=int, default=d.max_connections_per_client,
                   help="open REST connections from one client address (default %(default)d)")
    g.add_argument("--read-timeout", type=float, default=d.read_timeout_s,
                   help="seconds to receive a request's headers, and its body; also the keep-alive idle limit "
                        "(default %(default)g)")
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open REST connections (default %(default)d)")
    g.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help="requests computed or queued at once, per API (default %(default)d)")
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                   help="seconds in-flight requests get to finish on SIGTERM (default %(default)g)")
    g = p.add_argument_group("operations")
    g.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help=f"do not serve Prometheus metrics at {METRICS_PATH} on the REST port")
    g.add_argument("--access-log", default=None, metavar="FILE",
                   help="append one JSON line per request to FILE ('-': stderr); no bodies, no tokens")


def options_from_args(a: argparse.Namespace) -> ServerOptions:
    for flag, v in (("--max-body-mb", a.max_body_mb), ("--max-request-mb", a.max_request_mb)):
        if not v or v <= 0:
            raise ServingConfigError(f"{flag} must be a positive number, not {v!r}")
    o = ServerOptions(max_body_bytes=int(a.max_body_mb * MiB), max_tensor_elements=a.max_tensor_elements,
                      max_request_elements=a.max_request_elements,
                      max_request_bytes=int(a.max_request_mb * MiB), request_timeout_s=a.request_timeout,
                      handshake_timeout_s=a.handshake_timeout,
                      max_connections_per_client=a.max_connections_per_client,
                      metrics=a.metrics, access_log=a.access_log,
                      read_timeout_s=a.read_timeout, max_connections=a.max_connections,
                      max_concurrent_requests=a.max_concurrent_requests, drain_timeout_s=a.drain_timeout,
                      tls_cert=a.tls_cert, tls_key=a.tls_key, tls_client_ca=a.tls_client_ca,
                      auth_token_file=a.auth_token_file)
    o.validate()
    return o

