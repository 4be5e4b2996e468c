"""The mask PRG: a 32-byte seed -> a uniform vector in Z_{2^bits}^d from the ChaCha20 keystream.

The keystream is read as little-endian uint64 words and reduced mod 2^bits (a power of two divides 2^64, so the
reduction of a uniform word is exactly uniform). numpy's uint64 arithmetic wraps mod 2^64, hence adding and
subtracting masks then reducing mod 2^bits is exact ring arithmetic.
"""
from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MAX_BITS = 62


def check_bits(bits: int) -> int:
    if not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(f"ring bits must be in 1..{MAX_BITS}, got {bits}")
    return int(bits)


def ring_mask(bits: int) -> np.uint64:
    return np.uint64((1 << int(bits)) - 1)


def expand(seed: bytes, d: int, bits: int, nonce: bytes = b"\x00" * 16) -> np.ndarray:
    """``d`` uniform elements of Z_{2^bits} (uint64) from ChaCha20(key=seed, nonce)."""
    if len(seed) != 32:
        raise ValueError("a PRG seed is 32 bytes")
    enc = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    words = np.frombuffer(enc.update(b"\x00" * (8 * int(d))), dtype="<u8").astype(np.uint64)
    return words & ring_mask(check_bits(bits))
