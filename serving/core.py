"""Inference operations shared by the REST and gRPC front ends (TF Serving semantics)."""
from __future__ import annotations

import functools
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .batcher import Batcher
from .deadline import Watchdog
from .errors import invalid_argument
from .repository import ModelRepository, Servable, Signature


def _join(names) -> str:
    return ",".join(sorted(names))


def check_input_names(sig: Signature, sent_names) -> None:
    """TF Serving's checks (predict_util.cc): the same number of inputs, then every alias known."""
    sent, expected = set(sent_names), set(sig.inputs)
    if len(sent) != len(expected):
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{_join(sent)}}}) != len({{{_join(expected)}}}). "
            f"Sent extra: {{{_join(sent - expected)}}}. "
            f"Missing but required: {{{_join(expected - sent)}}}.")
    for alias in sorted(sent - expected):
        raise invalid_argument(
            f"input tensor alias not found in signature: {alias}. Inputs expected to be in the set "
            f"{{{_join(expected)}}}.")


def check_input_dtypes(sig: Signature, sent_dtypes: Mapping[str, int]) -> None:
    """gRPC tensors must have the signature's dtype exactly (TF Serving does not convert)."""
    for i, name in enumerate(sorted(sig.inputs)):
        want = sig.sig_def.inputs[name].dtype
        got = sent_dtypes[name]
        if got != want:
            from .codec import dtype_name

            raise invalid_argument(f"Expects arg[{i}] to be {dtype_name(want)} but {dtype_name(got)} is "
                                   f"provided (input '{name}')")


class InferenceCore:
    """``timeout_s``: longest a model computation may run (cancelled then: DEADLINE_EXCEEDED); a call may
    pass a shorter one (a gRPC client's deadline)."""

    def __init__(self, repo: ModelRepository, batcher: Optional[Batcher] = None, async_batcher=None,
                 timeout_s: Optional[float] = None):
        self.repo = repo
        self.batcher = batcher
        self.async_batcher = async_batcher
        self.timeout_s = timeout_s
        self.watchdog = Watchdog() if timeout_s else None

    def stop(self) -> None:
        """End the timeout watchdog's thread."""
        if self.watchdog is not None:
            self.watchdog.stop()

    def _timeout(self, timeout_s: Optional[float]) -> Optional[float]:
        if timeout_s is None:
            return self.timeout_s
        return timeout_s if self.timeout_s is None else min(timeout_s, self.timeout_s)

    def _fn(self, sig: Signature, timeout_s: Optional[float] = None):
        t = self._timeout(timeout_s)
        return functools.partial(sig, timeout_s=t, watchdog=self.watchdog) if t and self.watchdog else sig

    # ---- predict -----------------------------------------------------------------------
    @staticmethod
    def _check(sig: Signature, inputs: Mapping[str, np.ndarray], output_filter: Sequence[str]) -> None:
        check_input_names(sig, inputs)
        for alias in output_filter:
            if alias not in sig.outputs:
                raise invalid_argument(
                    f"output tensor alias not found in signature: {alias} Outputs expected to be "
                    f"in the set {{{_join(sig.outputs)}}}.")

    def predict(self, servable: Servable, sig: Signature, inputs: Mapping[str, np.ndarray],
                output_filter: Sequence[str] = (), timeout_s: Optional[float] = None) -> Dict[str, np.ndarray]:
        self._check(sig, inputs, output_filter)
        fn = self._fn(sig, timeout_s)
        if self.batcher is not None:
            out = self.batcher.run((servable.name, servable.version, sig.name), fn, inputs)
        else:
            out = fn(inputs)
        if output_filter:
            out = {k: v for k, v in out.items() if k in set(output_filter)}
        return out

    def predict_submit(self, servable: Servable, sig: Signature, inputs: Mapping[str, np.ndarray],
                       callback) -> None:
        """The REST server's path when batching is on (on its event loop): ``callback(out, error)``."""
        self._check(sig, inputs, ())
        self.async_batcher.submit((servable.name, servable.version, sig.name), self._fn(sig), inputs, callback)

    # ---- classify / regress --------------------------------------------------------------
    @staticmethod
    def _single_input_signature(servable: Servable, name: str):
        """The named signature (default ``serving_default``), checked to take one input, as TF Serving
        requires of classify and regress signatures."""
        name = name or "serving_default"
        sig = servable.signatures.get(name)
        if sig is None:
            raise invalid_argument(f"No signature was found with the name: {name}")
        if len(sig.sig_def.inputs) != 1:
            raise invalid_argument("Expected one input Tensor.")
        return name, sig, sig.sig_def

    @classmethod
    def classification_signature(cls, servable: Servable, name: str) -> Signature:
        name, sig, sd = cls._single_input_signature(servable, name)
        if len(sd.outputs) not in (1, 2):
            raise invalid_argument(f"Expected one or two output Tensors, found {len(sd.outputs)}")
        if "inputs" not in sd.inputs:
            raise invalid_argument(f"No classification inputs found in SignatureDef: {name}")
        if "classes" not in sd.outputs and "scores" not in sd.outputs:
            raise invalid_argument(
                'Expected classification signature outputs to contain at least one of "classes" '
                f'or "scores". Signature was: {name}')
        return sig

    @classmethod
    def regression_signature(cls, servable: Servable, name: str) -> Signature:
        name, sig, sd = cls._single_input_signature(servable, name)
        if len(sd.outputs) != 1:
            raise invalid_argument("Expected one output Tensor.")
        if "inputs" not in sd.inputs:
            raise invalid_argument(f"No regression inputs found in SignatureDef: {name}")
        if "outputs" not in sd.outputs:
            raise invalid_argument(f"No regression outputs found in SignatureDef: {name}")
        return sig

    @staticmethod
    def _examples_array(examples: List[bytes]) -> np.ndarray:
        if not examples:
            raise invalid_argument("Input is empty.")
        arr = np.empty(len(examples), dtype=object)
        arr[:] = examples
        return arr

    def classify(self, servable: Servable, signature_name: str, examples: List[bytes],
                 timeout_s: Optional[float] = None) -> Tuple[str, List[List[Tuple[str, float]]]]:
        sig = self.classification_signature(servable, signature_name)
        out = self._fn(sig, timeout_s)({"inputs": self._examples_array(examples)})
        n = len(examples)
        classes, scores = out.get("classes"), out.get("scores")
        for what, t in (("classes", classes), ("scores", scores)):
            if t is None:
                continue
            if t.ndim != 2:
                raise invalid_argument(f"Expected Tensor shape: [batch_size num_classes] but got {list(t.shape)}")
            if t.shape[0] != n:
                raise invalid_argument(f"Expected {what} output batch size of {n}. Got: {t.shape[0]}")
        if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
            raise invalid_argument("Tensors class and score should match in dim_size(1). Got "
                                   f"{classes.shape[1]} vs. {scores.shape[1]}")
        k = (classes if classes is not None else scores).shape[1]
        result = []
        for i in range(n):
            row = []
            for c in range(k):
                label = bytes(classes[i, c]).decode("utf-8", "replace") if classes is not None else ""
                score = float(scores[i, c]) if scores is not None else 0.0
                row.append((label, score))
            result.append(row)
        return sig.name, result

    def regress(self, servable: Servable, signature_name: str, examples: List[bytes],
                timeout_s: Optional[float] = None) -> Tuple[str, List[float]]:
        sig = self.regression_signature(servable, signature_name)
        out = self._fn(sig, timeout_s)({"inputs": self._examples_array(examples)})["outputs"]
        n = len(examples)
        if not (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)) or out.shape[0] != n:
            raise invalid_argument("Expected output Tensor shape to be either [batch_size] or "
                                   f"[batch_size, 1] but got {list(out.shape)}")
        return sig.name, [float(x) for x in out.reshape(-1)]


# ---- status / metadata protos (shared by REST and gRPC) -------------------------------------------
_STATE_ENUM = {"START": 10, "LOADING": 20, "AVAILABLE": 30, "UNLOADING": 40, "END": 50}


def model_status_response(repo: ModelRepository, name: str, version: Optional[int],
                          label: Optional[str]):
    from tensorflow_serving.apis import get_model_status_pb2
    from tensorflow.core.protobuf import error_codes_pb2

    resp = get_model_status_pb2.GetModelStatusResponse()
    for v, state, code, msg in repo.status(name, version, label):
        mvs = resp.model_version_status.add()
        mvs.version = v
        mvs.state = _STATE_ENUM[state]
        mvs.status.SetInParent()
        mvs.status.error_code = error_codes_pb2.Code.Value(code)
        mvs.status.error_message = msg
    return resp


def model_metadata_response(servable: Servable, fields: Sequence[str] = ("signature_def",)):
    from tensorflow_serving.apis import get_model_metadata_pb2

    if not fields:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for f in fields:
        if f != "signature_def":
            raise invalid_argument(f"Metadata field {f} is not supported")
    resp = get_model_metadata_pb2.GetModelMetadataResponse()
    resp.model_spec.name = servable.name
    resp.model_spec.version.value = servable.version
    resp.metadata["signature_def"].Pack(servable.signature_def_map)
    return resp
