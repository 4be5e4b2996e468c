"""The per-data-set privacy budget ledger."""
import json
import math
import os

import dp_accounting
import pytest

from dp_training import accounting
from dp_training.ledger import (LEDGER_FILENAME, BudgetExceededError, NonPrivateTrainingRefused,
                                PlannedRun, PrivacyLedger, format_budget)

FP = "fp-test"


def _plan(steps=500, sigma=1.0, q=0.01, **kw):
    return PlannedRun(FP, sigma, q, steps, 1e-5, accountant="rdp", **kw)


def test_ledger_file_lives_in_workdir(tmp_path):
    PrivacyLedger(str(tmp_path))
    assert os.path.exists(tmp_path / LEDGER_FILENAME)


def test_composition_across_runs(tmp_path):
    led = PrivacyLedger(str(tmp_path))
    led.set_budget(FP, 10.0, 1e-5, accountant="rdp")
    runs = [(1.0, 0.01, 500), (1.5, 0.02, 300), (0.9, 0.01, 200)]
    for sigma, q, steps in runs:
        rid = led.begin_run(PlannedRun(FP, sigma, q, steps, 1e-5, accountant="rdp"))
        led.finish_run(rid, "completed", steps)
    spend = led.spent(FP)
    composed = dp_accounting.ComposedDpEvent([accounting.dp_event(s, q, t) for s, q, t in runs])
    expected = accounting.epsilon_of_event(composed, 1e-5, "rdp")
    singles = [accounting.compute_epsilon(s, q, t, 1e-5, "rdp") for s, q, t in runs]
    assert spend.epsilon == pytest.approx(expected, rel=1e-9)
    assert spend.naive_epsilon_sum == pytest.approx(sum(singles))
    assert max(singles) < spend.epsilon < sum(singles)  # composition beats the naive sum
    assert spend.naive_delta_sum == pytest.approx(3e-5)
    assert spend.remaining == pytest.approx(10.0 - spend.epsilon)


def test_refusal_before_training_with_spent_remaining_requested(tmp_path):
    led = PrivacyLedger(str(tmp_path))
    led.set_budget(FP, 3.0, 1e-5, accountant="rdp", dataset_name="adult")
    rid = led.begin_run(_plan(steps=1000))
    led.finish_run(rid, "completed", 1000)
    spent = led.spent(FP).epsilon
    assert spent < 3.0
    with pytest.raises(BudgetExceededError) as err:
        led.begin_run(_plan(steps=3000))
    msg = str(err.value)
    assert "spent" in msg and "remaining" in msg and "requests" in msg
    assert f"{spent:.4g}" in msg and f"{3.0 - spent:.4g}" in msg
    assert "--target-epsilon" in msg  # what to do
    # the refused run left no trace
    assert len(led.history(FP)[0]["runs"]) == 1
    # a run that fits still passes
    led.check(_plan(steps=10, sigma=5.0))


def test_running_reservation_counts_until_finished(tmp_path):
    led = PrivacyLedger(str(tmp_path))
    led.set_budget(FP, 2.5, 1e-5, accountant="rdp")
    led.begin_run(_plan(steps=1000))  # never finished: e.g. the process was killed
    with pytest.raises(BudgetExceededError):
        led.check(_plan(steps=1000))
    assert led.spent(FP).epsilon == pytest.approx(
        accounting.compute_epsilon(1.0, 0.01, 1000, 1e-5, "rdp"))


def test_failed_and_cancelled_runs_record_steps_done(tmp_path):
    led = PrivacyLedger(str(tmp_path))
    rid = led.begin_run(_plan(steps=1000))
    led.finish_run(rid, "failed", 137)
    rid2 = led.begin_run(_plan(steps=1000))
    led.finish_run(rid2, "cancelled", 0)
    hist = led.history(FP)[0]
    by_id = {r["run_id"]: r for r in hist["runs"]}
    assert by_id[rid]["status"] == "failed" and by_id[rid]["steps"] == 137
    assert by_id[rid]["epsilon"] == pytest.approx(
        accounting.compute_epsilon(1.0, 0.01, 137, 1e-5, "rdp"))
    assert by_id[rid2]["epsilon"] == 0.0
    assert led.spent(FP, accountant="rdp").epsilon == pytest.approx(by_id[rid]["epsilon"])


def test_non_private_refused_on_budgeted_dataset(tmp_path):
    led = PrivacyLedger(str(tmp_path))
    led.check_non_private(FP, allowed=False)  # no budget: fine
    led.set_budget(FP, 5.0, 1e-5)
    with pytest.raises(NonPrivateTrainingRefused, match="--allow-non-private"):
        led.check_non_private(FP, allowed=False)
    led.check_non_private(FP, allowed=True)
    led.record_non_private(FP, "keras")
    assert math.isinf(led.spent(FP).epsilon)
    with pytest.raises(BudgetExceededError):
        led.check(_plan(steps=1, sigma=10.0))


def test_history_and_format_budget(tmp_path):
    led = PrivacyLedger(str(tmp_path))
    led.set_budget(FP, 8.0, 1e-5, accountant="rdp", dataset_name="adult")
    rid = led.begin_run(_plan(steps=400))
    led.finish_run(rid, "completed", 400)
    led.record_run("other-fp", "fedavg", "completed", 1.2, 0.05, 50, 1e-6, accountant="rdp")
    text = format_budget(str(tmp_path))
    assert "adult" in text and rid in text and "remaining" in text and "naive sum" in text
    assert "other-fp" in text and "none set" in text
    data = json.loads(format_budget(str(tmp_path), as_json=True))
    assert {d["fingerprint"] for d in data} == {FP, "other-fp"}
    one = json.loads(format_budget(str(tmp_path), fingerprint=FP, as_json=True))
    assert one[0]["budget"]["epsilon"] == 8.0 and one[0]["runs"][0]["steps"] == 400
    assert "No privacy ledger" in format_budget(str(tmp_path / "empty"))


def test_invalid_budget_and_status(tmp_path):
    led = PrivacyLedger(str(tmp_path))
    with pytest.raises(ValueError, match="budget epsilon"):
        led.set_budget(FP, 0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        led.set_budget(FP, 1.0, 1.5)
    rid = led.begin_run(_plan())
    with pytest.raises(ValueError, match="status"):
        led.finish_run(rid, "done", 3)
