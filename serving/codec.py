"""Conversions between TF Serving's wire formats and numpy.

REST (tensorflow_serving/util/json_tensor.cc semantics):
  * request ``{"signature_name"?, "instances": [...]}`` (row) or ``{"inputs": ...}`` (columnar);
  * binary strings as ``{"b64": "..."}``;
  * response ``{"predictions": [...]}`` (row: one value per row for a single output, else one object
    per row) or ``{"outputs": ...}`` (columnar: the value for a single output, else an object);
  * string outputs whose name ends in ``_bytes`` come back as ``{"b64": ...}``.
gRPC: ``TensorProto`` <-> numpy without going through ``tf.make_tensor_proto`` (faster).
"""
from __future__ import annotations

import base64
import json
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .errors import invalid_argument

_TYPE_NAMES = {np.float32: "float", np.float64: "double", np.int32: "int32", np.int64: "int64",
               np.int8: "int8", np.int16: "int16", np.uint8: "uint8", np.bool_: "bool",
               np.object_: "string", np.float16: "half"}


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _json_type(v) -> str:
    if isinstance(v, bool):
        return "Bool"
    if isinstance(v, (int, float)):
        return "Number"
    if isinstance(v, str):
        return "String"
    if isinstance(v, list):
        return "Array"
    if isinstance(v, dict):
        return "Object"
    return "Null"


def _is_b64(v) -> bool:
    return isinstance(v, dict) and len(v) == 1 and "b64" in v


def _to_bytes(v) -> bytes:
    if isinstance(v, str):
        try:
            return v.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid_argument("JSON Parse error: The surrogate pair in string is invalid.") from None
    if _is_b64(v):
        return _b64decode(v["b64"])
    raise invalid_argument(f"JSON Value: {json.dumps(v)} Type: {_json_type(v)} "
                           "is not of expected type: string")


def _b64decode(text) -> bytes:
    """Standard base64 (padding optional, as absl::Base64Unescape); anything else is a 400, never a
    silently emptied value."""
    if not isinstance(text, str):
        raise invalid_argument(f"JSON Value: {json.dumps(text)} Type: {_json_type(text)} is not of expected "
                               "type: string (in a {\"b64\": ...} object)")
    t = text.strip()
    t += "=" * (-len(t) % 4)
    try:
        return base64.b64decode(t, validate=True)
    except (ValueError, TypeError):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise invalid_argument(f"Unable to base64 decode: {shown!r} is not standard base64 "
                               "(A-Z a-z 0-9 + /, '=' padding)") from None


def _string_array(value) -> np.ndarray:
    def conv(x):
        if isinstance(x, list):
            return [conv(y) for y in x]
        return _to_bytes(x)

    converted = conv(value)
    arr = np.empty(_shape_of(converted), dtype=object)
    if arr.ndim == 0:
        arr[()] = converted
    else:
        _fill(arr, converted)
    return arr


def _shape_of(v) -> Tuple[int, ...]:
    shape = []
    while isinstance(v, list):
        shape.append(len(v))
        if not v:
            break
        v = v[0]
    return tuple(shape)


def _fill(arr: np.ndarray, nested) -> None:
    flat = arr.reshape(-1)
    i = 0

    def walk(x, depth):
        nonlocal i
        if depth == arr.ndim:
            if isinstance(x, list):
                raise invalid_argument("Expecting tensor size to be consistent across dimensions")
            flat[i] = x
            i += 1
            return
        if not isinstance(x, list) or len(x) != arr.shape[depth]:
            raise invalid_argument("Expecting tensor size to be consistent across dimensions")
        for y in x:
            walk(y, depth + 1)

    walk(nested, 0)


# Exact ranges of the integer dtypes; float32 / float16 overflow is detected after the cast.
def _type_name(np_dtype) -> str:
    return _TYPE_NAMES.get(np_dtype, np.dtype(np_dtype).name)


def _out_of_range(arr: np.ndarray, np_dtype) -> Optional[Any]:
    """The first value of ``arr`` that ``np_dtype`` cannot hold (None when all fit)."""
    dt = np.dtype(np_dtype)
    if not arr.size:
        return None
    if dt.kind in "iu":
        if arr.dtype.kind in "iu" and np.can_cast(arr.dtype, dt):
            return None
        info = np.iinfo(dt)
        bad = (arr < info.min) | (arr > info.max)
    elif dt.kind == "f" and dt.itemsize < arr.dtype.itemsize:
        wide = arr.astype(np.float64, copy=False)
        bad = np.isfinite(wide) & (np.abs(wide) > np.finfo(dt).max)
    else:
        return None
    return arr[bad].reshape(-1)[0] if np.any(bad) else None


def json_to_array(value, np_dtype, what: str, max_elements: Optional[int] = None) -> np.ndarray:
    """A JSON value (scalar / nested lists) as an array of the signature input's dtype."""
    if np_dtype is np.object_:
        arr = _string_array(value)
        _check_elements(arr.size, what, max_elements)
        return arr
    try:
        arr = np.asarray(value)
    except ValueError:
        raise invalid_argument(f"Failed to process {what}: expecting tensor size to be "
                               "consistent across dimensions") from None
    _check_elements(arr.size, what, max_elements)
    if arr.dtype == object or arr.dtype.kind in "US":
        bad = value
        while isinstance(bad, list) and bad:
            bad = bad[0]
        if arr.dtype == object and _shape_of(value) != arr.shape:
            raise invalid_argument(f"Failed to process {what}: expecting tensor size to be "
                                   "consistent across dimensions")
        if arr.dtype == object:   # e.g. an integer beyond 64 bits among numbers
            bad = next((x for x in arr.reshape(-1) if not isinstance(x, (float, str)) and not (
                isinstance(x, int) and not isinstance(x, bool) and -2 ** 63 <= x < 2 ** 64)), bad)
        raise invalid_argument(f"JSON Value: {json.dumps(bad)} Type: {_json_type(bad)} is not of "
                               f"expected type: {_type_name(np_dtype)}")
    if np_dtype is np.bool_:
        if arr.dtype != np.bool_:
            raise invalid_argument(f"JSON Value in {what} is not of expected type: bool")
        return arr
    if arr.dtype == np.bool_:
        raise invalid_argument(f"JSON Value: {json.dumps(value)} Type: Bool is not of expected type: "
                               f"{_type_name(np_dtype)}")
    if np.dtype(np_dtype).kind in "iu" and arr.dtype.kind == "f":
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise invalid_argument(f"JSON Value in {what} is not of expected type: {_type_name(np_dtype)}")
    bad = _out_of_range(arr, np_dtype)
    if bad is not None:   # e.g. 1e300 for a float32 input: TF Serving answers 400, not inf
        raise invalid_argument(f"JSON Value: {json.dumps(bad.item() if hasattr(bad, 'item') else bad)} "
                               f"Type: Number is not of expected type: {_type_name(np_dtype)} "
                               f"(out of range) in {what}")
    return arr.astype(np_dtype, copy=False)


def _check_elements(n: int, what: str, max_elements: Optional[int]) -> None:
    if max_elements is not None and n > max_elements:
        raise invalid_argument(f"{what} has {n} elements, more than the server allows per tensor "
                               f"({max_elements}, privtrain serve --max-tensor-elements)")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# A number that may not fit a double (RapidJSON: "Number too big to be stored in double"): an exponent
# of 3+ digits, or 300+ digits in a row. Only bodies holding one are parsed again, strictly.
_HUGE_NUMBER = re.compile(rb"[0-9.][eE]\+?0*[0-9]{3}|[0-9]{300}")


def _finite_float(text: str) -> float:
    v = float(text)
    if math.isinf(v):
        raise invalid_argument(f"JSON Parse error: Number too big to be stored in double: {text[:40]}")
    return v


def _has_lone_surrogate(doc) -> bool:
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
    return False


def parse_json_body(body: bytes) -> dict:
    if not body or not body.strip():
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except RecursionError:
        raise invalid_argument("JSON Parse error: The document is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid_argument(f"JSON Parse error: Invalid value. at offset: "
                               f"{getattr(e, 'pos', 0)}") from None
    # "\ud800" without its pair parses in Python but is not text (RapidJSON, TF Serving's parser,
    # rejects it): look only when the body holds a surrogate escape at all.
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(doc):
        raise invalid_argument("JSON Parse error: The surrogate pair in string is invalid.")
    if _HUGE_NUMBER.search(body):
        json.loads(body, parse_float=_finite_float)   # raises on 1e400 (which json.loads makes inf)
    if not isinstance(doc, dict):
        raise invalid_argument("JSON Value is not an object")
    return doc


def signature_name_of(doc: dict) -> str:
    sig = doc.get("signature_name", "")
    if not isinstance(sig, str):
        raise invalid_argument("'signature_name' key must be a string value.")
    return sig


def predict_request_from_json(doc: dict, sig_inputs: Mapping[str, Any], max_elements: Optional[int] = None
                              ) -> Tuple[Dict[str, np.ndarray], str]:
    """Inputs ``{name: array}`` and the format (``"row"`` / ``"columnar"``) of a REST predict body."""
    has_inst, has_inp = "instances" in doc, "inputs" in doc
    if has_inst and has_inp:
        raise invalid_argument("Not formatted correctly expecting only one of 'inputs' or "
                               "'instances' keys exists")
    if not has_inst and not has_inp:
        raise invalid_argument("Missing 'inputs' or 'instances' key")
    names = sorted(sig_inputs)
    if has_inp:
        value = doc["inputs"]
        if isinstance(value, dict) and not _is_b64(value):
            # As TF Serving: every signature input must be there; other keys are ignored.
            out = {}
            for k in names:
                if k not in value:
                    raise invalid_argument(f"Missing named input: {k} in 'inputs' object.")
                out[k] = json_to_array(value[k], sig_inputs[k], f"input: {k}", max_elements)
            return out, "columnar"
        if len(names) != 1:
            raise invalid_argument("Input to signature has more than one named tensor; "
                                   "'inputs' must be an object keyed by input name")
        return {names[0]: json_to_array(value, sig_inputs[names[0]], "'inputs'", max_elements)}, "columnar"

    inst = doc["instances"]
    if not isinstance(inst, list):
        raise invalid_argument("Excepting 'instances' to be an list/array")
    if not inst:
        raise invalid_argument("No values in 'instances' list")
    named = isinstance(inst[0], dict) and not _is_b64(inst[0])
    if not named:
        if len(names) != 1:
            raise invalid_argument(f"Expecting object but got list at item 0 of input list")
        return {names[0]: json_to_array(inst, sig_inputs[names[0]], "'instances' list", max_elements)}, "row"
    cols: Dict[str, list] = {}
    for i, row in enumerate(inst):
        if not isinstance(row, dict) or _is_b64(row):
            raise invalid_argument(f"Expecting object but got list at item {i} of input list")
        if len(row) != len(names) or any(k not in sig_inputs for k in row):
            missing = [k for k in names if k not in row]
            extra = [k for k in row if k not in sig_inputs]
            raise invalid_argument(
                f"Failed to process element: {i} of 'instances' list. JSON object: "
                f"{json.dumps(row)[:200]} keys do not match signature inputs "
                f"(missing: {{{','.join(missing)}}}, extra: {{{','.join(extra)}}})")
        for k, v in row.items():
            cols.setdefault(k, []).append(v)
    return {k: json_to_array(v, sig_inputs[k], f"'instances' key: {k}", max_elements)
            for k, v in cols.items()}, "row"


def _nest(flat: list, shape: Tuple[int, ...]):
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = int(np.prod(shape[1:]))
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _float_list(arr: np.ndarray):
    """float32 values printed at float32 precision (0.3, not 0.30000001192092896), like TF Serving."""
    if arr.dtype == np.float32:
        # str() of a numpy float32 scalar is its shortest round-trip decimal form
        return _nest([float(str(x)) for x in arr.reshape(-1)], arr.shape)
    return arr.tolist()


def _jsonable(name: str, arr: np.ndarray):
    if arr.dtype == object or arr.dtype.kind == "S":
        b64 = name.endswith("_bytes")

        def conv(x):
            if isinstance(x, list):
                return [conv(y) for y in x]
            x = bytes(x)
            if b64:
                return {"b64": base64.b64encode(x).decode("ascii")}
            return x.decode("utf-8", errors="replace")

        return conv(arr.tolist())
    if arr.dtype.kind == "f":
        return _float_list(arr)
    return arr.tolist()


def predict_response_to_json(outputs: Mapping[str, np.ndarray], fmt: str) -> dict:
    names = sorted(outputs)
    if fmt == "columnar":
        if len(names) == 1:
            return {"outputs": _jsonable(names[0], outputs[names[0]])}
        return {"outputs": {k: _jsonable(k, outputs[k]) for k in names}}
    if len(names) == 1:
        v = outputs[names[0]]
        if v.ndim == 0:
            raise invalid_argument(f"Tensor name: {names[0]} has no shape information ")
        return {"predictions": _jsonable(names[0], v)}
    batch = None
    cols = {}
    for k in names:
        v = outputs[k]
        if v.ndim == 0:
            raise invalid_argument(f"Tensor name: {k} has no shape information ")
        if batch is None:
            batch = v.shape[0]
        elif v.shape[0] != batch:
            raise invalid_argument(f"Tensor name: {k} has inconsistent batch size: {v.shape[0]} "
                                   f"expecting: {batch}")
        cols[k] = _jsonable(k, v)
    return {"predictions": [{k: cols[k][i] for k in names} for i in range(batch or 0)]}


# ---- tf.Example for :classify / :regress ----------------------------------------------------------
def _feature(key: str, value):
    from tensorflow.core.example import feature_pb2

    vals = value if isinstance(value, list) else [value]
    f = feature_pb2.Feature()
    if not vals:
        return f
    first = vals[0]
    if isinstance(first, str) or _is_b64(first):
        f.bytes_list.value.extend(_to_bytes(v) for v in vals)
    elif all(isinstance(v, int) for v in vals):
        # integers and booleans (true -> 1, false -> 0) become int64_list, as in TF Serving
        if any(not -2 ** 63 <= v < 2 ** 63 for v in vals):
            raise invalid_argument(f"Feature '{key}': integer out of int64 range")
        f.int64_list.value.extend(int(v) for v in vals)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        floats = [float(v) for v in vals]
        if any(math.isfinite(v) and abs(v) > _FLOAT32_MAX for v in floats):
            raise invalid_argument(f"Feature '{key}': value out of float32 range (float_list)")
        f.float_list.value.extend(floats)
    else:
        raise invalid_argument(f"Feature '{key}' has values of mixed or unsupported JSON types")
    return f


def example_from_json(obj) -> bytes:
    from tensorflow.core.example import example_pb2

    if not isinstance(obj, dict):
        raise invalid_argument("Expecting 'examples' to be an array of JSON objects")
    ex = example_pb2.Example()
    for k, v in obj.items():
        ex.features.feature[k].CopyFrom(_feature(k, v))
    return ex.SerializeToString()


def examples_from_json(doc: dict) -> List[bytes]:
    """Serialized tf.Examples of a REST classify/regress body (``context`` merged into each)."""
    examples = doc.get("examples")
    if not isinstance(examples, list):
        raise invalid_argument("'examples' key must be an array of JSON objects" if "examples" in doc
                               else "Missing 'examples' key")
    ctx = doc.get("context")
    ctx_bytes = example_from_json(ctx) if ctx is not None else b""
    # Concatenated serializations merge, the later (the example) winning per feature key.
    return [ctx_bytes + example_from_json(e) for e in examples]


def examples_from_input_proto(inp) -> List[bytes]:
    """Serialized examples of a tensorflow_serving.apis.input_pb2.Input."""
    kind = inp.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in inp.example_list.examples]
    if kind == "example_list_with_context":
        ctx = inp.example_list_with_context.context.SerializeToString()
        return [ctx + e.SerializeToString() for e in inp.example_list_with_context.examples]
    raise invalid_argument("Input is empty")


# ---- TensorProto ------------------------------------------------------------------------------
# dtype enum -> the TensorProto field holding its values (tensorflow/core/framework/tensor.proto)
_VAL_FIELD = {1: "float_val", 2: "double_val", 3: "int_val", 4: "int_val", 5: "int_val", 6: "int_val",
              7: "string_val", 9: "int64_val", 10: "bool_val", 14: "half_val", 17: "int_val",
              19: "half_val", 22: "uint32_val", 23: "uint64_val"}
_TF_MAX_RANK = 254


def dtype_name(dt_enum: int) -> str:
    """TensorFlow's C++ name of a dtype enum (``float``, ``double``, ``int64``, ``string``)."""
    from tensorflow.core.framework import types_pb2

    try:
        return types_pb2.DataType.Name(dt_enum)[3:].lower()
    except ValueError:
        return f"dtype enum {dt_enum}"


STRING_ELEMENT_BYTES = 32   # a decoded string element beyond its bytes: TF's string header + numpy's pointer


def _declared_elements(tp, name: str, max_elements: Optional[int]) -> Tuple[List[int], int]:
    """The declared shape of a request TensorProto and its element count, checked against the
    per-tensor limit without multiplying out a huge shape."""
    if tp.tensor_shape.unknown_rank:
        raise invalid_argument(f"tensor parsing error: {name}: the shape must be known")
    dims = [d.size for d in tp.tensor_shape.dim]
    if len(dims) > _TF_MAX_RANK:
        raise invalid_argument(f"tensor parsing error: {name}: rank {len(dims)} is more than {_TF_MAX_RANK}")
    n = 1
    for d in dims:
        if d < 0:
            raise invalid_argument(f"tensor parsing error: {name}: negative dimension {d} in shape {dims}")
        n *= d
        if max_elements is not None and n > max_elements:
            n = math.prod(dims)
            raise invalid_argument(
                f"{name}: shape {dims} declares {n} elements, more than the server allows per tensor "
                f"({max_elements}, privtrain serve --max-tensor-elements)")
    return dims, n


def tensor_proto_extent(tp, name: str = "input", max_elements: Optional[int] = None) -> Tuple[int, int]:
    """(elements, bytes once decoded) of a request TensorProto, from its declared shape and the values
    sent, without allocating: numbers take their dtype's size, strings their bytes (a padded string
    counted once per element it fills) plus ``STRING_ELEMENT_BYTES`` each."""
    _, n = _declared_elements(tp, name, max_elements)
    if tp.dtype == 7:  # DT_STRING
        vals = tp.string_val
        k = len(vals)
        sent = tp.ByteSize()          # the values' bytes, plus a few bytes of framing each
        pad = (n - k) * len(vals[-1]) if 0 < k < n else 0
        return n, sent + pad + n * STRING_ELEMENT_BYTES
    import tensorflow as tf

    try:
        itemsize = np.dtype(tf.dtypes.as_dtype(tp.dtype).as_numpy_dtype).itemsize
    except TypeError:
        raise invalid_argument(f"tensor parsing error: {name}: unsupported dtype enum {tp.dtype}") from None
    return n, n * itemsize


def check_request_totals(elements: int, nbytes: int, n_inputs: int, max_elements: Optional[int],
                         max_bytes: Optional[int]) -> None:
    """All input tensors of one request together: at most ``max_elements`` elements and ``max_bytes``
    decoded bytes (``--max-request-elements`` / ``--max-request-mb``)."""
    if max_elements is not None and elements > max_elements:
        raise invalid_argument(
            f"the request's {n_inputs} input tensors declare {elements} elements together, more than the "
            f"server allows per request ({max_elements}, privtrain serve --max-request-elements); "
            "send smaller batches")
    if max_bytes is not None and nbytes > max_bytes:
        raise invalid_argument(
            f"the request's {n_inputs} input tensors would take {nbytes / (1 << 20):.1f} MiB once decoded, "
            f"more than the server allows per request ({max_bytes / (1 << 20):g} MiB, privtrain serve "
            "--max-request-mb); send smaller batches")


def check_array_totals(arrays: Mapping[str, np.ndarray], max_elements: Optional[int],
                       max_bytes: Optional[int]) -> None:
    """:func:`check_request_totals` for decoded inputs (REST, whose size the body limit already bounds)."""
    if max_elements is None and max_bytes is None:
        return
    elements = sum(a.size for a in arrays.values())
    nbytes = sum(a.nbytes if a.dtype != object else
                 a.size * STRING_ELEMENT_BYTES + sum(len(x) for x in a.reshape(-1)) for a in arrays.values())
    check_request_totals(elements, nbytes, len(arrays), max_elements, max_bytes)


def tensor_proto_to_array(tp, name: str = "input", max_elements: Optional[int] = None,
                          max_bytes: Optional[int] = None) -> np.ndarray:
    """A request TensorProto as a numpy array, checked *before* anything is allocated: the declared
    shape (at most ``max_elements`` elements), and the values actually sent (``tensor_content`` of
    exactly the declared size, or at most as many typed values as elements; fewer are padded with
    the last one as TensorFlow does, as long as the padded tensor stays within ``max_bytes``).
    The caller has already checked that the dtype is the signature's (and the request's totals)."""
    import tensorflow as tf

    dims, n = _declared_elements(tp, name, max_elements)
    field = _VAL_FIELD.get(tp.dtype)
    if tp.dtype == 7:  # DT_STRING
        vals = tp.string_val
        k = len(vals)
        if k > n:
            raise invalid_argument(f"tensor parsing error: {name}: {k} string values for shape {dims} "
                                   f"({n} elements)")
        if 0 < k < n and max_bytes is not None and (n - k) * (len(vals[-1]) + 32) > max_bytes:
            raise invalid_argument(f"tensor parsing error: {name}: {k} string values would be padded to "
                                   f"{n} elements, more than {max_bytes} bytes")
        arr = np.empty(n, dtype=object)
        if k:
            arr[:k] = list(vals)
            if k < n:
                arr[k:] = vals[-1]
        else:
            arr[:] = b""
        return arr.reshape(dims)
    try:
        np_dtype = tf.dtypes.as_dtype(tp.dtype).as_numpy_dtype
    except TypeError:
        raise invalid_argument(f"tensor parsing error: {name}: unsupported dtype enum {tp.dtype}") from None
    itemsize = np.dtype(np_dtype).itemsize
    if tp.tensor_content:
        if len(tp.tensor_content) != n * itemsize:
            raise invalid_argument(
                f"tensor parsing error: {name}: tensor_content has {len(tp.tensor_content)} bytes, "
                f"shape {dims} of {dtype_name(tp.dtype)} needs {n * itemsize}")
        return np.frombuffer(tp.tensor_content, dtype=np_dtype).reshape(dims)
    if max_bytes is not None and n * itemsize > max_bytes:
        raise invalid_argument(f"tensor parsing error: {name}: shape {dims} of {dtype_name(tp.dtype)} is "
                               f"{n * itemsize} bytes, more than {max_bytes}")
    if field is not None:
        k = len(getattr(tp, field))
        if k > n:
            raise invalid_argument(f"tensor parsing error: {name}: {k} values for shape {dims} ({n} elements)")
    try:
        return tf.make_ndarray(tp)
    except (ValueError, TypeError) as e:
        raise invalid_argument(f"tensor parsing error: {name}: {e}") from None


_NP_TO_DT = None


def array_to_tensor_proto(arr: np.ndarray, tp=None):
    global _NP_TO_DT
    from tensorflow.core.framework import tensor_pb2, types_pb2

    if _NP_TO_DT is None:
        _NP_TO_DT = {np.dtype(np.float32): types_pb2.DT_FLOAT, np.dtype(np.float64): types_pb2.DT_DOUBLE,
                     np.dtype(np.int32): types_pb2.DT_INT32, np.dtype(np.int64): types_pb2.DT_INT64,
                     np.dtype(np.bool_): types_pb2.DT_BOOL, np.dtype(np.uint8): types_pb2.DT_UINT8,
                     np.dtype(np.int8): types_pb2.DT_INT8, np.dtype(np.int16): types_pb2.DT_INT16,
                     np.dtype(np.float16): types_pb2.DT_HALF}
    if tp is None:
        tp = tensor_pb2.TensorProto()
    for d in arr.shape:
        tp.tensor_shape.dim.add().size = d
    if arr.dtype == object or arr.dtype.kind == "S":
        tp.dtype = types_pb2.DT_STRING
        tp.string_val.extend(bytes(x) for x in arr.reshape(-1))
    else:
        tp.dtype = _NP_TO_DT[arr.dtype]
        tp.tensor_content = np.ascontiguousarray(arr).tobytes()
    return tp
