"""``privtrain serve``: TF Serving's REST and gRPC APIs over the Pusher's serving directory.

    from serving import serve
    with serve("/path/to/serving", rest_port=8501, grpc_port=8500) as server:
        ...                       # or: serve(...).serve_forever()  (blocks; SIGTERM / Ctrl-C stop it)

The built-in server answers both APIs: REST on Tornado (:mod:`serving.http_server`), gRPC on grpcio
(:mod:`serving.grpc_service`), both over one model repository (:mod:`serving.repository`).
Command line: ``python -m serving.server --serving-dir DIR [--rest-port P] [--grpc-port P] [flags]``
(the flags of ``privtrain serve``).
"""
from __future__ import annotations

import argparse
import errno
import gc
import os
import signal
import socket
import sys
import threading
from typing import Callable, List, Optional, Union

from .errors import PortInUseError, ServingConfigError
from .options import ServerOptions, add_server_flags, check_bind_allowed, check_port, options_from_args

DEFAULT_REST_PORT = 8501
DEFAULT_GRPC_PORT = 8500
PREFIX = "privtrain serve: "


def _check_port_free(kind: str, host: str, port: int, flag: str) -> None:
    if not port:
        return
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            raise PortInUseError(kind, host, port, flag) from None
        raise
    finally:
        s.close()


TFSERVING_REFUSED = (
    "the tensorflow_model_server backend is not offered: that binary has no bind-address flag (it "
    "listens on all interfaces) and no bearer-token auth, which privtrain refuses without TLS or auth. "
    "Use the built-in server (--backend builtin, the default), or run tensorflow_model_server yourself "
    "behind a TLS-terminating, authenticating proxy (python -m serving.tfserving --serving-dir DIR "
    "prints its models.config)")


def prefer_returning_allocator(log: Callable[[str], None]) -> None:
    """TensorFlow's oneDNN CPU allocator (on by default on x86) keeps the memory of large tensors in a
    BFC pool for ever: after one 45 MB request the server stayed ~100 MB larger. With oneDNN's ops off,
    tensors use malloc, which the server trims after large requests. Only possible before TensorFlow is
    imported; an explicit TF_ENABLE_ONEDNN_OPTS is respected."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    elif os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0":
        log(f"{PREFIX}note: TensorFlow was imported before the server with oneDNN on, so memory used by "
            "large requests is kept in its pool (set TF_ENABLE_ONEDNN_OPTS=0 before importing TensorFlow)")


class ModelServer:
    """Serves every model under ``serving_dir`` (``<model>/<version>/saved_model.pb``).

    Args:
      serving_dir: the Pusher's push destination.
      rest_port / grpc_port: 0 picks a free port (see ``.rest_port`` / ``.grpc_port`` after start);
        None disables that API.
      host: bind address (127.0.0.1 by default). Anything but loopback needs TLS or auth in
        ``options`` (:class:`~serving.errors.InsecureBindError` otherwise).
      backend: "auto" and "builtin" run the built-in server; "tfserving" is refused (see
        ``TFSERVING_REFUSED``).
      poll_interval_s: how often new versions / labels are picked up (0 disables polling).
      max_versions: newest versions kept loaded (plus labelled ones); None keeps all.
      batching: False, True, or a dict of :class:`~serving.batcher.Batcher` arguments
        (``max_batch_size``, ``timeout_s``).
      options: :class:`~serving.options.ServerOptions` (limits, TLS, auth); keyword arguments named
        like its fields (``max_body_bytes=...``, ``auth_token_file=...``) override single fields.
    """

    def __init__(self, serving_dir: str, rest_port: Optional[int] = DEFAULT_REST_PORT,
                 grpc_port: Optional[int] = DEFAULT_GRPC_PORT, host: str = "127.0.0.1", *,
                 backend: str = "auto", poll_interval_s: float = 1.0,
                 max_versions: Optional[int] = 2, model_names: Optional[List[str]] = None,
                 batching: Union[bool, dict] = False, options: Optional[ServerOptions] = None,
                 log: Callable[[str], None] = print, **option_fields):
        if backend not in ("auto", "builtin", "tfserving"):
            raise ServingConfigError(f"backend must be auto, builtin or tfserving, not {backend!r}")
        import dataclasses

        options = dataclasses.replace(options or ServerOptions(), **option_fields)
        self.serving_dir = os.path.abspath(serving_dir)
        self.host = host
        self._req_rest, self._req_grpc = rest_port, grpc_port
        self.backend = backend
        self.poll_interval_s = poll_interval_s
        self.max_versions = max_versions
        self.model_names = model_names
        self.batching = batching
        self.options = options
        self.log = log
        self.repo = None
        self.core = None
        self.observer = None
        self.batcher = None
        self._rest = None
        self._grpc = None
        self._stopped = threading.Event()
        self._started = False
        self.rest_port: Optional[int] = None
        self.grpc_port: Optional[int] = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "ModelServer":
        if self._started:
            return self
        if self.backend == "tfserving":
            raise ServingConfigError(TFSERVING_REFUSED)
        self.options.validate()
        check_port("--rest-port", self._req_rest)
        check_port("--grpc-port", self._req_grpc)
        check_bind_allowed(self.host, self.options)
        if not os.path.isdir(self.serving_dir):
            raise ServingConfigError(
                f"serving directory {self.serving_dir} does not exist "
                "(run the pipeline so its Pusher pushes a model there, or pass --workdir)")
        prefer_returning_allocator(self.log)
        self._stopped.clear()
        try:
            self._start_builtin()
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    @property
    def async_batcher(self):
        return None if self.core is None else self.core.async_batcher

    def _start_builtin(self) -> None:
        from .batcher import Batcher
        from .core import InferenceCore
        from .grpc_service import GrpcServer
        from .http_server import HttpServer
        from .repository import ModelRepository
        from .rest import RestApi

        self.repo = ModelRepository(self.serving_dir, poll_interval_s=self.poll_interval_s,
                                    max_versions=self.max_versions, model_names=self.model_names,
                                    on_event=lambda m: self.log(f"{PREFIX}{m}"))
        batch_args = self.batching if isinstance(self.batching, dict) else {}
        if self.batching:
            self.batcher = Batcher(**batch_args)
        self.core = InferenceCore(self.repo, self.batcher, timeout_s=self.options.request_timeout_s)
        from .observe import Observer

        self.observer = Observer(self.options.metrics, self.options.access_log, repo_fn=lambda: self.repo)
        # Bind both ports before loading models, so a taken port fails in milliseconds.
        if self._req_rest is not None:
            self._rest = HttpServer(self.host, self._req_rest,
                                    RestApi(self.core, self.options.max_tensor_elements,
                                            self.options.max_request_elements, self.options.max_request_bytes),
                                    self.options,
                                    batching=bool(self.batching), batcher_args=batch_args, observer=self.observer)
            self.rest_port = self._rest.port
        if self._req_grpc is not None:
            _check_port_free("gRPC", self.host, self._req_grpc, "--grpc-port")
            self._grpc = GrpcServer(self.host, self._req_grpc, self.core, self.options, self.observer)
            self.grpc_port = self._grpc.port
        self.repo.load_initial()
        # TensorFlow and the loaded models are millions of long-lived Python objects: out of the garbage
        # collector's way, full collections no longer walk them (they caused tens of ms of pauses).
        gc.collect()
        gc.freeze()
        loaded = self.repo.model_names_loaded()
        if not loaded:
            self.log(f"{PREFIX}no models under {self.serving_dir} yet "
                     "(waiting for <model>/<version>/saved_model.pb)")
        if self._rest is not None:
            self._rest.start()
        if self._grpc is not None:
            self._grpc.start()
        self.repo.start_polling()
        scheme = "https" if self.options.tls else "http"
        sec = ", ".join(x for x in ("TLS" if self.options.tls else "",
                                    "mutual TLS" if self.options.tls_client_ca else "",
                                    "bearer-token auth" if self.options.auth else "") if x) or "plaintext"
        from .options import METRICS_PATH

        metrics = (f", metrics {scheme}://{self.host}:{self.rest_port}{METRICS_PATH}"
                   if self.options.metrics and self._rest is not None else "")
        self.log(f"{PREFIX}models {loaded}; REST {scheme}://{self.host}:{self.rest_port}/v1/models/<name>, "
                 f"gRPC {self.host}:{self.grpc_port}{metrics} ({sec})")

    def stop(self, drain_timeout_s: Optional[float] = None) -> None:
        """Stop everything this server started (idempotent). Both APIs stop accepting at once and get
        up to ``drain_timeout_s`` (default ``options.drain_timeout_s``) to finish in-flight requests."""
        rest, grpc_srv = self._rest, self._grpc
        self._rest = self._grpc = None
        threads = []
        if grpc_srv is not None:
            t = threading.Thread(target=grpc_srv.stop, args=(drain_timeout_s,), name="privtrain-grpc-stop")
            t.start()
            threads.append(t)
        if rest is not None:
            rest.stop(drain_timeout_s)
        for t in threads:
            t.join()
        if self.repo is not None:
            self.repo.stop()
        if self.core is not None:
            self.core.stop()
        if self.observer is not None:
            self.observer.close()
        self._started = False
        self._stopped.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until :meth:`stop`; True if stopped."""
        return self._stopped.wait(timeout)

    def serve_forever(self, on_ready: Optional[Callable[[], None]] = None) -> int:
        """Start (if needed) and block until SIGTERM / SIGINT (Ctrl-C), then drain and shut down.
        ``on_ready`` runs once the signal handlers are in place (print READY there: a SIGTERM sent on
        seeing it is then always a graceful stop)."""
        stop_requested = threading.Event()

        def on_signal(signum, frame):
            stop_requested.set()

        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, on_signal)
        try:
            self.start()
        except BaseException:
            for sig, h in old.items():
                signal.signal(sig, h)
            raise
        if on_ready is not None:
            on_ready()
        try:
            while not stop_requested.wait(0.5) and not self._stopped.is_set():
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.log(f"{PREFIX}shutting down (draining in-flight requests, at most "
                     f"{self.options.drain_timeout_s:g} s)")
            self.stop()
            for sig, h in old.items():
                signal.signal(sig, h)
        return 0

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(serving_dir: str, rest_port: Optional[int] = DEFAULT_REST_PORT,
          grpc_port: Optional[int] = DEFAULT_GRPC_PORT, host: str = "127.0.0.1",
          **kwargs) -> ModelServer:
    """Start a :class:`ModelServer` and return it; use it as a context manager
    (``with serve(...) as s:``) or block with ``serve(...).serve_forever()``."""
    return ModelServer(serving_dir, rest_port, grpc_port, host, **kwargs).start()


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``privtrain serve`` and ``python -m serving.server`` (beyond the ports, host and
    backend that ``privtrain serve`` declares itself): security and limits."""
    add_server_flags(p)


def server_from_args(a: argparse.Namespace, serving_dir: str, log: Callable[[str], None] = print) -> ModelServer:
    """A ModelServer for parsed flags (raises ServingConfigError for bad flags)."""
    max_versions = getattr(a, "max_versions", 2)
    return ModelServer(serving_dir, a.rest_port, a.grpc_port, a.host, backend=a.backend,
                       poll_interval_s=getattr(a, "poll_interval", 1.0),
                       max_versions=max_versions or None, batching=a.enable_batching,
                       options=options_from_args(a), log=log)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n")[0])
    p.add_argument("--serving-dir", required=True)
    p.add_argument("--rest-port", type=int, default=DEFAULT_REST_PORT)
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--backend", default="auto", choices=["auto", "builtin", "tfserving"])
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--max-versions", type=int, default=2, help="0 keeps all versions loaded")
    p.add_argument("--enable-batching", action="store_true")
    add_serve_flags(p)
    a = p.parse_args(argv)
    try:
        server = server_from_args(a, a.serving_dir)
        server.start()
    except ServingConfigError as e:
        print(f"{PREFIX}{e}", file=sys.stderr)
        return 2
    return server.serve_forever(
        on_ready=lambda: print(f"READY rest={server.rest_port} grpc={server.grpc_port}", flush=True))


if __name__ == "__main__":
    sys.exit(main())
