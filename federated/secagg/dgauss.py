"""Discrete Gaussian sampling (Canonne, Kamath & Steinke 2020) from a ChaCha20 keystream under a fresh 256-bit OS
key (``Stream``; not numpy's PCG64): ``discrete_gaussian``, Algorithms 1-3 in exact integer arithmetic (pure
Python, 40-70 us a sample: the reference), and ``discrete_gaussian_fast``, the same rejection sampler vectorised in
floating point (the encoder's: about 100x faster). sigma^2 is rounded up to a multiple of 2^-20 in both."""
from __future__ import annotations

import math
import secrets
from fractions import Fraction

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SIGMA2_DEN = 1 << 20


class Stream:
    """Uniform integers and doubles from ChaCha20(key, nonce 0) with a fresh OS key (or a given one)."""

    def __init__(self, key: bytes | None = None):
        self._enc = Cipher(algorithms.ChaCha20(key or secrets.token_bytes(32), b"\x00" * 16), mode=None).encryptor()
        self._buf, self._pos = b"", 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._buf = self._buf[self._pos:] + self._enc.update(b"\x00" * max(65536, n))
            self._pos = 0
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def randbelow(self, n: int) -> int:
        """Uniform in [0, n), by rejection (no modulo bias)."""
        k = n.bit_length()
        nb, mask = (k + 7) // 8, (1 << k) - 1
        while True:
            r = int.from_bytes(self.take(nb), "little") & mask
            if r < n:
                return r

    def uniform(self, size: int) -> np.ndarray:
        """``size`` doubles uniform on the grid k 2^-53 of [0, 1)."""
        w = np.frombuffer(self.take(8 * size), "<u8") >> np.uint64(11)
        return w.astype(np.float64) * 2.0 ** -53


def _bernoulli(num: int, den: int, s: Stream) -> bool:
    return s.randbelow(den) < num


def _bernoulli_exp01(num: int, den: int, s: Stream) -> bool:
    """Bernoulli(exp(-num/den)) for 0 <= num/den <= 1 (CKS Algorithm 1)."""
    k = 1
    while _bernoulli(num, den * k, s):
        k += 1
    return k % 2 == 1


def bernoulli_exp(num: int, den: int, s: Stream) -> bool:
    """Bernoulli(exp(-num/den)) for num/den >= 0."""
    while num > den:
        if not _bernoulli_exp01(1, 1, s):
            return False
        num -= den
    return _bernoulli_exp01(num, den, s)


def _discrete_laplace(t: int, s: Stream) -> int:
    """P(y) proportional to exp(-|y|/t) (CKS Algorithm 2)."""
    while True:
        u = s.randbelow(t)
        if not bernoulli_exp(u, t, s):
            continue
        v = 0
        while bernoulli_exp(1, 1, s):
            v += 1
        x = u + t * v
        neg = s.randbelow(2)
        if neg and x == 0:
            continue
        return -x if neg else x


def sigma2_fraction(sigma: float) -> Fraction:
    """sigma^2 rounded UP to a multiple of 2^-20 (never less noise than planned)."""
    return Fraction(math.ceil(Fraction(sigma) ** 2 * SIGMA2_DEN), SIGMA2_DEN)


def discrete_gaussian(sigma: float, size: int, s: Stream | None = None) -> np.ndarray:
    """``size`` exact samples of N_Z(0, sigma^2) (CKS Algorithm 3), sigma^2 rounded up to a multiple of 2^-20."""
    if sigma <= 0:
        return np.zeros(size, np.int64)
    s = s or Stream()
    sig2 = sigma2_fraction(sigma)
    sn, sd = sig2.numerator, sig2.denominator
    t = math.isqrt(sn // sd) + 1
    den = 2 * sn * t * t * sd
    out = np.empty(size, np.int64)
    for i in range(size):
        while True:
            y = _discrete_laplace(t, s)
            a = abs(y) * t * sd - sn
            if bernoulli_exp(a * a, den, s):
                out[i] = y
                break
    return out


def _geometric(p: float, size: int, s: Stream) -> np.ndarray:
    """P(G = k) = (1 - p)^k p, k >= 0, by inversion of stream uniforms (U in (0, 1])."""
    u = 1.0 - s.uniform(size)
    return np.floor(np.log(u) / math.log1p(-p)).astype(np.int64)


def discrete_gaussian_fast(sigma: float, size: int, s: Stream | None = None) -> np.ndarray:
    """The same rejection sampler vectorised in floating point (as TFF's), on the ChaCha20 stream: the encoder's
    sampler (``discrete_gaussian`` above is the exact reference, about 40-70 us a sample in pure Python)."""
    if sigma <= 0:
        return np.zeros(size, np.int64)
    s = s or Stream()
    sig2 = float(sigma2_fraction(sigma))
    t = math.isqrt(math.floor(sig2)) + 1
    p = -math.expm1(-1.0 / t)
    out = np.empty(0, np.int64)
    while out.shape[0] < size:
        m = 2 * (size - out.shape[0]) + 64
        y = _geometric(p, m, s) - _geometric(p, m, s)   # discrete Laplace, scale t
        accept = s.uniform(m) < np.exp(-np.square(np.abs(y) - sig2 / t) / (2 * sig2))
        out = np.concatenate([out, y[accept]])
    return out[:size]
