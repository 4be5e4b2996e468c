"""Looks for a noise key block (``int64[4, 3]`` from ``dp_training.secure_noise``) in files and log lines: each
64-bit word in decimal (signed and unsigned), hex (any case, with or without 0x, padded or not) and as raw
little/big-endian bytes."""
from __future__ import annotations

import os
import struct
from typing import Iterable, List

import numpy as np


def forms(block) -> List[bytes]:
    out = []
    for w in [int(x) for x in np.asarray(block, np.int64).ravel()]:
        u = w & ((1 << 64) - 1)
        texts = {str(w), str(u), f"{u:x}", f"{u:016x}"}
        for t in texts:
            out += [t.encode(), t.upper().encode()]
        out += [struct.pack("<Q", u), struct.pack(">Q", u)]
    return [f for f in out if len(f) >= 8]   # shorter forms would match by chance


def find(blocks: Iterable, root: str, extra_text: Iterable[str] = ()) -> List[str]:
    """``["<file or 'log'>: <form>", ...]`` for every appearance of a word of ``blocks`` under ``root``."""
    needles = [f for b in blocks for f in forms(b)]
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
