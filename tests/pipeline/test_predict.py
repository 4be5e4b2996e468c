"""``privtrain predict`` on the pushed model: plain, and encrypted (TF-Encrypted parties as processes)
matching the plain predictions on 200 Adult test rows."""
from __future__ import annotations

import json
import os

import numpy as np

from tests.conftest import ADULT_DIR, run_cli


def _rows_file(tmp_path, n):
    path = tmp_path / "rows.txt"
    with open(os.path.join(ADULT_DIR, "adult.test")) as src:
        path.write_text("".join(line for _, line in zip(range(n), src)))
    return str(path)


def test_plain_predict_on_raw_rows(standard_run, tmp_path):
    workdir, summary, _ = standard_run
    result = run_cli("predict", "--workdir", workdir, "--input", _rows_file(tmp_path, 300), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    p, labels = np.array(out["probabilities"]), np.array(out["labels"])
    versions = sorted(int(v) for v in os.listdir(os.path.dirname(summary["pushed_path"])))
    assert out["model"] == os.path.join(os.path.dirname(summary["pushed_path"]), str(versions[-1]))  # newest
    assert p.shape == (300,)
    assert np.mean((p > 0.5) == (labels == 1)) > 0.75
    table = run_cli("predict", "--workdir", workdir, "--input", _rows_file(tmp_path, 300), "--limit", "5")
    assert "accuracy on the 5 labelled rows" in table.stdout


def test_encrypted_predictions_match_the_plain_model(standard_run, tmp_path):
    workdir, _, _ = standard_run
    rows = _rows_file(tmp_path, 200)
    plain = json.loads(run_cli("predict", "--workdir", workdir, "--input", rows, "--json").stdout)
    result = run_cli("predict", "--encrypted", "--workdir", workdir, "--input", rows, "--json", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    encrypted = json.loads(result.stdout)
    assert len(encrypted["probabilities"]) == 200
    np.testing.assert_allclose(encrypted["probabilities"], plain["probabilities"], atol=1e-2)


def test_predict_without_a_pushed_model_says_what_to_do(tmp_path):
    result = run_cli("predict", "--workdir", str(tmp_path), "--input", _rows_file(tmp_path, 3))
    assert result.returncode == 2 and "run 'privtrain run' first" in result.stderr
