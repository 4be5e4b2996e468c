"""Slice sizes (the number of eval rows per shown slice) are published only when the eval split is public.

A study runs end to end through the real runner, planner, ledger, writers, plots and report; only the pipeline
run itself is replaced by a summary with TFMA-like per-slice metrics (the pipeline is tested elsewhere), so both
cases take seconds."""
from __future__ import annotations

import csv
import json
import os

import pytest

from tests.conftest import make_adult_sample

SLICES = {"Overall": 300, "sex=Female": 97, "sex=Male": 203, "race=White": 251, "race=Black": 31, "race=Other": 4}


def _fake_run_pipeline(config, progress=None):
    from pipeline.runner import RunSummary

    metrics = {name: {"binary_accuracy": 0.8, "auc": 0.85, "mean_label": 0.25, "example_count": float(n)}
               for name, n in SLICES.items()}
    return RunSummary(pipeline_name="fake", components=[], wall_seconds=1.0, metrics=metrics,
                      min_slice_size=config.privacy_args().get("min_slice_size"))


def _study(tmp_path, monkeypatch, public_eval: bool):
    import pipeline.runner
    from simulations.study.runner import StudyRunner
    from simulations.study.spec import from_options

    monkeypatch.setenv("PRIVTRAIN_LEDGER", str(tmp_path / "ledger.sqlite"))
    monkeypatch.setattr(pipeline.runner, "run_pipeline", _fake_run_pipeline)
    data = make_adult_sample(str(tmp_path / "data"), 400, 300,
                             privacy=None if public_eval else {"public_splits": []})
    spec = from_options(data, str(tmp_path / "out"), trainers="dp_sgd,standard", epsilons="2", seeds=2,
                        workdir=str(tmp_path / "work"), name="sizes", allow_non_private=True)
    progress = []

    class Lines:
        def write(self, text):
            progress.append(text)

        def flush(self):
            pass

    result = StudyRunner(spec, progress=Lines()).run()
    return str(tmp_path / "out"), result, "".join(progress)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_public_eval_split_publishes_slice_sizes_in_tables_plot_and_report(tmp_path, monkeypatch):
    from simulations.study import plots
    from simulations.study.results import declared

    out, result, progress = _study(tmp_path, monkeypatch, public_eval=True)
    agg = _csv(os.path.join(out, "aggregate.csv"))
    assert {a["slice_size[sex=Female]"] for a in agg} == {"97"} and {a["slice_size[race=White]"] for a in agg} == {"251"}
    assert all("slice_size[race=Other]" not in a for a in agg)   # under min_slice_size: suppressed with its accuracy
    assert declared("slice_size[sex=Female]")[0].startswith("public")
    doc = json.load(open(os.path.join(out, "results.json")))
    assert doc["columns"][r"slice_size\[[^\]]+\]"]["status"].startswith("public")
    assert "slice sizes" not in progress
    # the per-slice plot's legend labels and the report's per-slice table carry the sizes
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or "slices.png")
    plots.plot_slices(str(tmp_path / "s.png"), result.aggregate)
    labels = {t.get_text() for ax in figures[0].axes for t in ax.get_legend().get_texts()}
    assert {"Female (n=97)", "Male (n=203)", "White (n=251)", "Black (n=31)"} <= labels
    report = open(os.path.join(out, "report.html")).read()
    assert "sex=Female (n=97)" in report and "rows in the eval split, which the data set declares public" in report


def test_private_eval_split_withholds_slice_sizes_and_says_so(tmp_path, monkeypatch):
    from simulations.study import plots, results

    out, result, progress = _study(tmp_path, monkeypatch, public_eval=False)
    for name in ("results.csv", "aggregate.csv"):
        header = list(_csv(os.path.join(out, name))[0])
        assert any(c.startswith("accuracy[sex=") for c in header)   # the accuracies are there (declared NOT covered)
        assert not any(c.startswith("slice_size[") for c in header), header
    doc = json.load(open(os.path.join(out, "results.json")))
    assert not any("slice_size" in k for r in doc["rows"] + doc["aggregate"] for k in r)
    assert not any("slice_size" in k for k in doc["columns"])
    assert progress.count(results.SLICE_SIZES_WITHHELD) == 1   # one line in the study's output
    report = open(os.path.join(out, "report.html")).read()
    assert results.SLICE_SIZES_WITHHELD in report and "(n=" not in report
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or "slices.png")
    plots.plot_slices(str(tmp_path / "s.png"), result.aggregate)
    labels = {t.get_text() for ax in figures[0].axes for t in ax.get_legend().get_texts()}
    assert "Female" in labels and not any("n=" in t for t in labels)
    assert "slice sizes not shown (the eval split is private)" in figures[0]._suptitle.get_text()
    # the writer refuses a slice size for a private eval split, whoever adds one
    with pytest.raises(AssertionError, match="PRIVATE eval split"):
        results.write_csv(str(tmp_path / "x.csv"), [{"point": "p", "slice_size[sex=Female]": 97}], ("point",),
                          eval_public=False)
