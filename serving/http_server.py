"""The HTTP server carrying TF Serving's REST API: Tornado's HTTP/1.1 server on an asyncio event loop
in one thread, predictions computed on a small thread pool (or by the AsyncBatcher).

What it guarantees (each has a regression test in tests/serving/: test_serving_http.py, test_serving_limits.py,
test_serving_ops.py):
  * framing: ``Transfer-Encoding: chunked`` bodies are read as bodies (never as a next request);
    a request with both Content-Length and Transfer-Encoding, another transfer coding, or a
    non-numeric Content-Length is answered 400 and its connection closed (no request smuggling);
  * limits: body (``max_body_bytes``, Content-Length or chunked: 413), request line + headers
    (``max_header_bytes``), time to receive headers, and again the body, and keep-alive idleness
    (``read_timeout_s``), open connections (``max_connections``: 503) and per client address
    (``max_connections_per_client``: 503), a new connection's TLS handshake and first request's headers
    (``handshake_timeout_s``: closed, so idle sockets cannot hold every slot), requests being computed
    (``max_concurrent_requests``: 429). Connections cost no thread. HEAD is answered as GET, bodiless.
  * operations: Prometheus metrics at ``/monitoring/prometheus/metrics`` and the access log
    (:mod:`serving.observe`), both per request, never with bodies or tokens;
  * auth: with tokens, every request needs ``Authorization: Bearer <token>`` (401 otherwise, checked
    before the body is read); TLS and mutual TLS through an ``ssl.SSLContext``;
  * drain: ``stop()`` stops accepting, lets requests already received finish (their responses are
    written whole, with ``Connection: close``), then closes idle keep-alive connections;
  * memory: after a request or response over 1 MiB the C heap is trimmed (glibc ``malloc_trim``),
    so the process shrinks back instead of keeping the peak.

Why Tornado: it is already pinned in env/platform.lock.txt (no new packages, no environment rebuild),
maintained, implements HTTP/1.1 keep-alive and chunked request bodies with strict framing checks, and
its delegate API lets this server answer over-size or unauthenticated requests before reading bodies.
"""
from __future__ import annotations

import asyncio
import errno
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple
from urllib.parse import unquote, urlsplit

from .errors import PortInUseError, ServingError
from .memory import TRIM_BYTES as _TRIM_BYTES, Trimmer
from .observe import Observer, rest_verb
from .options import METRICS_PATH, ServerOptions, TokenChecker
from .rest import RestApi, Route, is_api_path

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large", 429: "Too Many Requests",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
            504: "Gateway Timeout", 499: "Client Closed Request"}
_INLINE_BYTES = 64 << 10  # bodies up to this size may be handled on the event loop (larger: worker threads)
_INLINE_COST_S = 0.002    # ... when their route has been answering faster than this
_MODEL_IN_PATH = re.compile(r"/v1/models/([^/:]+)", re.I)


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")


def _compute(api: RestApi, route: Route, body: bytes) -> Tuple[int, bytes]:
    """One request on a worker thread: parse, predict, encode."""
    try:
        status, payload = api.handle_route(route, body)
        return status, json.dumps(payload).encode("utf-8")
    except ServingError as e:
        return e.http_status, _error_body(e.message)
    except RecursionError:
        return 400, _error_body("JSON Parse error: The document is nested too deeply")
    except Exception as e:  # noqa: BLE001 - reported like TF Serving's INTERNAL errors
        return 500, _error_body(f"{type(e).__name__}: {e}")


def _timed_compute(api: RestApi, route: Route, body: bytes) -> Tuple[int, bytes, float]:
    t0 = time.perf_counter()
    status, data = _compute(api, route, body)
    return status, data, time.perf_counter() - t0


class _Request:
    """One HTTP request (tornado ``HTTPMessageDelegate``)."""

    def __init__(self, server: "HttpServer", conn):
        self.server, self.conn = server, conn
        self.chunks, self.size = [], 0
        self.start_line = None
        self.headers = None
        self.counted = False
        self.rejected = False
        self.closed = False
        self.t0 = time.perf_counter()
        self.observed = False

    # -- tornado callbacks --
    def headers_received(self, start_line, headers):
        srv = self.server
        self.start_line, self.headers = start_line, headers
        self.t0 = time.perf_counter()
        srv.greeted(self.conn.stream)
        srv.active += 1
        self.counted = True
        cl = headers.get("Content-Length")
        te = headers.get("Transfer-Encoding")
        if te is not None and cl is not None:
            return self._reject(400, "A request may not have both Content-Length and Transfer-Encoding")
        if te is not None and te.strip().lower() != "chunked":
            return self._reject(400, f"Unsupported Transfer-Encoding: {te[:40]} (only chunked)")
        if cl is not None:
            pieces = {p.strip() for p in cl.split(",")}
            if len(pieces) != 1 or not next(iter(pieces)).isdigit():
                return self._reject(400, "Content-Length must be a non-negative integer, not "
                                         f"{cl[:40]!r}")
            if int(next(iter(pieces))) > srv.options.max_body_bytes:
                return self._reject(413, self._too_large())
        if srv.tokens:
            problem = srv.tokens.check(headers.get("Authorization"))
            if problem is not None:
                return self._reject(401, problem, {"WWW-Authenticate": 'Bearer realm="privtrain"'})
        return None

    def data_received(self, chunk):
        if self.rejected:
            return None
        self.size += len(chunk)
        if self.size > self.server.options.max_body_bytes:   # chunked bodies: no length up front
            self.chunks = []
            return self._reject(413, self._too_large())
        self.chunks.append(chunk)
        return None

    def finish(self):
        if self.rejected:
            return
        srv = self.server
        if srv.batching and self.size <= _INLINE_BYTES and self._submit_batched():
            return
        key = (self.start_line.method, self.start_line.path)
        est = srv.cost_s.get(key)
        if (not srv.batching and self.size <= _INLINE_BYTES and est is not None and est < _INLINE_COST_S
                and srv.computing == 0):
            # A small request to a route known to be fast: answered in this callback on the event loop,
            # two thread hand-offs cost more than the computation. Slow or unknown ones go to workers.
            t0 = time.perf_counter()
            self._process_now()
            srv.cost_s[key] = 0.8 * est + 0.2 * (time.perf_counter() - t0)
        else:
            asyncio.ensure_future(self._process())

    def _submit_batched(self) -> bool:
        """A small ``:predict`` with batching on: parsed now, handed to the AsyncBatcher, answered from
        its callback (no task per request). False: not such a request (the general path answers)."""
        srv = self.server
        method, path = self.start_line.method, urlsplit(self.start_line.path).path
        if method != "POST" or not is_api_path(path) or srv.computing >= srv.options.max_concurrent_requests:
            return False
        try:
            route = srv.api.route(method, path)
        except ServingError:
            return False
        if route.verb != "predict":
            return False
        body = b"".join(self.chunks)
        self.chunks = []
        srv.computing += 1
        answered = []

        def done(payload, error):
            if answered:
                return
            answered.append(True)
            srv.computing -= 1
            if error is None:
                try:
                    self._finish_write(200, json.dumps(payload).encode("utf-8"))
                except Exception as e:  # noqa: BLE001
                    self._finish_write(500, _error_body(f"{type(e).__name__}: {e}"))
            elif isinstance(error, ServingError):
                self._finish_write(error.http_status, _error_body(error.message))
            elif isinstance(error, RecursionError):
                self._finish_write(400, _error_body("JSON Parse error: The document is nested too deeply"))
            else:
                self._finish_write(500, _error_body(f"{type(error).__name__}: {error}"))

        try:
            srv.api.predict_submit(route, body, done)
        except BaseException as e:  # noqa: BLE001 - answered like the other paths
            done(None, e)
        return True

    def _finish_write(self, status: int, data: bytes, ctype: str = "application/json") -> None:
        try:
            fut = self._write(status, data, ctype)
        except Exception:  # noqa: BLE001 - the client went away
            fut = None
        if fut is None:
            self._done()
        else:
            fut.add_done_callback(lambda _f: self._done())   # a draining stop() waits for the bytes

    def _process_now(self) -> None:
        try:
            body = b"".join(self.chunks)
            self.chunks = []
            method, path = _routing_method(self.start_line.method), urlsplit(self.start_line.path).path
            if path == METRICS_PATH and self.server.observer.registry is not None:
                status, data, ctype = self.server.metrics_response(method)
            elif not is_api_path(path):
                status, data, ctype = 404, b"", "text/plain"
            else:
                try:
                    route = self.server.api.route(method, path)
                    status, data = _compute(self.server.api, route, body)
                except ServingError as e:
                    status, data = e.http_status, _error_body(e.message)
                ctype = "application/json"
            fut = self._write(status, data, ctype)
        except Exception:  # noqa: BLE001 - the client went away
            fut = None
        if fut is None:
            self._done()
        else:
            fut.add_done_callback(lambda _f: self._done())   # a draining stop() waits for the bytes

    def on_connection_close(self):
        self.closed = True
        self._done()

    # -- helpers --
    def _too_large(self) -> str:
        mb = self.server.options.max_body_bytes / (1 << 20)
        return (f"Request body larger than the server allows ({mb:g} MiB); send smaller batches "
                "or raise privtrain serve --max-body-mb")

    def _done(self) -> None:
        if self.counted:
            self.counted = False
            self.server.active -= 1

    async def _reject(self, status: int, message: str, extra=None):
        """Answer before (the rest of) the body is read, then close the connection."""
        self.rejected = True
        try:
            stream = self.conn.stream
            self.conn._disconnect_on_finish = False   # keep the stream open for the lingering read
            fut = self._write(status, _error_body(message), close=True, extra=extra)
            if fut is not None:
                await fut
            # Lingering close: read and discard what the client is still sending (bounded in time and
            # bytes) so that closing does not reset the connection before it has read the answer.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(self.server.options.read_timeout_s, 5.0)
            left = 256 << 20
            while left > 0 and not stream.closed():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                data = await asyncio.wait_for(stream.read_bytes(65536, partial=True), remaining)
                left -= len(data)
        except Exception:  # noqa: BLE001 - the client went away, or the time is up
            pass
        self.conn.close()
        self._done()

    def _write(self, status: int, data: bytes, content_type: str = "application/json", close: bool = False,
               extra=None):
        from tornado.httputil import HTTPHeaders, ResponseStartLine

        self._observe(status, len(data))
        if self.closed:
            return None
        headers = HTTPHeaders({"Content-Type": content_type, "Content-Length": str(len(data))})
        if self.start_line is not None and self.start_line.method == "HEAD":
            data = b""     # the headers a GET would get, no body (RFC 9110 9.3.2)
        if extra:
            headers.update(extra)
        if close or self.server.draining:
            headers["Connection"] = "close"
            if not self.rejected:
                self.conn._disconnect_on_finish = True   # tornado then closes after this response
        fut = self.conn.write_headers(ResponseStartLine("HTTP/1.1", status, _REASONS.get(status, "")),
                                      headers, data)
        self.conn.finish()
        return fut

    def _observe(self, status: int, bytes_out: int) -> None:
        """Metrics and the access-log line, once per request."""
        if self.observed or self.start_line is None:
            return
        self.observed = True
        srv = self.server
        raw = self.start_line.path
        known = srv.path_info.get(raw)
        if known is None:
            path = urlsplit(raw).path
            verb = "metrics" if path == METRICS_PATH else rest_verb(path)
            m = _MODEL_IN_PATH.match(path)
            known = (path, verb, unquote(m.group(1)) if m else None)
            if len(srv.path_info) < 1024:    # clients choose paths: a bounded cache of the common ones
                srv.path_info[raw] = known
        path, verb, model = known
        srv.observer.record("rest", verb, model, status, time.perf_counter() - self.t0,
                            client=getattr(self.conn.context, "remote_ip", "") or "",
                            method=self.start_line.method, path=path, bytes_in=self.size, bytes_out=bytes_out)

    async def _process(self) -> None:
        srv = self.server
        try:
            body = b"".join(self.chunks)
            self.chunks = []
            try:
                status, data, ctype = await self._respond(body)
            except Exception as e:  # noqa: BLE001 - never leave a request unanswered
                status, data, ctype = 500, _error_body(f"{type(e).__name__}: {e}"), "application/json"
            fut = self._write(status, data, ctype)
            if len(body) > _TRIM_BYTES or len(data) > _TRIM_BYTES:
                del body, data
                srv.trimmer.schedule(srv.executor)
            if fut is not None:
                await fut          # a draining stop() waits until the response is written whole
        except Exception:  # noqa: BLE001 - the client went away
            pass
        finally:
            self._done()

    async def _respond(self, body: bytes) -> Tuple[int, bytes, str]:
        srv = self.server
        method = _routing_method(self.start_line.method)
        path = urlsplit(self.start_line.path).path
        if path == METRICS_PATH and srv.observer.registry is not None:
            return srv.metrics_response(method)
        if not is_api_path(path):
            return 404, b"", "text/plain"
        try:
            route = srv.api.route(method, path)
        except ServingError as e:
            return e.http_status, _error_body(e.message), "application/json"
        if route.verb in ("status", "metadata"):
            return (*_compute(srv.api, route, body), "application/json")
        if srv.computing >= srv.options.max_concurrent_requests:
            return 429, _error_body(
                f"Server busy: {srv.computing} requests are being computed (privtrain serve "
                "--max-concurrent-requests); retry later"), "application/json"
        small = len(body) <= _INLINE_BYTES
        srv.computing += 1
        try:
            loop = asyncio.get_running_loop()
            key = (self.start_line.method, self.start_line.path)
            status, data, secs = await loop.run_in_executor(srv.executor, _timed_compute, srv.api, route, body)
            if small and status == 200:
                old = srv.cost_s.get(key)
                srv.cost_s[key] = secs if old is None else 0.8 * old + 0.2 * secs
            return status, data, "application/json"
        finally:
            srv.computing -= 1


async def _refuse_connection(stream, response: bytes) -> None:
    """Answer a connection over a limit, read (and drop) its request so that the close does not reset
    it before the client has read the answer, then close: one second in all (a TLS client that never
    finishes its handshake, or a client that reads nothing, cannot keep it longer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    try:
        # shield: a timed-out wait must not cancel tornado's own futures (it logs a CancelledError
        # for a cancelled write); close() below settles them
        await asyncio.wait_for(asyncio.shield(stream.write(response)), 1.0)
        while not stream.closed() and loop.time() < deadline:
            await asyncio.wait_for(asyncio.shield(stream.read_bytes(65536, partial=True)),
                                   deadline - loop.time())
    except Exception:  # noqa: BLE001 - closed by the client, or the second is up
        pass
    stream.close()


def _refusal(message: str) -> bytes:
    msg = _error_body(message)
    return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(msg)}\r\nConnection: close\r\n\r\n").encode() + msg


def _routing_method(method: str) -> str:
    return "GET" if method == "HEAD" else method


class HttpServer:
    """Binds in the constructor (a taken port fails fast); ``start()`` begins serving on its own
    event-loop thread; ``stop()`` drains and joins it."""

    def __init__(self, host: str, port: int, api: RestApi, options: ServerOptions, *, batching: bool = False,
                 batcher_args: Optional[dict] = None, observer: Optional[Observer] = None):
        from tornado.netutil import bind_sockets

        self.api, self.options = api, options
        self.batching = batching
        self.batcher_args = dict(batcher_args or {})
        self.tokens = TokenChecker(options.tokens())
        self.ssl_context = options.ssl_context()
        try:
            self._sockets = bind_sockets(port, address=host, backlog=1024)
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise PortInUseError("REST", host, port, "--rest-port") from None
            raise
        self.port = self._sockets[0].getsockname()[1]
        self.executor = ThreadPoolExecutor(max_workers=options.rest_workers, thread_name_prefix="privtrain-rest")
        self.trimmer = Trimmer()
        self.active = 0          # requests received (headers in) and not yet answered
        self.computing = 0       # requests being computed or queued for it
        self.draining = False
        self.cost_s = {}         # (method, path) -> recent seconds per small request (EWMA)
        self.per_client = {}     # client address -> open connections
        self.path_info = {}      # request path -> (path, verb, model) for metrics and the access log
        self.conn_info = {}      # stream -> [client address, first request's headers received]
        self.observer = observer if observer is not None else Observer(metrics=False)
        self.observer.rest_in_flight(lambda: self.computing)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None

    @property
    def async_batcher(self):
        return getattr(self.api.core, "async_batcher", None)

    # ---- connections (event-loop thread) ---------------------------------------------------------
    def greeted(self, stream) -> None:
        info = self.conn_info.get(stream)
        if info is not None:
            info[1] = True

    def _close_if_silent(self, stream) -> None:
        info = self.conn_info.get(stream)
        if info is not None and not info[1] and not stream.closed():
            self.observer.refused_connection("handshake_timeout")
            self._forget(stream)    # its slot is free now, not when tornado's close callback runs
            stream.close()

    def _forget(self, stream) -> None:
        info = self.conn_info.pop(stream, None)
        if info is None:
            return
        n = self.per_client.get(info[0], 1) - 1
        if n > 0:
            self.per_client[info[0]] = n
        else:
            self.per_client.pop(info[0], None)
        if self.observer.registry is not None:
            self.observer.connections.dec()

    def metrics_response(self, method: str) -> Tuple[int, bytes, str]:
        if method != "GET":
            return 405, _error_body(f"{METRICS_PATH} answers GET only"), "application/json"
        return 200, self.observer.exposition(), "text/plain; version=0.0.4; charset=utf-8"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"privtrain-rest-loop-{self.port}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        from tornado.httpserver import HTTPServer
        from tornado.httputil import HTTPServerConnectionDelegate

        outer = self
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            class _Delegate(HTTPServerConnectionDelegate):
                def start_request(self, server_conn, request_conn):
                    return _Request(outer, request_conn)

            class _Server(HTTPServer):
                def handle_stream(self, stream, address):
                    o = outer.options
                    ip = address[0] if isinstance(address, tuple) and address else str(address)
                    # our own count: a connection we closed frees its slot at once (tornado's
                    # self._connections forgets it a loop iteration later)
                    if len(outer.conn_info) >= o.max_connections:
                        outer.observer.refused_connection("max_connections")
                        asyncio.ensure_future(_refuse_connection(stream, _refusal(
                            f"Too many connections ({o.max_connections}, privtrain serve --max-connections); "
                            "retry later")))
                        return
                    if outer.per_client.get(ip, 0) >= o.max_connections_per_client:
                        outer.observer.refused_connection("max_connections_per_client")
                        asyncio.ensure_future(_refuse_connection(stream, _refusal(
                            f"Too many connections from {ip} ({o.max_connections_per_client}, privtrain serve "
                            "--max-connections-per-client); close idle ones or retry later")))
                        return
                    outer.per_client[ip] = outer.per_client.get(ip, 0) + 1
                    outer.conn_info[stream] = [ip, False]
                    if outer.observer.registry is not None:
                        outer.observer.connections.inc()
                    super().handle_stream(stream, address)
                    # TLS handshake and the first request's headers within handshake_timeout_s
                    loop.call_later(o.handshake_timeout_s, outer._close_if_silent, stream)

                def on_close(self, server_conn):
                    super().on_close(server_conn)
                    outer._forget(server_conn.stream)

            if self.batching:
                from .batcher import AsyncBatcher

                self.api.core.async_batcher = AsyncBatcher(self.executor, **self.batcher_args)
            o = self.options
            self._server = _Server(_Delegate(), ssl_options=self.ssl_context, max_header_size=o.max_header_bytes,
                                   idle_connection_timeout=o.read_timeout_s, body_timeout=o.read_timeout_s,
                                   max_body_size=1 << 62,  # enforced per request by _Request (413)
                                   max_buffer_size=o.max_body_bytes + (1 << 20), chunk_size=256 * 1024)
            self._server.add_sockets(self._sockets)
        except BaseException as e:  # noqa: BLE001
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _shutdown(self, timeout: float) -> None:
        self.draining = True
        self._server.stop()       # stop accepting; close the listening sockets
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.active > 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await self._server.close_all_connections()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Drain (at most ``timeout`` s, default ``options.drain_timeout_s``) and stop."""
        timeout = self.options.drain_timeout_s if timeout is None else timeout
        if self._thread is not None and self._loop is not None and self._server is not None:
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), self._loop)
            try:
                fut.result(timeout + 10)
            except Exception:  # noqa: BLE001 - stop anyway
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        elif self._thread is None:
            for s in self._sockets:
                s.close()
        self._thread = None
        self.executor.shutdown(wait=True)
