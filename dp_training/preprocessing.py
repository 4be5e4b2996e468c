"""DP normalisation statistics: the means and standard deviations the model normalises numeric features with.

The pipeline's Transform only applies public functions (declared log1p, clipping to the reference schema's
public range, scaling that range to [0, 1]); nothing it outputs is estimated from the private rows. The model
then standardises each scaled feature ``u`` with a mean and standard deviation released here with the Gaussian
mechanism (as Tramèr & Boneh 2021 normalise ScatterNet features), and this release is composed with training
into the run's one guarantee and ledger entry.

Mechanism: every training row contributes the vector ``(1, u_1..u_k, u_1²..u_k²) / sqrt(1 + 2k)`` (each
``u_j`` clipped to [0, 1]), whose L2 norm is at most 1; the sum over rows gets ``N(0, σ² I)`` noise. Adding or
removing a row moves the sum by at most 1 (replacing one: at most 2, which dp_accounting's Gaussian under
``replace_one`` accounts for). The event is ``GaussianDpEvent(σ)``. Means, variances and the noisy row count
are post-processing of that one release. The noisy count is used only inside this computation and is never
published.

    plan = plan_normalization(feature_keys, epsilon, delta, accountant, relation)   # public, before any data
    stats = release_normalization(plan, {key: u[n, 1]}, rng)                      # touches the private rows
"""
from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Dict, Mapping, Optional, Sequence, Tuple

import dp_accounting
import numpy as np

from dp_training import accountants, events as ev

# Bounds on a released standard deviation (in [0, 1] units; 0.5 is the largest any [0, 1] variable has): keep
# the normalisation well-conditioned when a feature is (nearly) constant or, on small data, the noise drives the
# variance estimate below zero or far up. Post-processing: no privacy cost.
MIN_STD = 0.05
MAX_STD = 0.5
MAX_NOISE = 1e6


@dataclasses.dataclass(frozen=True)
class NormalizationPlan:
    """Public before any data is read: which scaled features, and the noise on the statistics vector."""

    feature_keys: Tuple[str, ...]
    noise_multiplier: float          # sigma of N(0, sigma^2) per coordinate of the unit-sensitivity sum
    epsilon_alone: Optional[float]   # the epsilon this release would have on its own (for the record)

    def event(self) -> dp_accounting.DpEvent:
        if not self.feature_keys:
            return dp_accounting.NoOpDpEvent()
        return dp_accounting.GaussianDpEvent(self.noise_multiplier)


@dataclasses.dataclass(frozen=True)
class NormalizationStats:
    """The released statistics (covered by the run's guarantee); mean/std in the scaled [0, 1] units."""

    mean: Mapping[str, float]
    std: Mapping[str, float]

    def to_json(self) -> dict:
        return {"mean": dict(self.mean), "std": dict(self.std)}


def gaussian_noise_for_epsilon(epsilon: float, delta: float, accountant: str = accountants.DEFAULT,
                               relation: str = ev.ADD_OR_REMOVE_ONE, tol: float = 1e-3) -> float:
    """Smallest sigma (within ``tol`` relative) whose unit-sensitivity Gaussian release has epsilon <= ``epsilon``."""
    e = float(epsilon)
    if not e > 0 or math.isinf(e):
        raise ValueError(f"the preprocessing epsilon must be a finite number > 0, got {epsilon!r}; pass e.g. "
                         "--preprocessing-epsilon 0.1")

    def eps(s: float) -> float:
        return accountants.epsilon(dp_accounting.GaussianDpEvent(s), delta, accountant, relation)

    lo, hi = 1e-3, 1.0
    while eps(hi) > e:
        lo, hi = hi, hi * 2
        if hi > MAX_NOISE:
            raise ValueError(f"preprocessing epsilon {e:g} is unreachable at delta {delta:g}")
    while (hi - lo) > tol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) > e:
            lo = mid
        else:
            hi = mid
    return hi


def plan_normalization(feature_keys: Sequence[str], epsilon: float, delta: float,
                       accountant: str = accountants.DEFAULT,
                       relation: str = ev.ADD_OR_REMOVE_ONE) -> NormalizationPlan:
    keys = tuple(feature_keys)
    if not keys:
        return NormalizationPlan((), 0.0, 0.0)
    sigma = gaussian_noise_for_epsilon(epsilon, delta, accountant, relation)
    alone = accountants.epsilon(dp_accounting.GaussianDpEvent(sigma), delta, accountant, relation)
    return NormalizationPlan(keys, float(sigma), float(alone))


def release_normalization(plan: NormalizationPlan, scaled: Mapping[str, np.ndarray],
                          rng: Optional[np.random.Generator] = None) -> NormalizationStats:
    """The Gaussian release of the module docstring. ``scaled[key]`` holds each row's value in [0, 1]."""
    keys = plan.feature_keys
    if not keys:
        return NormalizationStats({}, {})
    if rng is None:  # fresh OS entropy per release; a seed is for tests only
        rng = np.random.default_rng(secrets.randbits(128))
    k = len(keys)
    scale = 1.0 / math.sqrt(1 + 2 * k)
    columns = [np.clip(np.asarray(scaled[key], np.float64).reshape(-1), 0.0, 1.0) for key in keys]
    n = columns[0].shape[0] if columns else 0
    sums = np.empty(1 + 2 * k)
    sums[0] = n
    for j, u in enumerate(columns):
        sums[1 + j] = u.sum()
        sums[1 + k + j] = np.square(u).sum()
    noisy = sums * scale + rng.normal(0.0, plan.noise_multiplier, size=sums.shape)
    noisy = noisy / scale
    count = noisy[0]
    mean, std = {}, {}
    for j, key in enumerate(keys):
        if count < 1.0:  # the noise swamps the count: fall back to the uniform distribution's moments
            m, s = 0.5, math.sqrt(1.0 / 12.0)
        else:
            m = float(np.clip(noisy[1 + j] / count, 0.0, 1.0))
            var = noisy[1 + k + j] / count - m * m
            s = float(math.sqrt(max(var, MIN_STD ** 2)))
        mean[key], std[key] = m, min(max(s, MIN_STD), MAX_STD)
    return NormalizationStats(mean, std)


__all__ = ["NormalizationPlan", "NormalizationStats", "plan_normalization", "release_normalization",
           "gaussian_noise_for_epsilon", "MIN_STD"]


# -- image data sets: DP per-channel moments of ScatterNet features (Tramèr & Boneh's DP "batch normalisation") -----
@dataclasses.dataclass(frozen=True)
class ChannelStats:
    """Released per-channel mean and variance of feature maps (covered by the run's guarantee)."""

    mean: Tuple[float, ...]
    variance: Tuple[float, ...]

    def to_json(self) -> dict:
        return {"mean": list(self.mean), "variance": list(self.variance)}


# Public clip norms of a row's per-channel first / second moment vectors (ScatterNet features of images scaled to
# [0, 1]: the order-0 channel is a local average of pixels, at most 1; the others are much smaller).
MOMENT_CLIP = 1.0
MIN_VARIANCE = 1e-6
# Post-processing of the released statistics (no privacy cost): each channel's standard deviation is kept within
# these multiples of its released mean. ScatterNet features are non-negative with a standard deviation of the
# order of their mean (0.64-1.32 times it on Fashion-MNIST's training split), while the noisy second moment of a
# channel with a small variance can be off by a factor of ten at epsilon 0.3; the clamp bounds that error.
# NOT applied by default (issue 17.10): the range was read off the training split, a data-dependent choice outside
# the guarantee; kept only for experiments that state it (dp_training/images.py, docs/image_data.md).
STD_TO_MEAN = (0.7, 1.4)


def release_channel_moments(plan: NormalizationPlan, features: np.ndarray, clip_first: float = MOMENT_CLIP,
                            clip_second: float = MOMENT_CLIP, rng: Optional[np.random.Generator] = None,
                            batch: int = 4096, std_to_mean: Optional[Tuple[float, float]] = None
                            ) -> Tuple[ChannelStats, dict]:
    """The same Gaussian release as :func:`release_normalization`, for feature maps ``[n, channels, ...]``.

    Every row contributes ``(1, m / C1, s / C2) / sqrt(3)`` where ``m`` and ``s`` are its per-channel spatial means
    of the features and of their squares, each vector clipped to L2 norm ``C1`` / ``C2`` (public constants): the
    contribution's norm is at most 1, so adding or removing a row moves the sum by at most 1 and the release is
    ``GaussianDpEvent(plan.noise_multiplier)``, planned and charged by the protocol like the tabular one. Means,
    variances and the noisy count are post-processing. Returns the stats and private diagnostics (the share of
    clipped rows: computed from the rows, kept in the workdir). ``std_to_mean=(lo, hi)`` clamps each channel's
    standard deviation to ``[lo, hi] * |mean|`` (post-processing, e.g. :data:`STD_TO_MEAN` for ScatterNet features)."""
    k = len(plan.feature_keys)
    if rng is None:
        rng = np.random.default_rng(secrets.randbits(128))
    n = int(features.shape[0])
    if features.shape[1] != k:
        raise ValueError(f"the plan covers {k} channels, the features have {features.shape[1]}")
    sums = np.zeros(1 + 2 * k)
    clipped = 0
    for s in range(0, n, batch):
        x = np.asarray(features[s:s + batch], np.float64).reshape(min(batch, n - s), k, -1)
        m, sq = x.mean(axis=2), np.square(x).mean(axis=2)
        fm = np.minimum(1.0, clip_first / np.maximum(np.linalg.norm(m, axis=1), 1e-12))[:, None]
        fs = np.minimum(1.0, clip_second / np.maximum(np.linalg.norm(sq, axis=1), 1e-12))[:, None]
        clipped += int(((fm < 1) | (fs < 1)).sum())
        sums[0] += len(x)
        sums[1:1 + k] += (m * fm).sum(axis=0) / clip_first
        sums[1 + k:] += (sq * fs).sum(axis=0) / clip_second
    scale = 1.0 / math.sqrt(3.0)
    noisy = (sums * scale + rng.normal(0.0, plan.noise_multiplier, size=sums.shape)) / scale
    count = noisy[0]
    if count < 1.0:   # the noise swamps the count: standardise nothing
        return ChannelStats((0.0,) * k, (1.0,) * k), {"moments_clipped_rows": clipped}
    mean = noisy[1:1 + k] * clip_first / count
    second = noisy[1 + k:] * clip_second / count
    var = np.maximum(second - np.square(mean), MIN_VARIANCE)
    if std_to_mean is not None:
        lo, hi = std_to_mean
        floor = np.maximum(lo * np.abs(mean), math.sqrt(MIN_VARIANCE))
        var = np.square(np.clip(np.sqrt(var), floor, np.maximum(hi * np.abs(mean), floor)))
    return (ChannelStats(tuple(float(v) for v in mean), tuple(float(v) for v in var)),
            {"moments_clipped_rows": clipped})


__all__ += ["ChannelStats", "release_channel_moments"]
