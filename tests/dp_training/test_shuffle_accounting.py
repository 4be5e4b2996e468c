"""Issue 17.4: ``--sampling shuffle`` accounts one Gaussian release per epoch actually run. The batches are drawn by
the trainer's own iterator (a fresh permutation per epoch, ``n // b`` batches); the number of epochs is counted from
what it yields (how often a row is used), and the planned event's epsilon is checked against the closed-form
epsilon of that many Gaussian releases of sensitivity 2C (replace-one), computed without dp_accounting."""
from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy import optimize, stats

from dp_training import accountants
from dp_training.trainer import batch_indices, plan_training
from tests.dp_training.synthetic import plan_inputs


def _analytic_gaussian_epsilon(mu, delta):
    """Exact epsilon of mu-GDP (Balle & Wang 2018): k Gaussian releases of sensitivity s and noise sigma * C is
    mu = s sqrt(k) / sigma."""
    def delta_of(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 200.0, xtol=1e-10)


@pytest.mark.parametrize("n,batch,epochs", [(100, 30, 10), (103, 10, 2), (1000, 300, 5), (1000, 100, 3)])
def test_shuffle_accounts_every_epoch_that_runs(n, batch, epochs):
    sigma, delta = 3.0, 1e-5
    plan = plan_training(plan_inputs({"noise_multiplier": sigma, "batch_size": batch, "epochs": epochs,
                                      "sampling": "shuffle"}, n, relation="replace_one", delta=delta))
    steps = plan.public["steps"]
    rng = np.random.default_rng(0)
    uses = np.zeros(n, np.int64)
    batches = list(batch_indices(n, batch, steps, "shuffle", rng))
    assert len(batches) == steps
    for idx in batches:
        assert len(idx) == batch and len(np.unique(idx)) == batch
        uses[idx] += 1
    epochs_run = int(uses.max())          # a row is used at most once per epoch, and some row in every epoch
    assert epochs_run == epochs
    assert plan.event == dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), epochs_run)
    exact = _analytic_gaussian_epsilon(2.0 * math.sqrt(epochs_run) / sigma, delta)   # sensitivity 2C
    pld = accountants.epsilon(plan.event, delta, "pld", "replace_one")
    assert exact <= pld <= exact * 1.01 + 1e-3
    assert accountants.epsilon(plan.event, delta, "rdp", "replace_one") >= exact


def test_an_interrupted_shuffle_run_reports_the_epochs_it_started():
    from dp_training import sgd_events as accounting

    # 100 rows, batch 30: 3 steps per epoch; 4 steps have started a second epoch
    assert accounting.dp_event(2.0, 0.3, 4, "shuffle", per_epoch=3).count == 2
    assert accounting.dp_event(2.0, 0.3, 3, "shuffle", per_epoch=3).count == 1
    assert accounting.dp_event(2.0, 0.3, 30, "shuffle").count == 10   # default per_epoch floor(1/q) = n // b
