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


def _weights(xs):
    """The Lagrange denominators' inverses 1 / prod_{j != i} (x_i - x_j) of the points ``xs``."""
    out = []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if i != j:
                den = den * (xi - xj) % PRIME
        out.append(pow(den, -1, PRIME))
    return out


def _evaluate(xs, ys, weights, x: int) -> int:
    """f(x) of the degree-(len(xs)-1) polynomial through (xs, ys), with prefix/suffix products: O(len(xs))."""
    diffs = [(x - xi) % PRIME for xi in xs]
    n = len(xs)
    prefix, suffix = [1] * (n + 1), [1] * (n + 1)
    for i in range(n):
        prefix[i + 1] = prefix[i] * diffs[i] % PRIME
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] * diffs[i] % PRIME
    return sum(ys[i] * weights[i] % PRIME * prefix[i] % PRIME * suffix[i + 1] for i in range(n)) % PRIME


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) from at least ``threshold`` shares ``{x: y}``: interpolates the first ``threshold`` by x and checks that
    every further share lies on the same polynomial (a wrong share among more than ``threshold`` is detected)."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed to reconstruct")
    pts = sorted((int(x) % PRIME, int(y) % PRIME) for x, y in shares.items())
    xs, ys = [x for x, _ in pts[:threshold]], [y for _, y in pts[:threshold]]
    w = _weights(xs)
    for x, y in pts[threshold:]:
        if _evaluate(xs, ys, w, x) != y:
            raise ShamirError(f"inconsistent shares: the share at {x} is not on the polynomial of the others "
                              "(a wrong or tampered share)")
    return _evaluate(xs, ys, w, 0)


def to_int(key: bytes) -> int:
    return int.from_bytes(key, "big")


def to_bytes(value: int, length: int = 32) -> bytes:
    if value >= 1 << (8 * length):
        raise ShamirError(f"reconstructed value does not fit {length} bytes (wrong or too few shares)")
    return int(value).to_bytes(length, "big")
