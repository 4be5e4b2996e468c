"""The distributed discrete Gaussian's privacy, as a zCDP event the privacy layer's RDP accountant composes.

Kairouz, Liu & Steinke 2021 (arXiv:2102.06387), Proposition 14 / Theorem 1: if each of n clients adds
independent N_Z(0, sigma^2) noise to each of d integer coordinates, then for any two inputs whose sums differ by
Delta_2 in L2 and Delta_1 in L1 norm, the Renyi divergence of order alpha between the two noisy sums is at most

    min( alpha/2 * Delta_2^2/(n sigma^2) + tau d,
         alpha/2 * (Delta_2^2/(n sigma^2) + 2 Delta_1 tau/(sqrt(n) sigma) + tau^2 d),
         alpha/2 * (Delta_2/(sqrt(n) sigma) + sqrt(d) tau)^2 ),
    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k/(k+1)).

Each term is an (xi, rho)-zCDP bound: ``ZCDpEvent(xi, rho)`` (dp_accounting: (alpha, xi + rho alpha)-RDP). The RDP
accountant (``--accountant rdp``) composes it; the PLD accountant does not support it (it would need the privacy
loss distribution of the sum, which a zCDP bound does not give).

No amplification by client sampling is claimed: the server runs the protocol with the sampled clients, so it knows
who took part. n is the protocol's threshold (the fewest clients whose noise a released sum can hold).
"""
from __future__ import annotations

import math
from typing import Sequence

import dp_accounting
import numpy as np

from federated.secagg import ddp
from federated.secagg.ddp import DDGParams


def tau(sigma: float, n: int) -> float:
    return 10.0 * sum(math.exp(-2 * math.pi ** 2 * sigma ** 2 * k / (k + 1)) for k in range(1, int(n)))


def zcdp_terms(l2: float, l1: float, sigma: float, n: int, d: int):
    """The three (xi, rho) pairs of Proposition 14 (integer units)."""
    t = tau(sigma, n)
    s = math.sqrt(n) * sigma
    return [(t * d, l2 ** 2 / (2 * s ** 2)),
            (0.0, (l2 ** 2 / s ** 2 + 2 * l1 * t / s + t ** 2 * d) / 2),
            (0.0, (l2 / s + math.sqrt(d) * t) ** 2 / 2)]


def rdp(orders: Sequence[float], l2: float, l1: float, sigma: float, n: int, d: int) -> np.ndarray:
    orders = np.asarray(orders, np.float64)
    return np.min([xi + rho * orders for xi, rho in zcdp_terms(l2, l1, sigma, n, d)], axis=0)


def sensitivities(params: DDGParams, replace: bool):
    """(Delta_2, Delta_1) of the integer sum when one privacy unit changes: one client's vector is added or
    removed (``replace=False``) or replaced (``replace=True``: twice the norm bound). L1 of an integer vector is at
    most min(sqrt(d') L2, L2^2)."""
    b = params.norm_bound
    l1 = b * min(math.sqrt(params.dim_padded), b)
    k = 2.0 if replace else 1.0
    return k * b, k * l1


def round_event(params: DDGParams, replace: bool) -> dp_accounting.DpEvent:
    """One round's release (the decoded noisy sum) as ``ZCDpEvent``: the tightest of the three bounds at order
    alpha = 8 (each is valid at every order)."""
    l2, l1 = sensitivities(params, replace)
    terms = zcdp_terms(l2, l1, params.local_stddev, params.min_clients, params.dim_padded)
    xi, rho = min(terms, key=lambda p: p[0] + 8 * p[1])
    return dp_accounting.ZCDpEvent(rho=float(rho), xi=float(xi))


def training_event(params: DDGParams, rounds: int, replace: bool) -> dp_accounting.DpEvent:
    if rounds <= 0:
        return dp_accounting.NoOpDpEvent()
    return dp_accounting.SelfComposedDpEvent(round_event(params, replace), int(rounds))


def planned_event(noise_multiplier: float, min_clients: int, rounds: int, replace: bool) -> dp_accounting.DpEvent:
    """What ``rounds`` rounds of the federated path release, fixed before the model is built: integer scale
    ``ddp.INT_CLIP``, the norm bound at ``ddp.MAX_DIM`` coordinates (it grows with the dimension, so this bounds
    every smaller model), local noise ``noise_multiplier * INT_CLIP / sqrt(min_clients)``."""
    if rounds <= 0:
        return dp_accounting.NoOpDpEvent()
    local = float(noise_multiplier) * ddp.INT_CLIP / math.sqrt(min_clients)
    worst = DDGParams(ddp.MAX_DIM, 1.0, ddp.prg.MAX_BITS, 1.0 / ddp.INT_CLIP, local, int(min_clients),
                      int(min_clients))
    return training_event(worst, rounds, replace)
