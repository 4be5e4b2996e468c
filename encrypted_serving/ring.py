"""TF-Encrypted's ring encoding and ABY3 replicated sharing, in plain numpy (both environments).

TFE 0.9.1's ABY3 uses ``fixed64_heuristic``: a value ``x`` is the ring element ``round(x * 2**16)`` of
Z/2**64 (stored as int64, arithmetic wraps). A secret ``v`` is split into three additive shares
``v = s0 + s1 + s2 (mod 2**64)`` and party ``i`` holds the *pair* ``(s_i, s_{i+1 mod 3})``: exactly the
layout of ``ABY3PrivateTensor.shares[i]`` (``[[s0, s1], [s1, s2], [s2, s0]]``). Any single party's pair
is uniformly random and independent of ``v``; any two parties together hold all three shares.

Also the wire frame used between clients, gateways and party workers: ``MAGIC | u32 header length |
JSON header | raw arrays``, where the header lists every array's name, dtype (``<i8`` only) and shape.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Dict, List, Sequence, Tuple

import numpy as np

FRACTIONAL_BITS = 16                  # fixed64_heuristic.precision_fractional
SCALE = float(2 ** FRACTIONAL_BITS)
INTEGRAL_BITS = 11                    # fixed64_heuristic.precision_integral: |values| well below 2**11
NPARTIES = 3
MAGIC = b"PTS1"
DTYPE = "<i8"
MAX_HEADER = 1 << 16
MAX_DIMS = 8


class FrameError(ValueError):
    """A frame or share is malformed; the message says what is wrong."""


def encode(x: np.ndarray) -> np.ndarray:
    """float -> ring element (int64, wrapping), TFE's fixed64 encoding (rounded)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise FrameError("values must be finite (NaN or infinity found)")
    if np.any(np.abs(x) >= 2.0 ** (63 - FRACTIONAL_BITS)):
        raise FrameError("values too large for the 64-bit fixed-point ring")
    return np.round(x * SCALE).astype(np.int64)


def decode(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.int64).astype(np.float64) / SCALE


def random_ring(shape) -> np.ndarray:
    """Uniform ring elements from the OS CSPRNG."""
    n = int(np.prod(shape)) if len(shape) else 1
    return np.frombuffer(os.urandom(8 * n), dtype=np.int64).reshape(shape).copy()


def split(v: np.ndarray) -> List[np.ndarray]:
    """Three additive shares of ring tensor v (s0 + s1 + s2 = v mod 2**64), fresh randomness each call."""
    v = np.asarray(v, dtype=np.int64)
    s0, s1 = random_ring(v.shape), random_ring(v.shape)
    s2 = (v.view(np.uint64) - s0.view(np.uint64) - s1.view(np.uint64)).view(np.int64)
    return [s0, s1, s2]


def replicate(shares: Sequence[np.ndarray]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Party i's pair (s_i, s_{i+1}): ABY3's replicated layout."""
    return [(shares[i], shares[(i + 1) % NPARTIES]) for i in range(NPARTIES)]


def share_for_parties(x: np.ndarray) -> List[Tuple[np.ndarray, np.ndarray]]:
    """float tensor -> one (s_i, s_{i+1}) pair per party."""
    return replicate(split(encode(x)))


def combine(shares: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of additive ring shares (wrapping)."""
    acc = np.zeros(np.shape(shares[0]), dtype=np.uint64)
    for s in shares:
        acc = acc + np.asarray(s, dtype=np.int64).view(np.uint64)
    return acc.view(np.int64)


def combine_bits(shares: Sequence[np.ndarray]) -> np.ndarray:
    """XOR of boolean shares (low bit)."""
    acc = np.zeros(np.shape(shares[0]), dtype=np.int64)
    for s in shares:
        acc ^= np.asarray(s, dtype=np.int64)
    return acc & 1


def digest(a: np.ndarray) -> str:
    """Short hash of a share's bytes: lets the driver check that two parties got the same replicated share
    without learning it (a share is uniformly random, so its hash reveals nothing about the secret)."""
    return hashlib.blake2b(np.ascontiguousarray(a, dtype=DTYPE).tobytes(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------- frames
def pack(header: dict, arrays: Dict[str, np.ndarray] = None) -> bytes:
    arrays = arrays or {}
    header = dict(header)
    header["arrays"] = [{"name": k, "dtype": DTYPE, "shape": list(np.shape(v))} for k, v in arrays.items()]
    h = json.dumps(header, separators=(",", ":")).encode()
    parts = [MAGIC, struct.pack("<I", len(h)), h]
    parts += [np.ascontiguousarray(v, dtype=DTYPE).tobytes() for v in arrays.values()]
    return b"".join(parts)


def recv_exact(conn, n: int):
    """Exactly ``n`` bytes from a socket, or None when the peer closed first (the framing's reader)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def unpack(data: bytes, max_elements: int = 1 << 26) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Parse and validate a frame; FrameError names the problem (garbage, wrong dtype, wrong length)."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise FrameError("not a privtrain share frame (bad magic: garbage bytes?)")
    (hlen,) = struct.unpack("<I", bytes(data[4:8]))
    if hlen > MAX_HEADER or 8 + hlen > len(data):
        raise FrameError("frame header length %d is out of range" % hlen)
    try:
        header = json.loads(bytes(data[8:8 + hlen]).decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise FrameError("frame header is not JSON (garbage bytes?)") from e
    if not isinstance(header, dict) or not isinstance(header.get("arrays", []), list):
        raise FrameError("frame header must be an object with an 'arrays' list")
    arrays, off, total = {}, 8 + hlen, 0
    for spec in header.get("arrays", []):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise FrameError("each array needs a name")
        if spec.get("dtype") != DTYPE:
            raise FrameError("array %r has dtype %r; shares must be little-endian int64 ring elements (%s)"
                             % (spec["name"], spec.get("dtype"), DTYPE))
        shape = spec.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= max_elements for d in shape)):
            raise FrameError("array %r has an invalid shape %r (at most %d dimensions of 0..%d)"
                             % (spec["name"], shape, MAX_DIMS, max_elements))
        n = 1
        for d in shape:        # Python ints: np.prod wraps around in int64 (2**62 * 4 == 0) and skipped the cap
            n *= d
        total += n
        if total > max_elements:
            raise FrameError("frame holds more than %d elements" % max_elements)
        end = off + 8 * n
        if end > len(data):
            raise FrameError("array %r: expected %d bytes for shape %s, frame has only %d left (wrong length)"
                             % (spec["name"], 8 * n, shape, len(data) - off))
        arrays[spec["name"]] = np.frombuffer(bytes(data[off:end]), dtype=DTYPE).reshape(shape)
        off = end
    if off != len(data):
        raise FrameError("%d trailing bytes after the arrays the header lists (wrong length)" % (len(data) - off))
    return header, arrays
