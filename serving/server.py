"""``privtrain serve``: TF Serving's REST and gRPC APIs over the Pusher's serving directory.

    from serving.server import serve
    with serve("/path/to/serving", rest_port=8501, grpc_port=8500) as server:
        ...                       # or: serve(...).serve_forever()  (blocks; SIGTERM / Ctrl-C stop it)

When ``tensorflow_model_server`` is on PATH (``backend="auto"``) it is run on a generated
``models.config``; otherwise the built-in server (this package) answers the same APIs.
Command line: ``python -m serving.server --serving-dir DIR [--rest-port P] [--grpc-port P]``.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
import tempfile
import threading
from typing import Callable, List, Optional, Union

from .errors import PortInUseError

DEFAULT_REST_PORT = 8501
DEFAULT_GRPC_PORT = 8500


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


class ModelServer:
    """Serves every model under ``serving_dir`` (``<model>/<version>/saved_model.pb``).

    Args:
      serving_dir: the Pusher's push destination.
      rest_port / grpc_port: 0 picks a free port (see ``.rest_port`` / ``.grpc_port`` after start);
        None disables that API (built-in backend only).
      host: bind address (127.0.0.1 by default; the external TF Serving binary always binds all
        interfaces, it has no bind-address flag).
      backend: "auto" (the binary when on PATH, else built-in), "builtin" or "tfserving".
      poll_interval_s: how often new versions / labels are picked up (0 disables polling).
      max_versions: newest versions kept loaded (plus labelled ones); None keeps all.
      batching: False, True, or a dict of :class:`~serving.batcher.Batcher` arguments
        (``max_batch_size``, ``timeout_s``).
    """

    def __init__(self, serving_dir: str, rest_port: Optional[int] = DEFAULT_REST_PORT,
                 grpc_port: Optional[int] = DEFAULT_GRPC_PORT, host: str = "127.0.0.1", *,
                 backend: str = "auto", poll_interval_s: float = 1.0,
                 max_versions: Optional[int] = 2, model_names: Optional[List[str]] = None,
                 batching: Union[bool, dict] = False, grpc_workers: int = 8,
                 config_dir: Optional[str] = None, log: Callable[[str], None] = print):
        if backend not in ("auto", "builtin", "tfserving"):
            raise ValueError(f"backend must be auto, builtin or tfserving, not {backend!r}")
        self.serving_dir = os.path.abspath(serving_dir)
        self.host = host
        self._req_rest, self._req_grpc = rest_port, grpc_port
        self.backend = backend
        self.poll_interval_s = poll_interval_s
        self.max_versions = max_versions
        self.model_names = model_names
        self.batching = batching
        self.grpc_workers = grpc_workers
        self.config_dir = config_dir
        self.log = log
        self.repo = None
        self.core = None
        self.batcher = None
        self._rest = None
        self._grpc = None
        self._proc = None
        self._tmpdir = None
        self._stopped = threading.Event()
        self._started = False
        self.rest_port: Optional[int] = None
        self.grpc_port: Optional[int] = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "ModelServer":
        if self._started:
            return self
        if not os.path.isdir(self.serving_dir):
            raise FileNotFoundError(
                f"privtrain serve: serving directory {self.serving_dir} does not exist "
                "(run the pipeline so its Pusher pushes a model there, or pass --workdir)")
        from .tfserving import find_binary
        binary = find_binary() if self.backend in ("auto", "tfserving") else None
        if self.backend == "tfserving" and binary is None:
            raise FileNotFoundError("backend='tfserving' but tensorflow_model_server is not on PATH")
        self._stopped.clear()
        try:
            if binary:
                self._start_binary(binary)
            else:
                self._start_builtin()
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def _start_builtin(self) -> None:
        from .batcher import Batcher
        from .core import InferenceCore
        from .grpc_service import GrpcServer
        from .repository import ModelRepository
        from .rest import RestApi, RestServer

        self.repo = ModelRepository(self.serving_dir, poll_interval_s=self.poll_interval_s,
                                    max_versions=self.max_versions, model_names=self.model_names,
                                    on_event=lambda m: self.log(f"privtrain serve: {m}"))
        if self.batching:
            self.batcher = Batcher(**(self.batching if isinstance(self.batching, dict) else {}))
        self.core = InferenceCore(self.repo, self.batcher)
        # Bind both ports before loading models, so a taken port fails in milliseconds.
        if self._req_rest is not None:
            try:
                self._rest = RestServer(self.host, self._req_rest, RestApi(self.core))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise PortInUseError("REST", self.host, self._req_rest, "--rest-port") from None
                raise
            self.rest_port = self._rest.port
        if self._req_grpc is not None:
            _check_port_free("gRPC", self.host, self._req_grpc, "--grpc-port")
            try:
                self._grpc = GrpcServer(self.host, self._req_grpc, self.core,
                                        max_workers=self.grpc_workers)
            except OSError:
                raise PortInUseError("gRPC", self.host, self._req_grpc, "--grpc-port") from None
            self.grpc_port = self._grpc.port
        self.repo.load_initial()
        loaded = self.repo.model_names_loaded()
        if not loaded:
            self.log(f"privtrain serve: no models under {self.serving_dir} yet "
                     "(waiting for <model>/<version>/saved_model.pb)")
        if self._rest is not None:
            self._rest.start()
        if self._grpc is not None:
            self._grpc.start()
        self.repo.start_polling()
        self.log(f"privtrain serve: built-in server, models {loaded}; REST http://{self.host}:"
                 f"{self.rest_port}/v1/models/<name>, gRPC {self.host}:{self.grpc_port}")

    def _start_binary(self, binary: str) -> None:
        from .tfserving import TFServingProcess

        rest = self._req_rest if self._req_rest is not None else 0
        grpc_port = self._req_grpc if self._req_grpc is not None else DEFAULT_GRPC_PORT
        if not rest or not grpc_port:
            raise ValueError("with tensorflow_model_server, ports must be explicit (not 0)")
        _check_port_free("REST", "0.0.0.0", rest, "--rest-port")
        _check_port_free("gRPC", "0.0.0.0", grpc_port, "--grpc-port")
        cfg = self.config_dir
        if cfg is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="privtrain-tfserving-")
            cfg = self._tmpdir.name
        self._proc = TFServingProcess(binary, self.serving_dir, cfg, rest, grpc_port,
                                      poll_interval_s=self.poll_interval_s,
                                      max_versions=self.max_versions, model_names=self.model_names,
                                      batching=bool(self.batching))
        self._proc.start()
        self.rest_port, self.grpc_port = rest, grpc_port
        self.log(f"privtrain serve: running {binary} (config {self._proc.config_path}); "
                 "note: it listens on all interfaces")

    def stop(self) -> None:
        """Stop everything this server started (idempotent)."""
        if self._rest is not None:
            self._rest.stop()
            self._rest = None
        if self._grpc is not None:
            self._grpc.stop()
            self._grpc = None
        if self.repo is not None:
            self.repo.stop()
        if self._proc is not None:
            self._proc.stop()
            self._proc = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        self._started = False
        self._stopped.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until :meth:`stop` (or the external binary exits); True if stopped."""
        if self._proc is not None:
            while not self._stopped.wait(0.5 if timeout is None else min(0.5, timeout)):
                if self._proc is None or self._proc.poll() is not None:
                    return True
                if timeout is not None:
                    timeout -= 0.5
                    if timeout <= 0:
                        return False
            return True
        return self._stopped.wait(timeout)

    def serve_forever(self) -> int:
        """Start (if needed) and block until SIGTERM / SIGINT (Ctrl-C), then shut down cleanly."""
        self.start()
        got = []

        def on_signal(signum, frame):
            got.append(signum)
            self._stopped.set()

        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, on_signal)
        try:
            self.wait()
        except KeyboardInterrupt:
            pass
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            self.log("privtrain serve: shutting down")
            self.stop()
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
    a = p.parse_args(argv)
    try:
        server = ModelServer(a.serving_dir, a.rest_port, a.grpc_port, a.host, backend=a.backend,
                             poll_interval_s=a.poll_interval, max_versions=a.max_versions or None,
                             batching=a.enable_batching)
        server.start()
    except (PortInUseError, FileNotFoundError) as e:
        print(e, file=sys.stderr)
        return 2
    print(f"READY rest={server.rest_port} grpc={server.grpc_port}", flush=True)
    return server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
