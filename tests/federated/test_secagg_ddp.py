"""Distributed DP for secure aggregation (federated/secagg/ddp.py, accounting.py): the sampler, the encoder, the
modulus, and the Kairouz et al. 2021 bound checked against an exact Renyi divergence computed independently."""
from __future__ import annotations

import math
import secrets

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from dp_training import accountants, events
from federated.secagg import accounting, ddp, dgauss, prg


def _dg_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    w = np.exp(-support.astype(np.float64) ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def test_discrete_gaussian_sampler_matches_the_exact_pmf():
    rng = dgauss.Stream(bytes(range(32)))   # a fixed key: a reproducible ChaCha20 stream
    sigma = 1.7
    s = ddp.discrete_gaussian(sigma, 200_000, rng)
    support = np.arange(-12, 13)
    pmf = _dg_pmf(sigma, np.arange(-60, 61))[48:73]
    counts = np.array([(s == k).sum() for k in support])
    assert counts.sum() == s.shape[0]
    assert stats.chisquare(counts, pmf / pmf.sum() * counts.sum()).pvalue > 1e-4
    big = ddp.discrete_gaussian(5000.0, 100_000, rng)
    assert abs(big.std() / 5000.0 - 1) < 0.02 and abs(big.mean()) < 50


def test_walsh_hadamard_rotation_is_orthonormal():
    x = np.random.default_rng(0).normal(size=64)
    np.testing.assert_allclose(ddp.fwht(ddp.fwht(x)), x, atol=1e-12)
    assert math.isclose(np.linalg.norm(ddp.fwht(x)), np.linalg.norm(x))


def test_decoded_sum_is_the_clipped_sum_plus_the_planned_noise():
    d, n = 1000, 50
    par = ddp.DDGParams.for_noise(d, clip=1.0, noise_multiplier=0.5, min_clients=n, max_clients=n)
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=d) * 0.1 for _ in range(n)]
    seed = secrets.token_bytes(32)
    total = sum(ddp.encode(x, par, seed) for x in xs) & prg.ring_mask(par.bits)
    err = ddp.decode(total, par, seed) - sum(ddp.clip_l2(x, 1.0) for x in xs)
    assert abs(err.std() / 0.5 - 1) < 0.08      # noise stddev z * clip with all n contributing
    assert abs(err.mean()) < 0.05


def test_the_ring_does_not_wrap_for_aligned_worst_case_updates():
    """Every client sends the same update with all its norm in one coordinate (the rotation spreads it): the
    decoded sum of max_clients such updates is right, in a 16-bit ring."""
    d, n = 512, 100
    par = ddp.DDGParams.for_noise(d, clip=1.0, noise_multiplier=0.3, min_clients=60, max_clients=n, bits=16)
    x = np.zeros(d)
    x[7] = 5.0
    seed = secrets.token_bytes(32)
    total = sum(ddp.encode(x, par, seed) for _ in range(n)) & prg.ring_mask(par.bits)
    dec = ddp.decode(total, par, seed)
    assert abs(dec[7] - n) < 6 * par.central_stddev * math.sqrt(n / 60)
    assert np.abs(np.delete(dec, 7)).max() < 6 * par.central_stddev * math.sqrt(n / 60)


def test_a_too_small_ring_is_refused():
    with pytest.raises(ValueError, match="too small"):
        ddp.DDGParams.for_noise(10, 1.0, 1.0, 50, 100, bits=7)


def _renyi(p: np.ndarray, q: np.ndarray, alpha: float) -> float:
    from scipy.special import logsumexp

    m = (p > 1e-280) & (q > 1e-280)   # the far tails (below double precision) contribute nothing measurable
    return float(logsumexp(alpha * np.log(p[m]) + (1 - alpha) * np.log(q[m])) / (alpha - 1))


@pytest.mark.parametrize("sigma,n,delta", [(0.5, 5, 1), (0.7, 3, 2), (1.0, 3, 1), (0.4, 2, 1)])
def test_the_distributed_discrete_gaussian_bound_dominates_the_exact_renyi_divergence(sigma, n, delta):
    """Independent check: the exact PMF of the sum of n discrete Gaussians (by convolution), shifted by the
    sensitivity; its Renyi divergences never exceed Kairouz et al.'s bound, which is close where tau is small."""
    support = np.arange(-80, 81)
    one = _dg_pmf(sigma, support)
    s = one
    for _ in range(n - 1):
        s = np.convolve(s, one)
    p = np.concatenate([s, np.zeros(delta)])
    q = np.concatenate([np.zeros(delta), s])
    orders = [1.5, 2, 4, 8, 16, 32]
    bound = accounting.rdp(orders, delta, delta, sigma, n, 1)
    exact = np.array([max(_renyi(p, q, a), _renyi(q, p, a)) for a in orders])
    assert np.all(exact <= bound + 1e-9), (exact, bound)
    if accounting.tau(sigma, n) < 1e-3:
        assert np.all(exact >= 0.9 * bound)


def test_secure_aggregation_accounting_matches_the_gaussian_when_tau_is_negligible():
    """With the noise of DP-FedAvg (z * clip on the sum, t clients), one unit's replacement (2 x the bound): the
    zCDP event's epsilon over T rounds equals that of T unsampled Gaussians of multiplier z/2 (RDP), up to the
    rounding's slack in the norm bound."""
    par = ddp.DDGParams.for_noise(7000, clip=1.0, noise_multiplier=2.0, min_clients=70, max_clients=100)
    ev = accounting.training_event(par, 20, replace=True)
    eps = accountants.epsilon(ev, 1e-5, "rdp")
    ref = accountants.epsilon(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 20), 1e-5,
                              "rdp")
    assert ref <= eps < ref * 1.01
    again = events.from_json(events.to_json(ev))
    assert accountants.epsilon(again, 1e-5, "rdp") == eps
    assert "zCDP" in events.describe(ev)


def test_the_pld_accountant_refuses_the_zcdp_event_naming_rdp():
    par = ddp.DDGParams.for_noise(100, 1.0, 1.0, 10, 10)
    with pytest.raises(accountants.UnsupportedRelationError, match="--accountant rdp"):
        accountants.check_supported("pld", accounting.training_event(par, 3, True), events.ADD_OR_REMOVE_ONE)


def test_the_planned_event_bounds_every_smaller_model():
    """The plan fixes the event before the model exists (at MAX_DIM coordinates); the encoder of any smaller
    model has a smaller norm bound, so its round's zCDP is no larger."""
    planned = accounting.planned_event(1.3, 60, 1, replace=True)
    for dim in (10, 7000, 100_000):
        par = ddp.for_scale(dim, clip=0.7, noise_multiplier=1.3, min_clients=60, max_clients=120)
        assert par.norm_bound <= ddp.rounded_norm_bound(ddp.INT_CLIP, ddp.MAX_DIM, par.beta)
        actual = accounting.round_event(par, replace=True)
        assert actual.rho <= planned.event.rho and actual.xi <= planned.event.xi
        # and the decoded sum carries DP-FedAvg's noise, in a ring that fits
        assert math.isclose(par.central_stddev, 1.3 * 0.7)
        assert par.bits <= prg.MAX_BITS


def test_the_noise_comes_from_a_chacha20_stream_and_the_exact_sampler_matches_the_pmf():
    """Review A5: the sampler used numpy's PCG64 (a 128-bit seed). Now the encoder's noise is drawn from a ChaCha20
    keystream (the same key gives the same samples, a fresh 256-bit OS key otherwise); the exact integer sampler
    (the reference) matches the exact PMF, and its Bernoulli(exp(-gamma)) frequencies match exp(-gamma)."""
    key = bytes(32)
    a = ddp.discrete_gaussian(3.0, 500, dgauss.Stream(key))
    assert np.array_equal(a, ddp.discrete_gaussian(3.0, 500, dgauss.Stream(key)))
    assert not np.array_equal(a, ddp.discrete_gaussian(3.0, 500))
    sigma, support = 1.7, np.arange(-8, 9)
    e = dgauss.discrete_gaussian(sigma, 20_000, dgauss.Stream(bytes([3]) * 32))
    pmf = _dg_pmf(sigma, np.arange(-60, 61))[52:69]
    counts = np.array([(e == k).sum() for k in support])
    assert counts.sum() == e.shape[0]
    assert stats.chisquare(counts, pmf / pmf.sum() * counts.sum()).pvalue > 1e-4
    s = dgauss.Stream(bytes([7]) * 32)
    for num, den in ((1, 3), (5, 2), (7, 7)):
        hits = sum(dgauss.bernoulli_exp(num, den, s) for _ in range(20_000))
        p = math.exp(-num / den)
        assert abs(hits / 20_000 - p) < 5 * math.sqrt(p * (1 - p) / 20_000)
    assert dgauss.sigma2_fraction(2.5) == 6.25 and dgauss.sigma2_fraction(0.1) >= 0.1 ** 2
