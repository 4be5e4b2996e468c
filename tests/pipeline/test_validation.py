"""Corrupted data stops the run at ingestion or validation with a message that names the problem, and
nothing is trained or pushed."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import make_adult_sample, run_cli

AGE, WORKCLASS, OCCUPATION = 0, 1, 6


def _wrong_type(split, i, fields):
    fields[AGE] = "thirty-nine" if i % 3 == 0 else fields[AGE]
    return fields


def _category_explosion(split, i, fields):
    if split == "eval" and i % 4 == 0:
        fields[OCCUPATION] = f"Occupation-{i}"
    return fields


def _missing_column(split, i, fields):
    fields[WORKCLASS] = "?"
    return fields


@pytest.mark.parametrize("mutate, feature, words", [
    (_wrong_type, "age", "type"),
    (_category_explosion, "occupation", "values"),
    (_missing_column, "workclass", "column"),
], ids=["wrong_type", "category_explosion", "missing_column"])
def test_anomalies_stop_the_run_before_training(tmp_path, mutate, feature, words):
    data = make_adult_sample(str(tmp_path / "data"), train_rows=600, eval_rows=400, mutate=mutate)
    workdir = str(tmp_path / "work")
    result = run_cli("run", "--trainer", "standard", "--data", data, "--workdir", workdir, "--json",
                     "--allow-non-private")
    assert result.returncode == 1
    assert "DataValidationError" in result.stderr
    message = result.stderr[result.stderr.index("DataValidationError"):]
    assert f"feature '{feature}'" in message and words in message.lower(), message
    summary = json.loads(result.stdout)
    ran = {c["component"] for c in summary["components"]}
    assert "Trainer" not in ran and "Pusher" not in ran
    assert summary["pushed_path"] is None
    assert not os.path.exists(os.path.join(workdir, "serving"))


def test_a_row_with_a_missing_field_is_rejected_at_ingestion_naming_the_line(tmp_path):
    def drop_field(split, i, fields):
        return fields[:WORKCLASS] + fields[WORKCLASS + 1:] if i == 5 else fields

    data = make_adult_sample(str(tmp_path / "data"), train_rows=100, eval_rows=50, mutate=drop_field)
    result = run_cli("run", "--trainer", "standard", "--data", data, "--workdir", str(tmp_path / "w"),
                     "--allow-non-private")
    assert result.returncode == 2 and "Traceback" not in result.stderr  # refused by the data gate, before TFX
    assert "line 6" in result.stderr and "expected 15 fields" in result.stderr and "found 14" in result.stderr


def test_a_data_directory_without_a_description_gets_a_clear_error(tmp_path):
    result = run_cli("run", "--data", str(tmp_path), "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2
    assert "has no dataset.json" in result.stderr
