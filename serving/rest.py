"""TF Serving's REST API (``/v1/models/...``): routing and request handling (the HTTP server that
carries it is :mod:`serving.http_server`). Mirrors tensorflow_serving/model_servers/http_rest_api_handler.cc."""
from __future__ import annotations

import re
from typing import NamedTuple, Optional, Tuple
from urllib.parse import unquote

import numpy as np
from google.protobuf import json_format

from . import codec
from .core import InferenceCore, model_metadata_response, model_status_response
from .errors import invalid_argument

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
    if len(s) > 19 or int(s) > _INT64_MAX:
        raise invalid_argument(f"Failed to convert version: {s[:40]} to numeric.")
    return int(s)


def _proto_json(msg) -> dict:
    return json_format.MessageToDict(msg, including_default_value_fields=True,
                                     preserving_proto_field_name=True)


class Route(NamedTuple):
    verb: str            # predict | classify | regress | status | metadata
    name: str
    version: Optional[int]
    label: Optional[str]


def is_api_path(path: str) -> bool:
    return bool(_V1.fullmatch(path))


class RestApi:
    """Maps (method, path, body) to (http status, JSON-able body), raising ServingError on failure."""

    def __init__(self, core: InferenceCore, max_elements: Optional[int] = None,
                 max_request_elements: Optional[int] = None, max_request_bytes: Optional[int] = None):
        self.core = core
        self.repo = core.repo
        self.max_elements = max_elements
        self.max_request_elements = max_request_elements
        self.max_request_bytes = max_request_bytes

    def _inputs(self, doc: dict, sig):
        inputs, fmt = codec.predict_request_from_json(doc, sig.np_inputs, self.max_elements)
        codec.check_array_totals(inputs, self.max_request_elements, self.max_request_bytes)
        return inputs, fmt

    def route(self, method: str, path: str) -> Route:
        malformed = invalid_argument(f"Malformed request: {method} {path}")
        if method == "POST":
            m = _PREDICT.fullmatch(path)
            if not m:
                raise malformed
            label = unquote(m.group(3)) if m.group(3) else None
            return Route(m.group(4).lower(), unquote(m.group(1)), _version(m.group(2)), label)
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
            return Route("metadata" if m.group(4) else "status", name, version, label)
        raise malformed

    def handle(self, method: str, path: str, body: bytes) -> Tuple[int, dict]:
        return self.handle_route(self.route(method, path), body)

    def handle_route(self, r: Route, body: bytes) -> Tuple[int, dict]:
        if r.verb == "status":
            return 200, _proto_json(model_status_response(self.repo, r.name, r.version, r.label))
        if r.verb == "metadata":
            with self.repo.handle(r.name, r.version, r.label) as s:
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
        return 200, getattr(self, "_" + r.verb)(r.name, r.version, r.label, body)

    def predict_submit(self, r: Route, body: bytes, done) -> None:
        """``:predict`` parsed here (on the event loop) and computed by the core's AsyncBatcher;
        ``done(payload, error)`` is called on the loop. Errors before submission are raised."""
        doc = codec.parse_json_body(body)
        sig_name = codec.signature_name_of(doc)
        s = self.repo.acquire(r.name, r.version, r.label)
        try:
            sig = s.signature(sig_name, rest=True)
            inputs, fmt = self._inputs(doc, sig)
        except BaseException:
            self.repo.release(s)
            raise

        def finished(out, error):
            self.repo.release(s)
            if error is not None:
                done(None, error)
                return
            try:
                payload = codec.predict_response_to_json(out, fmt)
            except Exception as e:  # noqa: BLE001
                done(None, e)
                return
            done(payload, None)

        try:
            self.core.predict_submit(s, sig, inputs, finished)
        except BaseException:
            self.repo.release(s)
            raise

    def _predict(self, name, version, label, body):
        doc = codec.parse_json_body(body)
        sig_name = codec.signature_name_of(doc)
        with self.repo.handle(name, version, label) as s:
            sig = s.signature(sig_name, rest=True)
            inputs, fmt = self._inputs(doc, sig)
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
