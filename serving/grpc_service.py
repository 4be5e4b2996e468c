"""TF Serving's gRPC services (PredictionService, ModelService) on grpcio: TLS / mutual TLS, bearer-token
auth (metadata ``authorization: Bearer <token>``), bounded concurrency (``maximum_concurrent_rpcs``), and
request tensors checked (names, dtypes, declared sizes) before anything is allocated."""
from __future__ import annotations

import time
from concurrent import futures
from typing import Optional

import grpc
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc, regression_pb2)

from . import codec
from .core import (InferenceCore, check_input_dtypes, check_input_names, model_metadata_response,
                   model_status_response)
from .errors import PortInUseError, ServingError, invalid_argument
from .memory import TRIM_BYTES, Trimmer
from .observe import Observer, client_host
from .options import ServerOptions, TokenChecker


def _spec(model_spec):
    version = model_spec.version.value if model_spec.HasField("version") else None
    label = model_spec.version_label or None
    return model_spec.name, version, label


def _fill_spec(out_spec, servable, signature_name: str) -> None:
    out_spec.name = servable.name
    out_spec.version.value = servable.version
    out_spec.signature_name = signature_name


def _deadline(context) -> Optional[float]:
    """Seconds left of the client's deadline (None without one)."""
    left = context.time_remaining() if context is not None else None
    return None if left is None or left > 1e9 else max(left, 1e-3)


_VERB = {"Predict": "predict", "Classify": "classify", "Regress": "regress", "GetModelMetadata": "metadata",
         "GetModelStatus": "status"}


def _guard(fn):
    verb = _VERB.get(fn.__name__, "other")

    def wrapper(self, request, context):
        t0 = time.perf_counter()
        code, message = grpc.StatusCode.OK, None
        if self.observer is not None:
            self.observer.grpc_call(1)
        try:
            return fn(self, request, context)
        except ServingError as e:
            code, message = e.code, e.message
        except Exception as e:  # noqa: BLE001
            code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        finally:
            if self.observer is not None:
                self.observer.grpc_call(-1)
            _record(self.observer, fn.__name__, verb, request, context, code, t0)
        context.abort(code, message)
    wrapper.__name__ = fn.__name__
    return wrapper


def _record(observer, rpc: str, verb: str, request, context, code, t0: float) -> None:
    if observer is None:
        return
    model = request.model_spec.name if request is not None and request.HasField("model_spec") else None
    try:
        peer = client_host(context.peer())
    except Exception:  # noqa: BLE001
        peer = ""
    observer.record("grpc", verb, model, code.name, time.perf_counter() - t0, client=peer, method=rpc,
                    bytes_in=request.ByteSize() if request is not None else 0)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: InferenceCore, options: Optional[ServerOptions] = None,
                 observer: Optional[Observer] = None):
        self.core = core
        self.repo = core.repo
        self.options = options or ServerOptions()
        self.observer = observer
        self.trimmer = Trimmer()
        self.trim_executor = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="privtrain-grpc-trim")

    @_guard
    def Predict(self, request, context):  # noqa: N802
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        with self.repo.handle(*_spec(request.model_spec)) as s:
            sig = s.signature(request.model_spec.signature_name)
            # Names, then dtypes, then each declared shape against the limits: all before allocating.
            check_input_names(sig, request.inputs.keys())
            check_input_dtypes(sig, {k: v.dtype for k, v in request.inputs.items()})
            o = self.options
            sizes = [codec.tensor_proto_extent(v, k, o.max_tensor_elements) for k, v in request.inputs.items()]
            decoded = sum(b for _, b in sizes)
            codec.check_request_totals(sum(n for n, _ in sizes), decoded, len(sizes),
                                       o.max_request_elements, o.max_request_bytes)
            inputs = {k: codec.tensor_proto_to_array(v, k, o.max_tensor_elements, o.max_message_bytes)
                      for k, v in request.inputs.items()}
            out = self.core.predict(s, sig, inputs, list(request.output_filter), _deadline(context))
            resp = predict_pb2.PredictResponse()
            _fill_spec(resp.model_spec, s, sig.name)
        for k, v in out.items():
            codec.array_to_tensor_proto(v, resp.outputs[k])
        if decoded > TRIM_BYTES:      # give a large request's memory back (as the REST server does)
            del inputs, out
            self.trimmer.schedule(self.trim_executor)
        return resp

    @_guard
    def Classify(self, request, context):  # noqa: N802
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        examples = codec.examples_from_input_proto(request.input)
        with self.repo.handle(*_spec(request.model_spec)) as s:
            sig_name, result = self.core.classify(s, request.model_spec.signature_name, examples,
                                                  _deadline(context))
            resp = classification_pb2.ClassificationResponse()
            _fill_spec(resp.model_spec, s, sig_name)
        for row in result:
            c = resp.result.classifications.add()
            for label, score in row:
                cl = c.classes.add()
                cl.label, cl.score = label, score
        return resp

    @_guard
    def Regress(self, request, context):  # noqa: N802
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        examples = codec.examples_from_input_proto(request.input)
        with self.repo.handle(*_spec(request.model_spec)) as s:
            sig_name, result = self.core.regress(s, request.model_spec.signature_name, examples,
                                                 _deadline(context))
            resp = regression_pb2.RegressionResponse()
            _fill_spec(resp.model_spec, s, sig_name)
        for v in result:
            resp.result.regressions.add().value = v
        return resp

    @_guard
    def GetModelMetadata(self, request, context):  # noqa: N802
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        with self.repo.handle(*_spec(request.model_spec)) as s:
            return model_metadata_response(s, list(request.metadata_field))

    def MultiInference(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not supported by privtrain serve")


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: InferenceCore, observer: Optional[Observer] = None):
        self.repo = core.repo
        self.observer = observer

    @_guard
    def GetModelStatus(self, request, context):  # noqa: N802
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        return model_status_response(self.repo, *_spec(request.model_spec))

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "privtrain serve reloads from the serving directory; config reload is not supported")


class _AuthInterceptor(grpc.ServerInterceptor):
    """Every call needs ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED otherwise)."""

    def __init__(self, checker: TokenChecker, observer: Optional[Observer] = None):
        self.checker = checker
        self.observer = observer

    def intercept_service(self, continuation, handler_call_details):
        md = {k.lower(): v for k, v in (handler_call_details.invocation_metadata or ())}
        auth = md.get("authorization")
        problem = self.checker.check(auth if isinstance(auth, str) else None)
        if problem is None:
            return continuation(handler_call_details)

        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        observer = self.observer

        def deny(request, context):
            _record(observer, rpc, _VERB.get(rpc, "other"), None, context, grpc.StatusCode.UNAUTHENTICATED,
                    time.perf_counter())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return grpc.unary_unary_rpc_method_handler(deny)


class GrpcServer:
    """Binds in the constructor (a taken port raises PortInUseError at once)."""

    def __init__(self, host: str, port: int, core: InferenceCore, options: Optional[ServerOptions] = None,
                 observer: Optional[Observer] = None):
        self.options = o = options or ServerOptions()
        checker = TokenChecker(o.tokens())
        creds = o.grpc_credentials()
        self._executor = futures.ThreadPoolExecutor(max_workers=o.grpc_workers,
                                                    thread_name_prefix="privtrain-grpc")
        self._server = grpc.server(
            self._executor, interceptors=[_AuthInterceptor(checker, observer)] if checker else None,
            maximum_concurrent_rpcs=o.max_concurrent_requests,
            options=[
                ("grpc.so_reuseport", 0),   # a port already taken must fail, not be shared
                ("grpc.max_receive_message_length", o.max_message_bytes),
                ("grpc.max_send_message_length", o.max_message_bytes),
                ("grpc.server_handshake_timeout_ms", int(o.handshake_timeout_s * 1000)),
            ])
        self._predictions = PredictionServicer(core, o, observer)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self._predictions, self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core, observer), self._server)
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = (self._server.add_secure_port(addr, creds) if creds is not None
                         else self._server.add_insecure_port(addr))
        except RuntimeError:
            self.port = 0
        if not self.port:
            self._server.stop(None)
            self._executor.shutdown(wait=False)
            raise PortInUseError("gRPC", host, port, "--grpc-port")

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: Optional[float] = None) -> None:
        """Refuse new calls, let in-flight ones finish (``grace`` s, default the drain timeout)."""
        self._server.stop(self.options.drain_timeout_s if grace is None else grace).wait()
        self._executor.shutdown(wait=True)
        self._predictions.trim_executor.shutdown(wait=True)
