"""dp_training.sgd_events against independent computations."""
import math
import re
import sys

import dp_accounting
import pytest
from scipy import optimize, stats

from dp_training import sgd_events as accounting
from dp_training.sgd_events import compute_epsilon, dp_event

# TF Privacy's own statement, the independent reference. (Imported normally: TF Privacy's
# ``sys.skip_tf_privacy_import`` switch would leave a half-initialised package for every later test.)
from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib as tfp_lib  # noqa: E402


def _statement_eps(statement):
    once = float(re.search(r"once per epoch:\s+([0-9.]+)", statement).group(1))
    poisson = float(re.search(r"Poisson sampling \(\*\):\s+([0-9.]+)", statement).group(1))
    return once, poisson


def _analytic_gaussian_epsilon(mu, delta):
    """Exact epsilon of mu-GDP (Gaussian mechanism, Balle & Wang 2018 / Dong et al. 2019)."""
    def delta_of(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 100.0, xtol=1e-10)


# Abadi et al. 2016 (MNIST example in Sec. 3.1): q = 600/60000 = 0.01, sigma = 4, delta = 1e-5,
# T = 10000 steps (100 epochs). The paper's moments accountant gives epsilon ~1.26 (strong
# composition ~9.34). Modern RDP (more orders, exact fractional-order bounds) is tighter: ~1.035;
# PLD is tighter still: ~0.947.
ABADI = dict(noise_multiplier=4.0, sampling_rate=0.01, steps=10000, delta=1e-5)


def test_abadi_rdp_matches_tf_privacy_statement_and_paper_bound():
    once, poisson = _statement_eps(tfp_lib.compute_dp_sgd_privacy_statement(
        60000, 600, 100, 4.0, 1e-5, used_microbatching=False))
    eps = compute_epsilon(**ABADI, accountant="rdp")
    assert eps == pytest.approx(poisson, abs=1e-3)
    assert eps == pytest.approx(1.035, abs=0.01)
    assert eps <= 1.26  # never looser than the paper's moments accountant
    # Shuffle (no amplification) = TF Privacy's "each example once per epoch" bound.
    assert compute_epsilon(**ABADI, accountant="rdp", sampling="shuffle") == pytest.approx(
        once, abs=1e-3)


def test_abadi_pld_matches_tf_privacy_statement_and_direct_pld():
    once, poisson = _statement_eps(tfp_lib.compute_dp_sgd_privacy_statement(
        60000, 600, 100, 4.0, 1e-5, used_microbatching=False,
        accountant_type=tfp_lib.AccountantType.PLD))
    eps = compute_epsilon(**ABADI, accountant="pld")
    assert eps == pytest.approx(poisson, abs=2e-3)
    assert eps < compute_epsilon(**ABADI, accountant="rdp")
    # A different route: build the PLD of the subsampled Gaussian directly and self-compose it.
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    direct = pld_lib.from_gaussian_mechanism(
        standard_deviation=4.0, sampling_prob=0.01, value_discretization_interval=1e-3,
        use_connect_dots=True).self_compose(10000).get_epsilon_for_delta(1e-5)
    assert eps == pytest.approx(direct, rel=0.02)
    assert compute_epsilon(**ABADI, accountant="pld", sampling="shuffle") == pytest.approx(
        once, abs=2e-2)


@pytest.mark.parametrize("sigma,epochs", [(1.0, 10), (2.0, 3), (4.0, 100)])
def test_shuffle_bound_equals_analytic_gaussian(sigma, epochs):
    """Composing k Gaussians of noise sigma is exactly sqrt(k)/sigma-GDP: closed-form epsilon."""
    n, b = 1000, 100
    steps = epochs * (n // b)
    exact = _analytic_gaussian_epsilon(math.sqrt(epochs) / sigma, 1e-5)
    pld = compute_epsilon(sigma, b / n, steps, 1e-5, "pld", "shuffle")
    rdp = compute_epsilon(sigma, b / n, steps, 1e-5, "rdp", "shuffle")
    assert exact <= pld <= exact * 1.01 + 1e-3   # PLD: pessimistic but tight
    assert rdp >= exact                          # RDP: a valid, looser upper bound


def test_full_batch_poisson_is_the_gaussian_mechanism():
    exact = _analytic_gaussian_epsilon(math.sqrt(50) / 5.0, 1e-6)
    assert compute_epsilon(5.0, 1.0, 50, 1e-6, "pld") == pytest.approx(exact, rel=0.01)


def test_dp_event_structure():
    ev = dp_event(1.1, 0.02, 500, "poisson")
    assert ev == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1)), 500)
    # 250 steps at q = 0.02 touch 5 epochs: one Gaussian per epoch.
    assert dp_event(1.1, 0.02, 250, "shuffle") == dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(1.1), 5)
    assert dp_event(1.1, 0.02, 251, "shuffle").count == 6  # a partial epoch counts whole
    assert isinstance(dp_event(1.1, 0.02, 0), dp_accounting.NoOpDpEvent)


def test_epochs_for_steps_is_robust_to_rounding():
    n, b = 32561, 256
    q = b / n
    assert accounting.epochs_for_steps(10 * (n // b), q) == 10
    assert accounting.epochs_for_steps(1, q) == 1
    assert accounting.epochs_for_steps(0, q) == 0


def test_edge_cases():
    assert compute_epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert math.isinf(compute_epsilon(0.0, 0.01, 10, 1e-5))
    assert compute_epsilon(1.0, 0.01, 100, 1e-5, "rdp") < compute_epsilon(1.0, 0.01, 200, 1e-5,
                                                                             "rdp")


@pytest.mark.parametrize("kwargs,name", [
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(delta=-1e-5), "delta"),
    (dict(sampling_rate=0.0), "sampling_rate"),
    (dict(sampling_rate=1.5), "sampling_rate"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(accountant="moments"), "accountant"),
    (dict(sampling="random"), "sampling"),
])
def test_invalid_parameters_name_the_parameter(kwargs, name):
    args = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=100, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as err:
        compute_epsilon(**args)
    assert len(str(err.value)) > len(name) + 20  # says how to fix it, not just what


@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.0])
def test_replace_one_costs_twice_the_sensitivity_in_both_accountants(sigma):
    """Replacing one row moves a unit-bounded sum by up to 2: replace-one Gaussian(sigma) is add/remove
    Gaussian(sigma / 2) (dp_accounting 0.6's RDP accountant ignores the relation for plain Gaussians; the
    registry corrects it). PLD is the tighter of the two but never below the exact Gaussian curve."""
    from dp_training import accountants
    for name in ("pld", "rdp"):
        replace = accountants.epsilon(dp_accounting.GaussianDpEvent(sigma), 1e-5, name, "replace_one")
        halved = accountants.epsilon(dp_accounting.GaussianDpEvent(sigma / 2), 1e-5, name, "add_or_remove_one")
        assert replace == pytest.approx(halved, rel=1e-6), name
    shuffle = accounting.dp_event(sigma, 0.1, 30, "shuffle")   # 3 epochs of fixed batches
    assert accountants.epsilon(shuffle, 1e-5, "rdp", "replace_one") >= \
        accountants.epsilon(shuffle, 1e-5, "pld", "replace_one") - 1e-6
