"""Slow: DP-SGD through the privacy layer on the full Adult data (run with -m slow)."""
import pytest

pytestmark = pytest.mark.slow


def test_dp_sgd_on_adult_through_the_privacy_layer():
    from simulations.bench_dp import _accuracy, load, private_run

    spec, train, test = load()
    model, g, result = private_run(spec, train, test, {"epochs": 10, "seed": 0, "mia": True},
                                   {"target_epsilon": 3.0})
    assert 2.9 <= g.epsilon <= 3.0 and g.relation == "add_or_remove_one"
    assert g.parameters["planning_rows"] == 30000          # the public figure, not the 32,561 rows
    assert _accuracy(model, test) > 0.83
    assert 0.4 < result.outcome.private_details["mia_auc"] < 0.6
