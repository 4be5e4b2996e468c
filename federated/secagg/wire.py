"""The data-only frame format between the driver (server side) and the client processes: tagged JSON of ints,
strings, bytes, lists, int-keyed dicts, uint64 vectors and the protocol's message records. Decoding builds only
these types, through their constructors (``Params`` re-checks itself), so a frame cannot run code in the receiving
process (unlike pickle) nor smuggle a ``Params`` past its checks. A malformed frame raises ``WireError``.
"""
from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np

MAX_FRAME = 1 << 31


class WireError(ValueError):
    """A frame that is not a well-formed data frame."""


def _records():
    from federated.secagg.protocol import Advert, Params, Unmasking

    return {"Advert": Advert, "Params": Params, "Unmasking": Unmasking}


def _enc(obj: Any):
    if obj is None or isinstance(obj, (str, float)) or (isinstance(obj, int) and not isinstance(obj, bool)):
        return obj
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, bytes):
        return {"b": base64.b64encode(obj).decode()}
    if isinstance(obj, (list, tuple)):
        return {"l": [_enc(x) for x in obj]}
    if isinstance(obj, dict):
        return {"d": [[_enc(k), _enc(v)] for k, v in obj.items()]}
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint64 and obj.ndim == 1:
        return {"u64": base64.b64encode(obj.astype("<u8").tobytes()).decode()}
    for name, cls in _records().items():
        if type(obj) is cls:
            return {name: _enc(obj.to_wire())}
    raise WireError(f"cannot send a {type(obj).__name__} in a data frame")


def _dec(v: Any):
    if v is None or isinstance(v, (str, float)) or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    if not isinstance(v, dict) or len(v) != 1:
        raise WireError("malformed data frame")
    (tag, body), = v.items()
    try:
        if tag == "b":
            return base64.b64decode(body, validate=True)
        if tag == "l":
            return [_dec(x) for x in body]
        if tag == "d":
            return {_dec(k): _dec(x) for k, x in body}
        if tag == "u64":
            return np.frombuffer(base64.b64decode(body, validate=True), "<u8").astype(np.uint64)
        records = _records()
        if tag in records:
            fields = _dec(body)
            if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
                raise WireError(f"malformed {tag} record")
            if tag == "Params":
                fields["clients"] = tuple(fields.get("clients") or ())
            return records[tag](**fields)
    except WireError:
        raise
    except (TypeError, ValueError) as e:
        raise WireError(f"refused {tag} in a data frame: {e}") from None
    raise WireError(f"unknown tag {tag!r} in a data frame")


def dumps(obj: Any) -> bytes:
    return json.dumps(_enc(obj), separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise WireError("not a data frame (JSON expected)") from None
    try:
        return _dec(doc)
    except RecursionError:
        raise WireError("data frame nested too deeply") from None


def send(stream, obj) -> None:
    data = dumps(obj)
    stream.write(struct.pack(">Q", len(data)) + data)
    stream.flush()


def recv(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("secure aggregation client process closed its pipe")
    (n,) = struct.unpack(">Q", head)
    if n > MAX_FRAME:
        raise WireError(f"frame of {n} bytes exceeds the {MAX_FRAME} limit")
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("secure aggregation client process closed its pipe")
    return loads(data)
