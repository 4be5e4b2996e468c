"""The distributed discrete Gaussian encoder (Kairouz, Liu & Steinke 2021), client side and server side.

Each client turns its clipped model update x (L2 norm <= ``clip``) into a vector of Z_{2^bits}:

1. pad to d' = 2^ceil(log2 d) and rotate: random signs (public, per round) then the orthonormal Walsh-Hadamard
   transform, which flattens the vector so that no coordinate carries much of its norm;
2. scale by 1/gamma and round each coordinate randomly to a neighbouring integer (unbiased), repeating the rounding
   until the integer vector's L2 norm is at most ``norm_bound`` (conditional randomised rounding, beta);
3. add its share of discrete Gaussian noise N_Z(0, local_stddev^2) per coordinate (Canonne, Kamath & Steinke 2020's
   rejection sampler from the discrete Laplace, vectorised in floating point as TFF's: ``dgauss``), drawn from a
   ChaCha20 stream under a fresh 256-bit OS key (local_stddev^2 rounded up by at most 2^-20: never less noise);
4. reduce mod 2^bits. The server's SecAgg+ sum of n such vectors is the integer sum mod 2^bits; ``gamma`` is
   chosen so that this sum's coordinates stay within (-2^(bits-1), 2^(bits-1)) except with probability about
   ``2 d' exp(-k^2/2)`` per round (k = ``tail``), i.e. the modulus does not wrap.

The server decodes: centre, times gamma, inverse rotation, drop the padding. The noise in the decoded sum is the
sum of >= ``min_clients`` clients' shares: its stddev is at least ``noise_multiplier * clip`` (DP-FedAvg's).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Optional

import numpy as np

from federated.secagg import dgauss, prg

DEFAULT_BITS = 20
DEFAULT_BETA = math.exp(-0.5)
DEFAULT_TAIL = 6.0


def padded(d: int) -> int:
    return 1 << max(0, int(math.ceil(math.log2(max(1, int(d))))))


def fwht(a: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of a power-of-two-long vector (its own inverse)."""
    a = np.asarray(a, np.float64).copy()
    n = a.shape[0]
    h = 1
    while h < n:
        a = a.reshape(-1, 2, h)
        a = np.concatenate([a[:, 0] + a[:, 1], a[:, 0] - a[:, 1]], axis=1)
        h *= 2
    return a.reshape(n) / math.sqrt(n)


def discrete_gaussian(sigma: float, size: int, stream: Optional[dgauss.Stream] = None) -> np.ndarray:
    """``size`` samples of N_Z(0, sigma^2) (P(y) proportional to exp(-y^2 / (2 sigma^2)), y integer): CKS's
    rejection sampler vectorised in floating point (``dgauss.discrete_gaussian_fast``) on a ChaCha20 stream under a
    fresh OS key; sigma^2 rounded up by at most 2^-20."""
    return dgauss.discrete_gaussian_fast(sigma, size, stream)


def rounded_norm_bound(scaled_clip: float, d: int, beta: float) -> float:
    """The L2 bound conditional rounding enforces on the integer vector (Kairouz et al. 2021, eq. 12)."""
    b1 = scaled_clip + math.sqrt(d)
    if beta <= 0:
        return b1
    b2 = math.sqrt(scaled_clip ** 2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (scaled_clip + math.sqrt(d) / 2))
    return min(b1, b2)


@dataclasses.dataclass(frozen=True)
class DDGParams:
    """One round's public encoding parameters (all clients use the same)."""

    dim: int               # d: the update's length
    clip: float            # L2 clip of one client's update
    bits: int              # ring Z_{2^bits}
    gamma: float           # quantisation step
    local_stddev: float    # each client's discrete Gaussian stddev, in integer units
    min_clients: int       # the fewest clients whose noise a released sum holds (SecAgg+'s threshold)
    max_clients: int       # the most clients in one sum (the ring is sized for it)
    beta: float = DEFAULT_BETA

    @property
    def dim_padded(self) -> int:
        return padded(self.dim)

    @property
    def norm_bound(self) -> float:
        """L2 bound of one client's integer vector (before noise)."""
        return rounded_norm_bound(self.clip / self.gamma, self.dim_padded, self.beta)

    @property
    def central_stddev(self) -> float:
        """Stddev of the noise in the decoded sum, in the update's units, with ``min_clients`` contributing."""
        return self.local_stddev * self.gamma * math.sqrt(self.min_clients)

    @staticmethod
    def for_noise(dim: int, clip: float, noise_multiplier: float, min_clients: int, max_clients: int,
                  bits: int = DEFAULT_BITS, tail: float = DEFAULT_TAIL, beta: float = DEFAULT_BETA) -> "DDGParams":
        """Parameters whose decoded sum carries noise of stddev >= ``noise_multiplier * clip`` once
        ``min_clients`` clients contribute, in a ring of 2^bits that a sum of ``max_clients`` does not wrap
        (each coordinate within ``tail`` standard deviations)."""
        prg.check_bits(bits)
        if not 1 <= min_clients <= max_clients:
            raise ValueError(f"min_clients must be in 1..max_clients, got {min_clients} and {max_clients}")
        if not noise_multiplier > 0 or not clip > 0:
            raise ValueError("distributed DP needs noise_multiplier > 0 and clip > 0")
        dp = padded(dim)
        # a coordinate of the sum: the rotated sum of n clipped updates (norm <= n c, so sub-Gaussian with
        # variance proxy (n c)^2/d': the clients may be aligned), n roundings (|error| < 1) and n noise shares:
        # in integer units k sqrt((n c)^2/d' + n z^2 c^2/m) / gamma + n
        spread = tail * math.sqrt((max_clients * clip) ** 2 / dp
                                  + max_clients * (noise_multiplier * clip) ** 2 / min_clients)
        room = 2.0 ** (bits - 1) - max_clients - 1
        if room <= 0:
            raise ValueError(f"a ring of 2^{bits} is too small for {max_clients} clients; use more bits")
        gamma = spread / room
        local = noise_multiplier * clip / (gamma * math.sqrt(min_clients))
        return DDGParams(int(dim), float(clip), int(bits), float(gamma), float(local), int(min_clients),
                         int(max_clients), float(beta))


# The integer scale of the federated path: a clipped update's norm C maps to INT_CLIP integer units (gamma =
# C / INT_CLIP), whatever the model's size, so the accounting (norm bound, noise in integer units) is fixed before
# the model is built: the planned event bounds every model of up to MAX_DIM parameters (padded). The ring size is
# then chosen per model so that the sum does not wrap (it changes communication, not privacy).
INT_CLIP = 2.0 ** 16
MAX_DIM = 2 ** 24


def for_scale(dim: int, clip: float, noise_multiplier: float, min_clients: int, max_clients: int,
              int_clip: float = INT_CLIP, tail: float = DEFAULT_TAIL, beta: float = DEFAULT_BETA) -> DDGParams:
    """Parameters with gamma = clip / int_clip and the smallest ring (<= 2^62) whose sum of ``max_clients``
    updates stays within ``tail`` standard deviations of each coordinate."""
    if not 1 <= min_clients <= max_clients:
        raise ValueError(f"min_clients must be in 1..max_clients, got {min_clients} and {max_clients}")
    if padded(dim) > MAX_DIM:
        raise ValueError(f"a model of {dim} parameters exceeds the {MAX_DIM} that secure aggregation's accounting "
                         "covers; use a smaller model")
    dp = padded(dim)
    gamma = float(clip) / int_clip
    local = float(noise_multiplier) * int_clip / math.sqrt(min_clients)
    spread = tail * math.sqrt((max_clients * int_clip) ** 2 / dp + max_clients * local ** 2) + max_clients + 1
    bits = max(8, int(math.ceil(math.log2(spread))) + 1)
    prg.check_bits(bits)
    return DDGParams(int(dim), float(clip), bits, gamma, local, int(min_clients), int(max_clients), float(beta))


def _signs(seed: bytes, n: int) -> np.ndarray:
    bits = prg.expand(hashlib.sha256(b"rotation" + seed).digest(), n, 1)
    return 1.0 - 2.0 * bits.astype(np.float64)


def clip_l2(x: np.ndarray, clip: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norm = float(np.linalg.norm(x))
    return x * min(1.0, clip / norm) if norm > 0 else x


def encode(x: np.ndarray, params: DDGParams, rotation_seed: bytes, stream: Optional[dgauss.Stream] = None,
           max_tries: int = 1000) -> np.ndarray:
    """Client side: clip, rotate, scale, round (conditionally), add noise, reduce mod 2^bits -> uint64. The
    randomness (rounding and noise) is a ChaCha20 stream under a fresh 256-bit OS key."""
    if x.shape != (params.dim,):
        raise ValueError(f"update of length {x.shape} for dim {params.dim}")
    stream = stream or dgauss.Stream()
    dp = params.dim_padded
    v = np.zeros(dp)
    v[:params.dim] = clip_l2(x, params.clip)
    v = fwht(v * _signs(rotation_seed, dp)) / params.gamma
    bound2 = params.norm_bound ** 2
    floor = np.floor(v)
    for _ in range(max_tries):
        q = floor + (stream.uniform(dp) < (v - floor))
        if float(np.dot(q, q)) <= bound2:
            break
    else:
        raise RuntimeError("conditional rounding did not meet the norm bound (beta too small?)")
    z = q.astype(np.int64) + discrete_gaussian(params.local_stddev, dp, stream)
    return z.view(np.uint64) & prg.ring_mask(params.bits)


def decode(total: np.ndarray, params: DDGParams, rotation_seed: bytes) -> np.ndarray:
    """Server side: the ring sum -> the (noisy) real sum of the clipped updates."""
    t = np.asarray(total, np.uint64).astype(np.int64)
    half = 1 << (params.bits - 1)
    t = np.where(t >= half, t - (1 << params.bits), t).astype(np.float64)
    v = fwht(t * params.gamma) * _signs(rotation_seed, params.dim_padded)
    return v[:params.dim]
