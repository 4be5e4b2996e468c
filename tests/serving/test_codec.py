"""The REST/gRPC codec on its own, table-driven as TF Serving's util/json_tensor_test.cc: each row is a request
body (or value) and the arrays or the error it must give. No server is started."""
from __future__ import annotations

import json

import numpy as np
import pytest

from serving import codec
from serving.errors import ServingError

SIG = {"x": np.float32}
SIG2 = {"age": np.int64, "workclass": np.object_}

# (name, body, signature inputs, expected {name: array} and format)
DECODE_OK = [
    ("row, one input", {"instances": [[1.0, 2.0], [3.0, 4.0]]}, SIG,
     {"x": np.array([[1, 2], [3, 4]], np.float32)}, "row"),
    ("columnar, one input", {"inputs": [[1.5]]}, SIG, {"x": np.array([[1.5]], np.float32)}, "columnar"),
    ("columnar, named object", {"inputs": {"x": [0.25]}}, SIG, {"x": np.array([0.25], np.float32)}, "columnar"),
    ("row, named inputs", {"instances": [{"age": 39, "workclass": "State-gov"}, {"age": 50, "workclass": "x"}]},
     SIG2, {"age": np.array([39, 50], np.int64), "workclass": np.array([b"State-gov", b"x"], object)}, "row"),
    ("b64 string", {"instances": [{"age": 1, "workclass": {"b64": "aGk="}}]}, SIG2,
     {"age": np.array([1], np.int64), "workclass": np.array([b"hi"], object)}, "row"),
    ("integral float for int64", {"inputs": {"age": [2.0], "workclass": ["a"]}}, SIG2,
     {"age": np.array([2], np.int64), "workclass": np.array([b"a"], object)}, "columnar"),
    ("scalar", {"inputs": 3.0}, SIG, {"x": np.array(3.0, np.float32)}, "columnar"),
]

# (name, body, signature inputs, words the error message must contain)
DECODE_ERRORS = [
    ("both keys", {"instances": [1.0], "inputs": [1.0]}, SIG, "only one of 'inputs' or 'instances'"),
    ("no key", {"foo": 1}, SIG, "Missing 'inputs' or 'instances' key"),
    ("instances not a list", {"instances": 1.0}, SIG, "to be an list/array"),
    ("empty instances", {"instances": []}, SIG, "No values in 'instances' list"),
    ("ragged", {"instances": [[1.0, 2.0], [3.0]]}, SIG, "consistent across dimensions"),
    ("string for float", {"instances": ["a"]}, SIG, "is not of expected type: float"),
    ("bool for float", {"instances": [True]}, SIG, "Type: Bool"),
    ("fraction for int64", {"inputs": {"age": [1.5], "workclass": ["a"]}}, SIG2, "not of expected type: int64"),
    ("int64 overflow", {"inputs": {"age": [2 ** 63], "workclass": ["a"]}}, SIG2, "int64"),
    ("float32 overflow", {"instances": [1e300]}, SIG, "out of range"),
    ("missing named input", {"inputs": {"age": [1]}}, SIG2, "Missing named input: workclass"),
    ("keys do not match", {"instances": [{"age": 1}]}, SIG2, "keys do not match signature inputs"),
    ("number for string", {"instances": [{"age": 1, "workclass": 7}]}, SIG2, "is not of expected type: string"),
]


@pytest.mark.parametrize("name,body,sig,expected,fmt", DECODE_OK, ids=[r[0] for r in DECODE_OK])
def test_decode(name, body, sig, expected, fmt):
    arrays, got_fmt = codec.predict_request_from_json(body, sig)
    assert got_fmt == fmt
    assert sorted(arrays) == sorted(expected)
    for k, want in expected.items():
        assert arrays[k].dtype == want.dtype and arrays[k].shape == want.shape
        assert arrays[k].tolist() == want.tolist()


@pytest.mark.parametrize("name,body,sig,words", DECODE_ERRORS, ids=[r[0] for r in DECODE_ERRORS])
def test_decode_errors(name, body, sig, words):
    with pytest.raises(ServingError) as e:
        codec.predict_request_from_json(body, sig)
    assert words in e.value.message
    assert e.value.http_status == 400


@pytest.mark.parametrize("body,words", [(b"", "document is empty"), (b"{", "JSON Parse error"),
                                        (b"[1]", "is not an object"),
                                        (b'{"instances": ["\\ud800"]}', "surrogate pair")])
def test_parse_json_body_errors(body, words):
    with pytest.raises(ServingError) as e:
        codec.parse_json_body(body)
    assert words in e.value.message


def test_element_cap_is_checked():
    with pytest.raises(ServingError) as e:
        codec.predict_request_from_json({"instances": [[0.0] * 10] * 10}, SIG, max_elements=99)
    assert "100 elements" in e.value.message


@pytest.mark.parametrize("outputs,fmt,expected", [
    ({"y": np.array([0.3, 1.0], np.float32)}, "row", {"predictions": [0.3, 1.0]}),
    ({"y": np.array([[0.5]], np.float32)}, "columnar", {"outputs": [[0.5]]}),
    ({"a": np.array([1, 2], np.int64), "b": np.array([b"u", b"v"], object)}, "row",
     {"predictions": [{"a": 1, "b": "u"}, {"a": 2, "b": "v"}]}),
    ({"a": np.array([1], np.int64), "b": np.array([2.5], np.float64)}, "columnar",
     {"outputs": {"a": [1], "b": [2.5]}}),
    ({"id_bytes": np.array([b"\x00\xff"], object)}, "row", {"predictions": [{"b64": "AP8="}]}),
])
def test_encode(outputs, fmt, expected):
    assert json.loads(json.dumps(codec.predict_response_to_json(outputs, fmt))) == expected


@pytest.mark.parametrize("arr", [np.array([[1.5, -2.0]], np.float32), np.array([3, 4], np.int64),
                                 np.array([b"a", b""], object), np.array([True, False])])
def test_tensor_proto_round_trip(arr):
    tp = codec.array_to_tensor_proto(arr)
    back = codec.tensor_proto_to_array(tp, "t", max_elements=100, max_bytes=10_000)
    assert back.shape == arr.shape and back.tolist() == arr.tolist()


def test_tensor_proto_declared_size_is_checked_before_allocating():
    from tensorflow.core.framework import tensor_pb2, types_pb2

    tp = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    tp.tensor_shape.dim.add().size = 16_000_000
    tp.float_val.append(1.0)   # one value, padded to the declared shape by TensorFlow
    with pytest.raises(ServingError) as e:
        codec.tensor_proto_to_array(tp, "x", max_elements=1_000_000)
    assert "more than the server allows" in e.value.message
    with pytest.raises(ServingError) as e:
        codec.tensor_proto_to_array(tp, "x", max_elements=None, max_bytes=1_000_000)
    assert "bytes" in e.value.message
