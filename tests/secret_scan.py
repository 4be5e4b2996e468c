"""Looks for a noise key block (``int64[4, 3]`` from ``dp_training.secure_noise``) in files and log lines: each
64-bit word in decimal (signed and unsigned), hex (any case, with or without 0x, padded or not), the hex of its
bytes in memory order (what ``bytes.hex()`` of a key writes) and as raw little/big-endian bytes; whole secrets
(an AES key, its counter block) also in base64 (standard and URL-safe) and hex."""
from __future__ import annotations

import base64
import os
import struct
from typing import Iterable, List

import numpy as np


def forms(block) -> List[bytes]:
    out = []
    for w in [int(x) for x in np.asarray(block, np.int64).ravel()]:
        u = w & ((1 << 64) - 1)
        texts = {str(w), str(u), f"{u:x}", f"{u:016x}", struct.pack("<Q", u).hex()}
        for t in texts:
            out += [t.encode(), t.upper().encode()]
        out += [struct.pack("<Q", u), struct.pack(">Q", u)]
    return [f for f in out if len(f) >= 8]   # shorter forms would match by chance


def whole_forms(secret: bytes) -> List[bytes]:
    encoded = [base64.b64encode(secret), base64.urlsafe_b64encode(secret), secret.hex().encode()]
    return [e.rstrip(b"=") for e in encoded] + [secret.hex().upper().encode()]


def find(blocks: Iterable, root: str, extra_text: Iterable[str] = (), whole: Iterable[bytes] = ()) -> List[str]:
    """``["<file or 'log'>: <form>", ...]`` for every appearance of a word of ``blocks`` (or of a ``whole``
    secret) under ``root``."""
    needles = [f for b in blocks for f in forms(b)] + [f for w in whole for f in whole_forms(w)]
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            hits += [f"{path}: {n!r}" for n in needles if n in data]
    text = "\n".join(extra_text).encode()
    hits += [f"log: {n!r}" for n in needles if n in text]
    return hits
