"""Tests of dp_training.audit: the one-run lower bound (Steinke, Nasr & Jagielski 2023), the canaries,
and an end-to-end audit that must fail a non-private ("broken") run and pass a properly noised one."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from dp_training import audit


# ------------------------------------------------------------------------------------------------
# Oracle: the paper's Appendix D reference code, transcribed loop for loop (the p-value of
# "(eps, delta)-DP" after v correct out of r guesses on m canaries, and the 30-step bisection for the
# largest epsilon with p-value < p). The module's version is vectorised and bisects further.
# ------------------------------------------------------------------------------------------------
def _paper_p_value(m, r, v, eps, delta):
    q = 1 / (1 + math.exp(-eps))
    beta = scipy.stats.binom.sf(v - 1, r, q)
    alpha = 0
    total = 0
    for i in range(1, v + 1):
        total = total + scipy.stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    p = beta + alpha * delta * 2 * m
    return min(p, 1)


def _paper_eps(m, r, v, delta, p):
    eps_min, eps_max = 0, 1
    while _paper_p_value(m, r, v, eps_max, delta) < p:
        eps_max = eps_max + 1
    for _ in range(30):
        eps = (eps_min + eps_max) / 2
        if _paper_p_value(m, r, v, eps, delta) < p:
            eps_min = eps
        else:
            eps_max = eps
    return eps_min


@pytest.mark.parametrize("m,r,v,delta", [
    (1000, 100, 100, 1e-5), (1000, 300, 290, 1e-5), (1000, 400, 300, 1e-5),
    (100, 100, 100, 1e-5), (10_000, 500, 350, 1e-6), (1000, 200, 150, 0.0), (50, 20, 15, 1e-3)])
def test_matches_paper_appendix_d_reference(m, r, v, delta):
    ours = audit.epsilon_lower_bound(r, v, delta=delta, confidence=0.95, num_canaries=m)
    ref = _paper_eps(m, r, v, delta, 0.05)
    # The reference's 30 bisection steps leave an error up to eps_max / 2**30.
    assert ours == pytest.approx(ref, abs=1e-6)
    for eps in (0.0, 0.5, 2.0, 5.0):
        assert audit.p_value(m, r, v, eps, delta) == pytest.approx(_paper_p_value(m, r, v, eps, delta),
                                                                   rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_pure_dp_all_correct_closed_form(r):
    # delta = 0 and all r guesses correct: P[Bin(r, q) >= r] = q^r = beta  =>  eps = logit(beta^(1/r)).
    q = 0.05 ** (1 / r)
    assert audit.epsilon_lower_bound(r, r) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_no_signal_gives_zero():
    assert audit.epsilon_lower_bound(100, 50) == 0.0
    assert audit.epsilon_lower_bound(100, 0) == 0.0
    assert audit.epsilon_lower_bound(0, 0) == 0.0
    assert audit.epsilon_lower_bound(100, 58, delta=1e-5, num_canaries=1000) == 0.0   # plausible at eps 0


def test_monotonicity():
    eps_v = [audit.epsilon_lower_bound(200, v, 1e-5, num_canaries=1000) for v in range(100, 201, 10)]
    assert all(b >= a for a, b in zip(eps_v, eps_v[1:])) and eps_v[-1] > eps_v[0] + 2
    # same accuracy (90%), more guesses -> stronger evidence
    eps_r = [audit.epsilon_lower_bound(r, int(0.9 * r), 1e-6, num_canaries=10_000) for r in (50, 200, 1000, 5000)]
    assert all(b > a for a, b in zip(eps_r, eps_r[1:]))
    # more delta, more canaries (delta term 2 m delta), higher confidence -> weaker bound
    assert (audit.epsilon_lower_bound(500, 450, 0.0, num_canaries=1000)
            > audit.epsilon_lower_bound(500, 450, 1e-5, num_canaries=1000)
            > audit.epsilon_lower_bound(500, 450, 1e-4, num_canaries=1000))
    assert (audit.epsilon_lower_bound(500, 450, 1e-5, num_canaries=1000)
            > audit.epsilon_lower_bound(500, 450, 1e-5, num_canaries=10_000))
    assert (audit.epsilon_lower_bound(500, 450, 1e-5, 0.9, num_canaries=1000)
            > audit.epsilon_lower_bound(500, 450, 1e-5, 0.95, num_canaries=1000)
            > audit.epsilon_lower_bound(500, 450, 1e-5, 0.99, num_canaries=1000))
    # p-value increases with epsilon (checked on a grid)
    ps = [audit.p_value(1000, 300, 250, e, 1e-5) for e in np.linspace(0, 6, 31)]
    assert all(b >= a - 1e-15 for a, b in zip(ps, ps[1:]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_canaries"):
        audit.epsilon_lower_bound(10, 9, delta=1e-5)          # m needed for the delta term
    with pytest.raises(ValueError, match="num_correct <= num_guesses"):
        audit.epsilon_lower_bound(10, 11)
    with pytest.raises(ValueError, match="num_guesses <= num_canaries"):
        audit.epsilon_lower_bound(10, 5, delta=1e-5, num_canaries=5)
    with pytest.raises(ValueError, match="confidence"):
        audit.epsilon_lower_bound(10, 9, confidence=1.0)
    with pytest.raises(ValueError, match="k_positive"):
        audit.count_correct(np.zeros(4), np.ones(4, bool), 3, 2)


# ------------------------------------------------------------------------------------------------
# Simulations with known epsilon
# ------------------------------------------------------------------------------------------------
def test_randomized_response_exact_coverage_and_tightness():
    """Each canary's output is its inclusion bit through eps-randomized response (eps-DP w.r.t. one
    canary). Guessing the output bit for every canary: v ~ Bin(m, e^eps / (1 + e^eps)). The coverage
    P[lb(v) <= eps] is computed exactly over v (lb is non-decreasing in v) and must be >= 95%; with
    10,000 canaries the typical bound must come within 10% of eps."""
    m = 10_000
    for eps in (0.5, 1.0, 2.0, 4.0):
        q = 1 / (1 + math.exp(-eps))
        lb = lambda v: audit.epsilon_lower_bound(m, v)  # noqa: E731
        lo, hi = int(q * m), m                              # find the largest v with lb(v) <= eps
        assert lb(lo) <= eps
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if lb(mid) <= eps else (lo, mid)
        coverage = scipy.stats.binom.cdf(lo, m, q)
        assert coverage >= 0.95, (eps, coverage)
        median_lb = lb(int(scipy.stats.binom.median(m, q)))
        assert 0.9 * eps <= median_lb <= eps, (eps, median_lb)


def test_randomized_response_simulation_with_union_bound():
    """The same mechanism through the score -> (k+, k-) -> union-bound path: lb <= eps in >= 95% of
    100 seeded repetitions, and within 25% of eps on average with 2,000 canaries."""
    rng = np.random.default_rng(12345)
    m, eps, reps = 2000, 1.5, 100
    q = 1 / (1 + math.exp(-eps))
    lbs = []
    for _ in range(reps):
        included = rng.random(m) < 0.5
        out_bit = np.where(rng.random(m) < q, included, ~included)
        lbs.append(audit.audit_scores(out_bit.astype(float), included, rng=rng).epsilon_lower_bound)
    lbs = np.array(lbs)
    assert np.mean(lbs <= eps) >= 0.95
    assert np.mean(lbs) >= 0.75 * eps


def test_gaussian_mechanism_simulation():
    """Each canary's score = mu * included + N(0, 1): the mechanism releasing all m scores is
    (eps(delta), delta)-DP w.r.t. adding/removing one canary, eps from the exact Gaussian curve.
    lb <= eps in >= 95% of 20 repetitions; with 20,000 canaries it reaches a substantial fraction of eps
    (the (eps, delta) one-run bound is not tight for the Gaussian: it sees only one threshold)."""
    rng = np.random.default_rng(7)
    delta, mu = 1e-6, 2.0
    eps = audit.gaussian_epsilon(mu, delta)
    assert 10.9 < eps < 11.1                  # exact curve: eps(mu=2, delta=1e-6) ~ 11.0
    lbs = []
    for _ in range(20):
        m = 2000
        included = rng.random(m) < 0.5
        lbs.append(audit.audit_scores(mu * included + rng.normal(size=m), included, delta=delta,
                                      rng=rng).epsilon_lower_bound)
    assert np.mean(np.array(lbs) <= eps) >= 0.95
    big = []
    for _ in range(2):
        m = 20_000
        included = rng.random(m) < 0.5
        big.append(audit.audit_scores(mu * included + rng.normal(size=m), included, delta=delta,
                                      rng=rng).epsilon_lower_bound)
    assert max(big) <= eps
    assert np.mean(big) >= 0.35 * eps          # measured ~4.4 of 11.0 at m = 20,000
    assert np.mean(big) > np.mean(lbs) + 0.5   # more canaries -> tighter


def test_union_bound_is_accounted():
    scores = np.arange(100.0)
    included = scores >= 50                       # perfect separation
    one = audit.audit_scores(scores, included, candidates=[(50, 50)])
    many = audit.audit_scores(scores, included, candidates=[(50, 50)] + [(k, k) for k in range(1, 50)])
    assert one.guesses == many.guesses == 100 and one.correct == many.correct == 100
    assert many.num_candidates == 50
    assert one.epsilon_lower_bound == pytest.approx(audit.epsilon_lower_bound(100, 100, confidence=0.95))
    assert many.epsilon_lower_bound == pytest.approx(audit.epsilon_lower_bound(100, 100, confidence=1 - 0.05 / 50))
    assert many.epsilon_lower_bound < one.epsilon_lower_bound


def test_guesses_use_top_and_bottom_scores():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, False])
    assert audit.count_correct(scores, included, 1, 0) == 1        # top-1: index 0, in
    assert audit.count_correct(scores, included, 2, 0) == 1        # index 1 is out
    assert audit.count_correct(scores, included, 0, 3) == 3        # bottom-3 all out
    assert audit.count_correct(scores, included, 3, 3) == 2 + 3
    assert audit.candidate_guesses(100, (0.1,), (0.5, 1.0, 0.0)) == ((5, 5), (10, 0), (0, 10))


# ------------------------------------------------------------------------------------------------
# Canaries
# ------------------------------------------------------------------------------------------------
LAYOUT = {"age_z": None, "hours_z": None, "work_id": 8, "region_id": 12}


def _data(n, rng):
    x = {"age_z": rng.normal(size=(n, 1)).astype(np.float32), "hours_z": rng.normal(size=(n, 1)).astype(np.float32),
         "work_id": rng.integers(0, 8, (n, 1)).astype(np.int64), "region_id": rng.integers(0, 12, (n, 1)).astype(np.int64)}
    return x, (rng.random(n) < 0.3).astype(np.float32)


def test_canaries_are_public_domain_and_data_independent():
    c1 = audit.make_canaries(LAYOUT, 300, np.random.default_rng(3))
    c2 = audit.make_canaries(LAYOUT, 300, np.random.default_rng(3))
    for k in LAYOUT:                             # a function of the layout and the seed only
        np.testing.assert_array_equal(c1.features[k], c2.features[k])
    assert c1.features["age_z"].dtype == np.float32 and c1.features["age_z"].shape == (300, 1)
    assert c1.features["work_id"].dtype == np.int64 and c1.features["work_id"].shape == (300, 1)
    assert c1.features["work_id"].min() >= 0 and c1.features["work_id"].max() < 8
    assert c1.features["region_id"].max() < 12 and len(np.unique(c1.features["region_id"])) == 12
    assert np.abs(c1.features["age_z"]).max() <= 3.0
    assert set(np.unique(c1.labels)) == {0.0, 1.0} and 0.35 < c1.labels.mean() < 0.65
    with pytest.raises(ValueError, match="bucket"):
        audit.make_canaries({"a_id": 0}, 3, np.random.default_rng(0))


def test_insert_each_canary_with_probability_half():
    rng = np.random.default_rng(0)
    x, y = _data(200, rng)
    c = audit.make_canaries(LAYOUT, 2000, rng)
    xt, yt, included = audit.insert(x, y, c, rng)
    assert included.dtype == bool and included.shape == (2000,)
    assert abs(included.mean() - 0.5) < 0.04
    n_total = 200 + included.sum()
    assert yt.shape == (n_total,) and all(v.shape[0] == n_total for v in xt.values())
    assert xt["work_id"].dtype == np.int64 and xt["age_z"].dtype == np.float32
    # exactly the included canaries (as rows) are present, plus every original row
    rows = {tuple(float(xt[k][i, 0]) for k in LAYOUT) + (float(yt[i]),) for i in range(n_total)}
    for j in range(2000):
        row = tuple(float(c.features[k][j, 0]) for k in LAYOUT) + (float(c.labels[j]),)
        assert (row in rows) == bool(included[j])
    for i in range(200):
        assert tuple(float(x[k][i, 0]) for k in LAYOUT) + (float(y[i]),) in rows


def test_score_and_run_audit_depend_only_on_model_canaries_and_coins():
    rng = np.random.default_rng(1)
    c = audit.make_canaries(LAYOUT, 400, rng)
    included = rng.random(400) < 0.5
    # a "model" that memorised exactly the included canaries (logit +-5 toward their label) and
    # predicts a canary-independent 0.1 elsewhere
    memorised = {tuple(float(c.features[k][j, 0]) for k in LAYOUT): (2 * c.labels[j] - 1) * 5.0
                 for j in np.flatnonzero(included)}

    def predict(features):
        n = features["age_z"].shape[0]
        return np.array([memorised.get(tuple(float(features[k][i, 0]) for k in LAYOUT), 0.1) for i in range(n)])

    s = audit.score(predict, c)
    np.testing.assert_allclose(s[included], 5.0)
    np.testing.assert_allclose(s[~included], np.where(c.labels[~included] == 1, 0.1, -0.1))
    res = audit.run_audit(predict, c, included, delta=1e-5, stated_epsilon=1.0)
    assert res.correct == res.guesses and res.guesses >= 150
    assert res.epsilon_lower_bound > 3.0 and res.contradicts_stated
    d = json.loads(res.to_json())
    assert d["epsilon_lower_bound"] == res.epsilon_lower_bound and d["method"] == audit.METHOD
    assert d["num_canaries"] == 400 and d["confidence"] == 0.95 and d["contradicts_stated"] is True
    with pytest.raises(Exception):
        res.epsilon_lower_bound = 0.0            # frozen
    # a model that ignores its training data cannot produce a positive bound
    blind = audit.run_audit(lambda f: np.full(f["age_z"].shape[0], 0.3), c, included, delta=1e-5)
    assert blind.epsilon_lower_bound == 0.0


def test_layout_from_model():
    tf = pytest.importorskip("tensorflow")
    from simulations import bench_audit
    model = bench_audit.build_model(hidden=4)
    assert audit.layout_from_model(model) == bench_audit.LAYOUT
    del tf


# ------------------------------------------------------------------------------------------------
# End to end: the audit must fail a broken run and pass a noised one
# ------------------------------------------------------------------------------------------------
DELTA = 1e-5
STEPS = 1000


def _run(noise_multiplier, stated, num_canaries, num_rows, seed):
    pytest.importorskip("tensorflow_privacy")
    from simulations import bench_audit
    result, _, _ = bench_audit.train_with_canaries(noise_multiplier, stated, num_rows=num_rows,
                                                   num_canaries=num_canaries, steps=STEPS,
                                                   delta=DELTA, seed=seed)
    return result


def test_audit_detects_broken_dp_and_passes_noised_dp():
    """Same MLP, same data and canaries, full-batch DP-GD through TF Privacy's DPModel, 1000 steps:
    (a) 'broken': the configuration states epsilon 1 (noise multiplier calibrated for it) but runs
    with noise 0 -> the lower bound must be well above 1; (b) the same configuration with the noise
    it states -> the lower bound must be <= 1."""
    from simulations import bench_audit
    sigma = bench_audit.noise_for_epsilon(1.0, STEPS, DELTA)
    assert bench_audit.stated_epsilon(sigma, STEPS, DELTA) == pytest.approx(1.0, abs=1e-6)
    broken = _run(0.0, 1.0, num_canaries=400, num_rows=500, seed=0)
    assert broken.contradicts_stated
    assert broken.epsilon_lower_bound >= 2.0, broken      # measured 2.4
    noised = _run(sigma, 1.0, num_canaries=400, num_rows=500, seed=0)
    assert noised.epsilon_lower_bound <= 1.0, noised
    assert not noised.contradicts_stated


@pytest.mark.slow
def test_audit_detects_broken_dp_many_canaries():
    """1,000 canaries: the bound on a noise-0 run claiming epsilon 2 must exceed 2 (and 3)."""
    broken = _run(0.0, 2.0, num_canaries=1000, num_rows=1000, seed=1)
    assert broken.epsilon_lower_bound > 3.0, broken


def test_gaussian_curve_round_trip_and_large_epsilon():
    # independent oracle: dp-accounting's PLD of one Gaussian with noise multiplier 1/mu
    dp_accounting = pytest.importorskip("dp_accounting")
    for sigma in (1.0, 0.5):
        pld = dp_accounting.pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(sigma)).get_epsilon(1e-5)
        assert audit.gaussian_epsilon(1 / sigma, 1e-5) == pytest.approx(pld, rel=1e-4)   # 4.377, 9.997
    # no overflow at large eps
    for eps in (0.5, 3.0, 64.0, 4096.0):
        mu = audit.gaussian_mu_for_epsilon(eps, 1e-5)
        assert audit.gaussian_epsilon(mu, 1e-5) == pytest.approx(eps, rel=1e-6)
    assert audit.gaussian_epsilon(math.inf, 1e-5) == math.inf
