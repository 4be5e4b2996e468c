"""The audit report page as a reviewer reads it (issue 20, rendering only; the content comes from
``pipeline.audit_report.collect``, tested end to end in test_report.py): a generation date and the code
version, this model's run numbered the same in the text, the table and the plot, one "accuracy" column,
no Python reprs in the lineage, and why a DP model's source shows a spent epsilon of inf."""
from __future__ import annotations

import re

from pipeline.audit_report import format_text
from pipeline.report_html import render_html


def _report(spent=float("inf")):
    runs = [{"seq": 1, "trainer": "standard", "private": False, "status": "finished", "epsilon": None,
             "charged": "NonPrivateDpEvent", "this_model": False},
            {"seq": 3, "trainer": "dp_sgd", "private": True, "status": "finished", "epsilon": 2.5,
             "charged": "PoissonSampledDpEvent", "this_model": True}]
    return {
        "format": "privtrain.report/1", "model_name": "adult", "version": "1700000000", "model_id": 7,
        "generated": "2026-12-06 02:40 UTC", "dataset": "adult", "source_id": "uci-adult",
        "privacy": {"guarantee": {"private": True, "epsilon": 2.5, "delta": 1e-5, "trainer": "dp_sgd",
                                  "accountant": "pld", "neighbouring_relation": "add_or_remove_one",
                                  "privacy_unit": "row", "not_covered": ["wall-clock time"],
                                  "parameters": {"noise_multiplier": 1.1, "microbatches": {"size": 1, "on": True}}},
                    "statement": "(2.5, 1e-05)-DP", "privacy_json_matches_metadata": True},
        "ledger": {"available": True, "verified": True, "entries": 4,
                   "receipt": {"seq": 4, "head_hash": "ab" * 32}, "relation": "add_or_remove_one",
                   "budget": {"epsilon": 10.0, "delta": 1e-5, "accountant": "pld"},
                   "spent": {"epsilon": spent, "delta": 1e-5, "accountant": "pld", "remaining": None, "runs": 2,
                             "open_runs": 0, "non_private_runs": 1, "naive_epsilon_sum": spent},
                   "runs": runs},
        "audit": None,
        "evaluation": {"split": "eval", "covered": "public split", "not_covered": [], "min_slice_size": 100,
                       "suppressed_slices": 1,
                       "slices": [{"slice": "Overall", "metrics": {"auc": 0.88, "binary_accuracy": 0.84,
                                                                   "example_count": 1500.0}, "undefined": {}}]},
        "blessing": {"blessed": True, "reason": "blessed: overall AUC 0.88 >= 0.5", "min_auc": 0.5,
                     "max_auc_drop": None, "baseline": None},
        "lineage": {"trainer": {"kind": "dp_sgd", "state": "COMPLETE",
                                "arguments": {"epochs": 3, "l2_norm_clip": 1.0, "layers": [64, 32]},
                                "hidden_units": [64]},
                    "code_version": "0123456789abcdef", "dataset": "adult",
                    "schema": {"file": "schema.pbtxt", "version": "fedcba9876543210", "kind": "curated"},
                    "transform": {"preprocessing_fn": "pipeline.transform.preprocessing_fn", "what": "public"},
                    "validation": {"result": "passed", "checks": []}},
        "serving": {"model_name": "adult", "versions": [{"version": "1700000000", "this_report": True,
                                                         "latest": True, "epsilon": 2.5, "delta": 1e-5,
                                                         "trainer": "dp_sgd", "private": True}]},
    }


def _text(page: str) -> str:
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return re.sub(r"<[^>]+>", " ", page)


def test_header_has_generation_date_and_code_version():
    page = _text(render_html(_report()))
    assert "Generated 2026-12-06 02:40 UTC from privtrain code version 0123456789abcdef" in page
    assert "as of that time" in page
    assert "generated 2026-12-06 02:40 UTC, code version 0123456789abcdef" in format_text(_report())


def test_this_models_run_is_numbered_the_same_everywhere():
    page = _text(render_html(_report()))
    assert "this model is run #3; its receipt, ledger entry 4 (the entry that finished run #3), matches" in page
    assert "#3 (this model)" in page
    assert "entry 4)" not in page.replace("ledger entry 4 (", "")      # no bare "entry 4" beside "#3"


def test_one_accuracy_column_and_no_python_reprs():
    page = render_html(_report())
    header = re.search(r"<tr><th>slice</th>(.*?)</tr>", page).group(1)
    assert header.count(">accuracy<") == 1
    text = _text(page)
    assert "{" not in text and "[64" not in text and "'epochs'" not in text
    assert "epochs=3, l2_norm_clip=1, layers=64, 32" in text
    assert "microbatches" in text and "on=yes, size=1" in text


def test_infinite_spend_is_explained():
    text = _text(render_html(_report()))
    assert "Why the spent epsilon is infinite: run #1 on this data source was not private" in text
    assert "This model's own guarantee (epsilon 2.5) still holds" in text
    assert "Why the spent epsilon is infinite" not in _text(render_html(_report(spent=4.0)))
