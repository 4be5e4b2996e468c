"""The audit report per pushed model (``privtrain report``, report.json/report.html beside each pushed version),
the blessing explanation, and ``privtrain privacy report`` showing each model's own evaluation."""
from __future__ import annotations

import glob
import hashlib
import html as html_lib
import json
import os
import re
import shutil
import subprocess

import pytest

from core.pushed import PushedVersion
from tests.conftest import make_adult_sample, run_cli

TRAIN_ROWS = 1487        # the sample's exact size (private); its public planning figure is 1500
SOURCE = "adult-sample-report"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two DP-SGD runs in one workdir: the second is evaluated against the first (its baseline); both pushed."""
    data = make_adult_sample(str(tmp_path_factory.mktemp("report_sample")), TRAIN_ROWS, 600, source_id=SOURCE,
                             privacy={"public_row_estimate": 1500})
    workdir = str(tmp_path_factory.mktemp("report_work"))
    common = ["run", "--trainer", "dp_sgd", "--data", data, "--workdir", workdir, "--json", "--epochs", "1",
              "--min-auc", "0.5", "--target-epsilon", "1", "--budget-epsilon", "10",
              # one epoch of 10 steps: settings that reliably clear AUC 0.5 here (this test is about reports)
              "--l2-norm-clip", "0.5", "--learning-rate", "1"]
    first = run_cli(*common)
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_cli(*common, "--no-cache", "--max-auc-drop", "1")
    assert second.returncode == 0, second.stderr[-4000:]
    return data, workdir, json.loads(first.stdout), json.loads(second.stdout)


def _report(summary):
    return PushedVersion(summary["pushed_path"]).report()


def test_reports_are_written_beside_each_pushed_version(two_runs):
    _, _, s1, s2 = two_runs
    r1, r2 = _report(s1), _report(s2)
    for s, r in ((s1, r1), (s2, r2)):
        assert os.path.isfile(PushedVersion(s["pushed_path"]).report_html_path)
        assert r["version"] == os.path.basename(s["pushed_path"]) and r["source_id"] == SOURCE
        assert r["privacy"]["guarantee"] == PushedVersion(s["pushed_path"]).privacy()  # the guarantee, as published
        assert r["privacy"]["privacy_json_matches_metadata"] is True
        assert r["blessing"]["blessed"] is True and r["blessing"]["min_auc"] == 0.5
        # the ledger of the source: verified, both runs, this model's entry marked, composed spend and budget
        led = r["ledger"]
        assert led["available"] and led["verified"] and led["budget"]["epsilon"] == 10
        assert [x["this_model"] for x in led["runs"]].count(True) == 1
        # lineage
        lin = r["lineage"]
        assert lin["trainer"]["kind"] == "dp_sgd" and re.fullmatch(r"[0-9a-f]{16}", lin["code_version"])
        assert lin["schema"]["file"] == "schema.pbtxt" and lin["validation"]["result"] == "passed (public splits: eval)"
        assert lin["transform"]["preprocessing_fn"] == "pipeline.transform.preprocessing_fn"
        # evaluation: small slices suppressed, none shown under the minimum size
        ev = r["evaluation"]
        assert ev["suppressed_slices"] >= 1 and ev["covered"] == "public split"
        assert ev["slices"][0]["slice"] == "Overall"
        assert all(s_["metrics"]["example_count"] >= ev["min_slice_size"] for s_ in ev["slices"])
    assert len(r2["ledger"]["runs"]) == 2
    assert r2["ledger"]["spent"]["epsilon"] > max(x["epsilon"] for x in r2["ledger"]["runs"])  # composed
    # blessing: the first had no baseline, the second was compared with the first
    assert r1["blessing"]["baseline"] is None and "no baseline" in r1["blessing"]["reason"]
    base = r2["blessing"]["baseline"]
    assert base["model_id"] == r1["model_id"] and base["pushed_version"] == r1["version"]
    assert f"baseline model {r1['model_id']}" in r2["blessing"]["reason"] and "--max-auc-drop" in r2["blessing"]["reason"]
    assert [v["version"] for v in r2["serving"]["versions"]] == [r1["version"], r2["version"]]
    assert r2["serving"]["versions"][-1]["latest"] and r2["serving"]["versions"][-1]["this_report"]


def test_reports_hold_nothing_private(two_runs):
    data, workdir, s1, s2 = two_runs
    with open(os.path.join(data, "adult.data"), "rb") as f:
        content_hash = hashlib.sha256(f.read()).hexdigest()
    for s in (s1, s2):
        version = PushedVersion(s["pushed_path"])
        for path in (version.report_json_path, version.report_html_path):
            with open(path) as f:
                text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", f.read())  # the plots are pixels
            # no exact n as a number (not digits inside a metric's decimals, which may hold any 4 digits)
            assert not re.search(r"(?<![0-9.eE+-])%d(?![0-9])" % TRAIN_ROWS, text)
            assert content_hash not in text and content_hash[:16] not in text
            assert workdir not in text and data not in text          # no paths of the workdir or data
            for private in ("mia_auc", "train_rows", "epoch_seconds", "wall_seconds", "private_details", "loss"):
                assert private not in text, (name, private)


def test_the_summary_says_why_the_model_was_blessed(two_runs):
    _, _, s1, s2 = two_runs
    assert s1["blessing_reason"].startswith("blessed: overall AUC ") and "minimum 0.5 (--min-auc)" in s1["blessing_reason"]
    assert "baseline model" in s2["blessing_reason"]
    assert all(v is None or isinstance(v, float) for m in s2["metrics"].values() for v in m.values())


def test_privacy_report_shows_each_models_own_evaluation(two_runs):
    _, workdir, s1, s2 = two_runs
    r1, r2 = _report(s1), _report(s2)
    result = run_cli("privacy", "report", "--workdir", workdir, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["model_id"]: row for row in json.loads(result.stdout)}
    auc1, auc2 = (r["evaluation"]["slices"][0]["metrics"]["auc"] for r in (r1, r2))
    assert auc1 != auc2  # two differently noised models: a mix-up would show
    # model 1's later use as model 2's baseline is not model 1's evaluation
    assert rows[r1["model_id"]]["metrics"]["auc"] == pytest.approx(auc1)
    assert rows[r2["model_id"]]["metrics"]["auc"] == pytest.approx(auc2)
    assert rows[r1["model_id"]]["baseline_model_id"] is None
    assert rows[r2["model_id"]]["baseline_model_id"] == r1["model_id"]
    text = run_cli("privacy", "report", "--workdir", workdir).stdout
    assert f"model {r2['model_id']}: blessed: " in text


def test_report_command_renders_a_self_contained_page_in_headless_chromium(two_runs, tmp_path):
    _, workdir, s1, _ = two_runs
    version = os.path.basename(s1["pushed_path"])
    page = str(tmp_path / "report.html")
    result = run_cli("report", "--workdir", workdir, "--version", version, "--html", page, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["version"] == version and os.path.isfile(page)
    html = open(page).read()
    assert html.count("data:image/png;base64,") >= 2
    assert not re.search(r"""(src|href)=['"]?(https?:|file:|//)""", html)   # self-contained: nothing fetched
    bad = run_cli("report", "--workdir", workdir, "--version", "12345")
    assert bad.returncode == 2 and "has no version 12345" in bad.stderr and "Traceback" not in bad.stderr

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (make setup installs Debian's chromium as root)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = str(tmp_path / "shot.png")
    subprocess.run(flags + ["--window-size=1100,2400", f"--screenshot={shot}", "file://" + page],
                   capture_output=True, timeout=120, check=False)
    assert os.path.isfile(shot), "chromium wrote no screenshot"
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(shot)[..., :3]
    not_white = (pixels < 0.95).any(axis=-1).mean()
    assert not_white > 0.02 and pixels.std() > 0.05, (not_white, pixels.std())   # text, tables and plots drawn
    dom = subprocess.run(flags + ["--dump-dom", "file://" + page], capture_output=True, text=True, timeout=120)
    text = html_lib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom.stdout)))
    g = report["privacy"]["guarantee"]
    for fact in (f"Audit report: model adult, version {version}", SOURCE, f"{g['epsilon']:.4g}", "blessed",
                 "Privacy ledger of the data source", "hash chain verified", "Lineage", "Serving versions",
                 report["blessing"]["reason"], "suppressed"):
        fact = re.sub(r"\s+", " ", fact)
        assert fact in text, (fact, text[:200], len(text))


def test_blessing_reasons_and_undefined_metrics():
    from pipeline.evaluation import blessing_reason, defined_metrics, undefined_reason

    one_class = {"auc": 0.0, "recall": float("nan"), "precision": float("nan"), "mean_label": 0.0,
                 "binary_accuracy": 1.0, "example_count": 6.0}
    assert defined_metrics(one_class) == {"auc": None, "binary_accuracy": 1.0, "precision": None, "recall": None,
                                          "example_count": 6.0}
    assert "one class" in undefined_reason("auc", one_class)
    good = {"auc": 0.86, "mean_label": 0.24, "recall": 0.5, "precision": 0.7}
    low = blessing_reason({"blessed": False, "metrics": {"Overall": dict(good, auc=0.7)}, "min_auc": 0.8,
                           "max_auc_drop": 0.0, "baseline": None})
    assert low.startswith("not blessed: overall AUC 0.7000 is not above the minimum 0.8 (--min-auc)")
    drop = blessing_reason({"blessed": False, "metrics": {"Overall": good}, "min_auc": 0.8, "max_auc_drop": 0.001,
                            "baseline": {"model_id": 7, "auc": 0.87}})
    assert drop.startswith("not blessed: AUC 0.8600 vs baseline model 7's 0.8700 (change -0.0100, allowed drop "
                           "0.001") and "> the minimum 0.8" in drop
    undefined = blessing_reason({"blessed": False, "metrics": {"Overall": one_class}, "min_auc": 0.8,
                                 "max_auc_drop": 0.0, "baseline": None})
    assert "undefined" in undefined and "0.0000" not in undefined


def test_thresholds_are_read_back_from_the_recorded_eval_config():
    from google.protobuf import json_format

    from core.dataset import load_dataset
    from pipeline.config import DEFAULT_DATA_DIR, RunConfig
    from pipeline.evaluation import _thresholds
    from pipeline.pipeline_def import eval_config

    config = eval_config(load_dataset(DEFAULT_DATA_DIR), RunConfig(min_auc=0.75, max_auc_drop=0.02))
    for snake_case in (True, False):  # TFX records field names as in the proto; protobuf's default is camelCase
        recorded = json_format.MessageToJson(config, preserving_proto_field_name=snake_case)
        assert _thresholds(recorded) == {"min_auc": 0.75, "max_auc_drop": 0.02, "gate": "AUC"}
