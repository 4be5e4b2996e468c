"""Epsilon of DP-FedAvg against independent dp_accounting computations (own event construction)."""
import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from federated import accounting


def independent_poisson(z, clients, m, rounds, delta, kind):
    acc = (rdp_privacy_accountant.RdpAccountant() if kind == "rdp" else pld_privacy_accountant.PLDAccountant())
    for _ in range(rounds):  # compose round by round (not SelfComposed) on purpose
        acc.compose(dp_accounting.PoissonSampledDpEvent(m / clients, dp_accounting.GaussianDpEvent(z)))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_poisson_client_epsilon_matches_independent(kind):
    eps = accounting.epsilon(1.1, 100, 10, 15, 1e-5, sampling="poisson", accountant=kind)
    ref = independent_poisson(1.1, 100, 10, 15, 1e-5, kind)
    assert eps == pytest.approx(ref, rel=1e-3)


def test_fixed_size_sampling_uses_replace_one_rdp():
    eps = accounting.epsilon(1.0, 50, 5, 10, 1e-5, sampling="fixed")
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(50, 5, dp_accounting.GaussianDpEvent(1.0)), 10)
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert accounting.accountant_name("fixed", "pld") == "rdp"


def test_edges():
    assert accounting.epsilon(1.0, 10, 2, 0, 1e-5) == 0.0
    assert accounting.epsilon(1.0, 10, 2, 3, 1e-5) < accounting.epsilon(1.0, 10, 2, 6, 1e-5)
    assert accounting.default_delta(100) == 1e-5
    assert accounting.default_delta(10**6) < 1e-6
