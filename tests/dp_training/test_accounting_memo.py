"""The process-wide accounting memos (dp_training.accounting_memo, calibration's memo) give exactly the numbers a
fresh dp_accounting computation gives, and a study's repeated accounting reuses earlier work.

Equality is exact (==), not approximate: the memo reuses an accountant state after the first k events of a
composition and composes the rest onto a copy, the same operations in the same order as a fresh accountant."""
from __future__ import annotations

import dp_accounting
import pytest

from dp_training import accounting_memo, accountants, calibration, events as ev, sgd_events

DELTA = 1e-5
COARSE = {"value_discretization_interval": 1e-3}   # PLD 10x faster; the memo's exactness holds for any options


def _runs(sigmas, q=0.05, steps=20):
    """One run's event per noise multiplier: DP preprocessing (a Gaussian) then DP-SGD, as the planner composes."""
    return [ev.compose(dp_accounting.GaussianDpEvent(15.0), sgd_events.dp_event(s, q, steps, "poisson"))
            for s in sigmas]


def _fresh(event, accountant, relation, **options):
    acc = accountants.get(accountant).make(relation, **options)
    acc.compose(event)
    return max(0.0, float(acc.get_epsilon(DELTA)))


@pytest.fixture(autouse=True)
def _empty_memo():
    accounting_memo.clear()
    calibration._CALIBRATED.clear()
    yield
    accounting_memo.clear()
    calibration._CALIBRATED.clear()


@pytest.mark.parametrize("accountant,relation", [("pld", ev.ADD_OR_REMOVE_ONE), ("pld", ev.REPLACE_ONE),
                                                 ("rdp", ev.ADD_OR_REMOVE_ONE)])
def test_growing_ledger_compositions_equal_fresh_accounting_and_reuse_the_prefix(accountant, relation):
    runs = _runs([4.0, 2.5, 1.5, 3.0])
    if relation == ev.REPLACE_ONE:   # the sampling PLD supports under replace-one
        runs = [ev.compose(dp_accounting.GaussianDpEvent(15.0), dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(s), 5)) for s in (4.0, 2.5, 3.0, 3.5)]
    for k in range(1, len(runs) + 1):   # the ledger statement after each point: runs 1..k
        total = ev.compose(*runs[:k])
        assert accountants.epsilon(total, DELTA, accountant, relation, **COARSE) == _fresh(total, accountant,
                                                                                           relation, **COARSE)
    # from k = 2 (4 flat parts >= MIN_PARTS) each composition started from the previous one's state
    assert accounting_memo.stats["prefix_events_reused"] >= 2 * (2 + 3)
    # asked again (the reservation, the report): answered without composing anything
    composed = accounting_memo.stats["events_composed"]
    assert accountants.epsilon(ev.compose(*runs), DELTA, accountant, relation, **COARSE) == _fresh(
        ev.compose(*runs), accountant, relation, **COARSE)
    assert accounting_memo.stats["events_composed"] == composed and accounting_memo.stats["epsilon_hits"] >= 1
    # a composition that shares only a prefix with a remembered one (another last run) is still exact
    other = ev.compose(*runs[:3], _runs([0.9])[0] if relation != ev.REPLACE_ONE else dp_accounting.GaussianDpEvent(0.9))
    assert accountants.epsilon(other, DELTA, accountant, relation, **COARSE) == _fresh(other, accountant, relation,
                                                                                       **COARSE)


def test_replace_adjacency_wrapped_events_compose_exactly():
    wrapped = ev.ReplaceAdjacencyDpEvent(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 4))
    runs = [ev.compose(dp_accounting.GaussianDpEvent(12.0), wrapped)] * 2 + _runs([2.0, 3.0])
    for accountant in ("pld", "rdp"):
        for k in range(1, len(runs) + 1):
            total = ev.compose(*runs[:k])
            assert accountants.epsilon(total, DELTA, accountant, **COARSE) == _fresh(total, accountant,
                                                                                     ev.ADD_OR_REMOVE_ONE, **COARSE)


def test_options_and_delta_are_part_of_the_key():
    total = ev.compose(*_runs([2.0, 1.5]))
    fine = accountants.epsilon(total, DELTA, "pld")
    coarse = accountants.epsilon(total, DELTA, "pld", value_discretization_interval=1e-2)
    assert coarse == _fresh(total, "pld", ev.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-2) != fine
    assert accountants.epsilon(total, 1e-3, "pld") < fine


def test_identical_calibrations_are_searched_once_and_equal(monkeypatch):
    searches = []
    real = calibration._calibrate_sgd
    monkeypatch.setattr(calibration, "_calibrate_sgd", lambda *a: searches.append(a) or real(*a))
    base = dp_accounting.GaussianDpEvent(20.0)
    args = dict(target_epsilon=2.0, sampling_rate=0.05, steps=60, delta=DELTA, base_event=base)
    first = calibration.calibrate_noise_multiplier(**args)
    again = calibration.calibrate_noise_multiplier(**args)
    assert first == again and len(searches) == 1
    # any other input is calibrated anew (here: another preprocessing release), and gives another answer
    other = calibration.calibrate_noise_multiplier(**{**args, "base_event": dp_accounting.GaussianDpEvent(10.0)})
    assert len(searches) == 2 and other > first
    # the remembered answer is the one a fresh search gives
    calibration._CALIBRATED.clear()
    accounting_memo.clear()
    assert calibration.calibrate_noise_multiplier(**args) == first


def test_a_studys_ledger_statement_equals_fresh_accounting(tmp_path):
    """The study's published total (ledger_charge) with warm memos equals the total computed from nothing."""
    from dp_training.ledger import Ledger
    from dp_training.protocol.studies import ledger_charge
    from core.dataset import PrivacyDeclaration

    ledger = Ledger(str(tmp_path / "ledger.sqlite"))
    source = PrivacyDeclaration(source_id="memo-src", unit="row", relation=ev.ADD_OR_REMOVE_ONE,
                                public_row_estimate=10000)
    charges = []
    for i, run in enumerate(_runs([3.0, 2.0, 1.2, 2.5])):
        r = ledger.reserve("memo-src", run, trainer="dp_sgd", private=True, accountant="pld",
                           relation=ev.ADD_OR_REMOVE_ONE, delta=DELTA, label=f"study s: p{i}")
        ledger.finish(r, run, "completed")
        charges.append(ledger_charge(source, "study s: ", DELTA, "pld", ledger=ledger).epsilon)
    warm = ledger_charge(source, "study s: ", DELTA, "pld", ledger=ledger)
    accounting_memo.clear()
    cold = ledger_charge(source, "study s: ", DELTA, "pld", ledger=ledger)
    assert warm == cold and charges[-1] == cold.epsilon
    assert charges == sorted(charges)
