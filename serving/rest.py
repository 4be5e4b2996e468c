"""TF Serving's REST API (``/v1/models/...``) on the standard library's ThreadingHTTPServer."""
from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Tuple
from urllib.parse import unquote, urlsplit

import numpy as np
from google.protobuf import json_format

from . import codec
from .core import InferenceCore, model_metadata_response, model_status_response
from .errors import ServingError, invalid_argument

# tensorflow_serving/model_servers/http_rest_api_util.cc
_V1 = re.compile(r"/v1/.*", re.I)
_PREDICT = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.I)
_STATUS = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I)
_INT64_MAX = 2 ** 63 - 1


def _version(s: Optional[str]) -> Optional[int]:
    if not s:
        return None
    v = int(s)
    if v > _INT64_MAX:
        raise invalid_argument(f"Failed to convert version: {s} to numeric.")
    return v


def _proto_json(msg) -> dict:
    return json_format.MessageToDict(msg, including_default_value_fields=True,
                                     preserving_proto_field_name=True)


class RestApi:
    """Maps (method, path, body) to (http status, JSON-able body), raising ServingError on failure."""

    def __init__(self, core: InferenceCore):
        self.core = core
        self.repo = core.repo

    def handle(self, method: str, path: str, body: bytes) -> Tuple[int, dict]:
        malformed = invalid_argument(f"Malformed request: {method} {path}")
        if method == "POST":
            m = _PREDICT.fullmatch(path)
            if not m:
                raise malformed
            name, version, label = unquote(m.group(1)), _version(m.group(2)), m.group(3)
            label = unquote(label) if label else None
            verb = m.group(4).lower()
            return 200, getattr(self, "_" + verb)(name, version, label, body)
        if method == "GET":
            m = _STATUS.fullmatch(path)
            if not m:
                raise malformed
            name = unquote(m.group(1)) if m.group(1) else ""
            version, label = _version(m.group(2)), (unquote(m.group(3)) if m.group(3) else None)
            if not name:
                raise invalid_argument("Missing model name in request.")
            if version is not None and label:
                raise invalid_argument(f"Both model version ({version}) and model version label "
                                       f"({label}) cannot be supplied.")
            if m.group(4):
                with self.repo.handle(name, version, label) as s:
                    cached = getattr(s, "_rest_metadata", None)
                    if cached is None:
                        resp = model_metadata_response(s)
                        from tensorflow_serving.apis import get_model_metadata_pb2
                        sdm = get_model_metadata_pb2.SignatureDefMap()
                        resp.metadata["signature_def"].Unpack(sdm)
                        cached = {"model_spec": _proto_json(resp.model_spec),
                                  "metadata": {"signature_def": _proto_json(sdm)}}
                        s._rest_metadata = cached
                    return 200, cached
            return 200, _proto_json(model_status_response(self.repo, name, version, label))
        raise malformed

    def _predict(self, name, version, label, body):
        doc = codec.parse_json_body(body)
        sig_name = codec.signature_name_of(doc)
        with self.repo.handle(name, version, label) as s:
            sig = s.signature(sig_name, rest=True)
            inputs, fmt = codec.predict_request_from_json(doc, sig.np_inputs)
            out = self.core.predict(s, sig, inputs)
        return codec.predict_response_to_json(out, fmt)

    def _classify(self, name, version, label, body):
        doc = codec.parse_json_body(body)
        sig_name = codec.signature_name_of(doc)
        examples = codec.examples_from_json(doc)
        with self.repo.handle(name, version, label) as s:
            _, result = self.core.classify(s, sig_name, examples)
        return {"results": [[[lbl, float(str(np.float32(score)))] for lbl, score in row] for row in result]}

    def _regress(self, name, version, label, body):
        doc = codec.parse_json_body(body)
        sig_name = codec.signature_name_of(doc)
        examples = codec.examples_from_json(doc)
        with self.repo.handle(name, version, label) as s:
            _, result = self.core.regress(s, sig_name, examples)
        return {"results": result}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive, like TF Serving's libevent server
    disable_nagle_algorithm = True     # small JSON replies must not wait for delayed ACKs
    server_version = "privtrain-serving"
    sys_version = ""

    def log_message(self, fmt, *args):  # quiet; errors are in the JSON replies
        pass

    def _reply(self, status: int, data: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        path = urlsplit(self.path).path
        if not _V1.fullmatch(path):
            self._reply(404, b"", "text/plain")
            return
        try:
            status, payload = self.server.api.handle(method, path, body)
        except ServingError as e:
            status, payload = e.http_status, {"error": e.message}
        except Exception as e:  # noqa: BLE001 - reported like TF Serving's INTERNAL errors
            status, payload = 500, {"error": f"{type(e).__name__}: {e}"}
        self._reply(status, json.dumps(payload).encode("utf-8"))

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")


class RestServer(ThreadingHTTPServer):
    """Binds in the constructor (so a taken port fails fast); ``start()`` begins serving."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, api: RestApi):
        self.api = api
        self._conns = set()
        self._conns_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"privtrain-rest-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        # Unblock handler threads idling on keep-alive connections, then join them.
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()
