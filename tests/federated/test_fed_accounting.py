"""ReplaceAdjacencyDpEvent and its accounting, against independent computations."""
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from dp_training import accountants, calibration, events as ev
from federated import trainer

REL = dp_accounting.NeighboringRelation


def poisson_rounds(z=1.2, q=0.1, rounds=20):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)


def swor_rounds(z=1.2, k=100, m=10, rounds=20):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(k, m, dp_accounting.GaussianDpEvent(z)), rounds)


def test_serialisation_roundtrip_and_allowlist():
    e = ev.compose(dp_accounting.GaussianDpEvent(10.0), ev.ReplaceAdjacencyDpEvent(poisson_rounds()))
    data = ev.to_json(e)
    assert data["events"][1]["type"] == "ReplaceAdjacencyDpEvent"
    assert ev.from_json(data) == e
    assert ev.canonical(ev.from_json(data)) == ev.canonical(e)
    with pytest.raises(ev.EventError, match="unknown event type"):
        ev.from_json({"type": "ReplaceAdjacencyDpEventX", "event": ev.to_json(poisson_rounds())})
    assert "ReplaceOneElement[20 × PoissonSampled(q=0.1" in ev.describe(e)


def test_non_private_and_noop_inside():
    assert ev.is_non_private(ev.ReplaceAdjacencyDpEvent(dp_accounting.NonPrivateDpEvent()))
    assert ev.is_non_private(ev.ReplaceAdjacencyDpEvent(dp_accounting.GaussianDpEvent(0.0)))
    assert not ev.is_non_private(ev.ReplaceAdjacencyDpEvent(poisson_rounds()))
    assert math.isinf(accountants.epsilon(ev.ReplaceAdjacencyDpEvent(dp_accounting.NonPrivateDpEvent()), 1e-5))


def test_replace_one_gaussian_equals_add_remove_gaussian_with_half_the_noise():
    """A replacement moves a clipped sum by up to 2 clip norms: Gaussian(s) under replace-one is Gaussian(s/2)
    under add/remove, for both accountants (RDP through the wrapper's convention)."""
    for acc in ("pld", "rdp"):
        wrapped = accountants.epsilon(ev.ReplaceAdjacencyDpEvent(dp_accounting.GaussianDpEvent(3.0)), 1e-5, acc)
        plain = accountants.epsilon(dp_accounting.GaussianDpEvent(1.5), 1e-5, acc)
        assert wrapped == pytest.approx(plain, rel=1e-6), acc
    # and for the PLD, against the closed form of dp_accounting's own mechanism with sensitivity 2
    direct = privacy_loss_distribution.from_gaussian_mechanism(3.0, sensitivity=2.0).get_epsilon_for_delta(1e-5)
    assert accountants.epsilon(ev.ReplaceAdjacencyDpEvent(dp_accounting.GaussianDpEvent(3.0)), 1e-5) == \
        pytest.approx(direct, rel=1e-3)


def test_pld_composition_matches_hand_built():
    pre = dp_accounting.GaussianDpEvent(12.0)
    wrapped = poisson_rounds(1.1, 0.05, 30)
    e = ev.compose(pre, ev.ReplaceAdjacencyDpEvent(wrapped))
    for relation, rel in (("add_or_remove_one", REL.ADD_OR_REMOVE_ONE), ("replace_one", REL.REPLACE_ONE)):
        main = pld_privacy_accountant.PLDAccountant(rel).compose(pre)
        rep = pld_privacy_accountant.PLDAccountant(REL.REPLACE_ONE).compose(wrapped)
        hand = main._pld.compose(rep._pld).get_epsilon_for_delta(1e-6)
        assert accountants.epsilon(e, 1e-6, "pld", relation) == pytest.approx(hand, rel=1e-9)
    # the wrapped part alone is dp_accounting's replace-one figure; it exceeds the add/remove one
    rep_only = accountants.epsilon(ev.ReplaceAdjacencyDpEvent(wrapped), 1e-6, "pld")
    assert rep_only == pytest.approx(
        pld_privacy_accountant.PLDAccountant(REL.REPLACE_ONE).compose(wrapped).get_epsilon(1e-6), rel=1e-9)
    assert rep_only > accountants.epsilon(wrapped, 1e-6, "pld")
    # composition order and nesting do not matter
    flipped = dp_accounting.ComposedDpEvent([ev.ReplaceAdjacencyDpEvent(wrapped), pre])
    assert accountants.epsilon(flipped, 1e-6) == pytest.approx(accountants.epsilon(e, 1e-6), rel=1e-9)


def test_rdp_sampling_without_replacement_in_rdp_convention():
    wrapped = swor_rounds(1.2, 100, 10, 20)
    pre = dp_accounting.GaussianDpEvent(8.0)
    e = ev.compose(pre, ev.ReplaceAdjacencyDpEvent(wrapped))
    # independent: dp_accounting's RDP with the noise relative to the replace-one sensitivity (2 x clip)
    orders = rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    main = rdp_privacy_accountant.RdpAccountant(orders).compose(pre)
    rep = rdp_privacy_accountant.RdpAccountant(orders, REL.REPLACE_ONE).compose(swor_rounds(0.6, 100, 10, 20))
    hand = rdp_privacy_accountant.compute_epsilon(orders, main._rdp + rep._rdp, 1e-5)[0]
    assert accountants.epsilon(e, 1e-5, "rdp") == pytest.approx(hand, rel=1e-9)


def test_supports_and_errors_name_the_fix():
    fixed = ev.ReplaceAdjacencyDpEvent(swor_rounds())
    poisson = ev.ReplaceAdjacencyDpEvent(poisson_rounds())
    assert accountants.get("rdp").supports(fixed, "add_or_remove_one")
    assert not accountants.get("pld").supports(fixed, "add_or_remove_one")
    assert accountants.get("pld").supports(poisson, "add_or_remove_one")
    assert not accountants.get("rdp").supports(poisson, "add_or_remove_one")
    with pytest.raises(accountants.UnsupportedRelationError, match="--accountant rdp"):
        accountants.check_supported("pld", fixed, "add_or_remove_one")
    with pytest.raises(accountants.UnsupportedRelationError, match="--accountant pld"):
        accountants.epsilon(poisson, 1e-5, "rdp")
    nested = dp_accounting.PoissonSampledDpEvent(0.5, ev.ReplaceAdjacencyDpEvent(dp_accounting.GaussianDpEvent(1.0)))
    for acc in ("pld", "rdp"):
        assert not accountants.get(acc).supports(nested, "add_or_remove_one")


def test_events_without_wrapper_are_unchanged():
    e = ev.compose(dp_accounting.GaussianDpEvent(5.0), poisson_rounds())
    for acc, make in (("pld", lambda: pld_privacy_accountant.PLDAccountant()),
                      ("rdp", lambda: rdp_privacy_accountant.RdpAccountant())):
        assert accountants.epsilon(e, 1e-5, acc) == make().compose(e).get_epsilon(1e-5)


def test_calibration_of_a_wrapped_event_meets_the_target():
    base = dp_accounting.GaussianDpEvent(15.0)

    def make(z):
        return trainer.training_event(z, 10, 100, 10, "poisson", "replace")

    z = calibration.calibrate(3.0, make, 1e-5, "pld", "add_or_remove_one", base)
    eps = accountants.epsilon(ev.compose(base, make(z)), 1e-5)
    assert eps <= 3.0 and eps > 2.9
    assert accountants.epsilon(ev.compose(base, make(z * 0.97)), 1e-5) > 3.0


def test_ledger_composes_wrapped_runs(tmp_path):
    from dp_training.ledger import Ledger

    led = Ledger(str(tmp_path / "l.sqlite"))
    e1 = ev.compose(dp_accounting.GaussianDpEvent(12.0), ev.ReplaceAdjacencyDpEvent(poisson_rounds(1.0, 0.1, 5)))
    e2 = ev.ReplaceAdjacencyDpEvent(poisson_rounds(1.5, 0.1, 8))
    for e in (e1, e2):
        r = led.reserve("src", e, trainer="federated", private=True, accountant="pld",
                        relation="add_or_remove_one", delta=1e-5)
        led.finish(r, e, "completed")
    led.verify()
    spend = led.spend("src", delta=1e-5, accountant="pld")
    assert spend.epsilon == pytest.approx(accountants.epsilon(ev.compose(e1, e2), 1e-5), rel=1e-9)
    assert spend.epsilon < spend.naive_epsilon_sum
