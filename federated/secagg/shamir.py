"""Shamir t-of-n secret sharing over the prime field GF(p), p = 2^521 - 1 (a Mersenne prime).

A secret is an integer in [0, p) (a 32-byte key fits). ``share(secret, t, xs)`` evaluates a random polynomial of
degree t-1 with constant term ``secret`` at the nonzero points ``xs``; any t shares give the secret back by
Lagrange interpolation at 0, and any t-1 shares are uniformly distributed whatever the secret (information-
theoretically hiding). Coefficients come from ``secrets`` (the OS CSPRNG).
"""
from __future__ import annotations

import secrets
from typing import Dict, Iterable, Mapping

PRIME = 2 ** 521 - 1


class ShamirError(ValueError):
    """Too few shares, or malformed parameters."""


def share(secret: int, threshold: int, xs: Iterable[int]) -> Dict[int, int]:
    """``{x: f(x)}`` for each x in ``xs``; f random of degree ``threshold - 1`` with f(0) = ``secret``."""
    xs = [int(x) for x in xs]
    if not 0 <= int(secret) < PRIME:
        raise ShamirError("the secret must be an integer in [0, 2^521 - 1)")
    if threshold < 1 or threshold > len(xs):
        raise ShamirError(f"threshold must be in 1..{len(xs)} (the number of shares), got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share points must be distinct and nonzero")
    coeffs = [int(secret)] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):   # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) from at least ``threshold`` shares ``{x: y}`` (uses the first ``threshold`` by x)."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed to reconstruct")
    pts = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


def to_int(key: bytes) -> int:
    return int.from_bytes(key, "big")


def to_bytes(value: int, length: int = 32) -> bytes:
    if value >= 1 << (8 * length):
        raise ShamirError(f"reconstructed value does not fit {length} bytes (wrong or too few shares)")
    return int(value).to_bytes(length, "big")
