"""DP-SGD through the pipeline: the guarantee lands in ML Metadata, privacy.json and the report; the budget
ledger refuses overspending and non-private training on the budgeted data set."""
from __future__ import annotations

import json
import os

import pytest

from pipeline.metadata import custom_properties, open_store
from tests.conftest import run_cli

BUDGET = 3.0  # the second run asks for 3 more: composed with the first, over budget


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, adult_sample):
    workdir = str(tmp_path_factory.mktemp("dp_run"))
    result = run_cli("run", "--trainer", "dp_sgd", "--data", adult_sample, "--workdir", workdir, "--json",
                     "--target-epsilon", "2", "--epochs", "3", "--budget-epsilon", str(BUDGET),
                     "--min-auc", "0.6")  # this module checks bookkeeping, not utility
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return workdir, json.loads(result.stdout)


def test_guarantee_is_recorded_in_metadata_and_beside_the_pushed_model(dp_run):
    workdir, summary = dp_run
    with open(os.path.join(summary["pushed_path"], "privacy.json")) as f:
        privacy = json.load(f)
    assert 1.5 < privacy["epsilon"] <= 2.0 and privacy["accountant"] == "pld"
    assert privacy["sampling"] == "poisson" and privacy["steps"] > 0 and privacy["noise_multiplier"] > 0
    assert 0.0 <= privacy["mia_auc"] <= 1.0
    assert privacy["mia_implementation"] == "tensorflow_privacy.privacy_tests"  # TF Privacy's own attack
    with open_store(os.path.join(workdir, "metadata.sqlite")) as store:
        models = store.get_artifacts_by_type("Model")
        assert len(models) == 1
        props = custom_properties(models[0])
    for key in ("epsilon", "delta", "noise_multiplier", "l2_norm_clip", "sampling_rate", "steps", "epochs",
                "train_rows", "mia_auc"):
        assert props[f"privacy_{key}"] == pytest.approx(privacy[key]), key
    for key in ("accountant", "sampling_method", "dataset_fingerprint"):
        assert props[f"privacy_{key}"] == privacy[key], key
    assert props["privacy_accountant"] == "pld" and props["private"] == 1
    assert props["trainer_kind"] == "dp_sgd" and props["trainer_dp_path"] in ("fast_gradient_clipping",
                                                                             "vectorized_optimizer")


def test_privacy_report_lists_the_model_with_guarantee_metrics_and_push(dp_run):
    workdir, summary = dp_run
    result = run_cli("privacy", "report", "--workdir", workdir, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(result.stdout)
    assert row["trainer"] == "dp_sgd" and row["private"] is True
    assert row["privacy"]["epsilon"] == pytest.approx(summary["model_properties"]["privacy_epsilon"])
    assert row["blessed"] is True and row["pushed_to"] == summary["pushed_path"]
    assert 0.5 < row["metrics"]["auc"] <= 1.0
    table = run_cli("privacy", "report", "--workdir", workdir)
    assert "dp_sgd" in table.stdout and "epsilon" in table.stdout


def test_ledger_refuses_a_run_that_would_overspend_before_training(dp_run, adult_sample):
    workdir, summary = dp_run
    spent = summary["model_properties"]["privacy_epsilon"]
    result = run_cli("run", "--trainer", "dp_sgd", "--data", adult_sample, "--workdir", workdir, "--json",
                     "--target-epsilon", "3", "--epochs", "3")
    assert result.returncode != 0
    assert "BudgetExceededError" in result.stderr or "budget" in result.stderr.lower()
    assert "remaining 1" in result.stderr and "requests epsilon=3" in result.stderr
    with open_store(os.path.join(workdir, "metadata.sqlite")) as store:
        assert len(store.get_artifacts_by_type("Model")) == 1  # nothing new was trained
    budget = json.loads(run_cli("budget", "--workdir", workdir, "--json").stdout)
    (dataset,) = budget
    assert dataset["budget"]["epsilon"] == BUDGET
    assert float(dataset["spent"]["epsilon"]) == pytest.approx(spent, rel=1e-3)


def test_budget_can_be_raised_explicitly(dp_run, adult_sample):
    workdir, _ = dp_run
    result = run_cli("budget", "--workdir", workdir, "--data", adult_sample, "--set-epsilon", "8", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    (dataset,) = json.loads(result.stdout)
    assert dataset["budget"]["epsilon"] == 8.0


def test_non_private_training_on_a_budgeted_data_set_is_refused_unless_allowed(dp_run, adult_sample):
    workdir, _ = dp_run
    result = run_cli("run", "--trainer", "standard", "--data", adult_sample, "--workdir", workdir)
    assert result.returncode == 2
    assert "--allow-non-private" in result.stderr
