"""The audit report rendered from a checked-in report.json (issue 18.6; no pipeline run): the facts a reviewer
must see, in both the page (``pipeline.report_html.render_html``) and the text (``audit_report.format_text``).

The fixture (fixtures/report.json) has the shape ``pipeline.audit_report.collect`` writes beside a pushed version:
a DP-SGD model on a source whose eval split is private, the source's second run in the ledger (run #3, finished
by ledger entry 4), three small slices suppressed and one metric undefined."""
from __future__ import annotations

import html
import json
import os
import re

import pytest

from pipeline.audit_report import format_text
from pipeline.report_html import render_html

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "report.json")


@pytest.fixture(scope="module")
def report():
    with open(FIXTURE) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def page(report):
    return render_html(report)


@pytest.fixture(scope="module")
def text(report):
    return format_text(report)


def _visible(page: str) -> str:
    """The page's text as a browser shows it (no plots' pixels, no CSS, tags as spaces, entities decoded)."""
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def _row(page: str, key: str) -> str:
    """A key/value table row's value (``<tr><th>key</th><td>value</td></tr>``)."""
    m = re.search(r"<tr><th>%s</th><td>(.*?)</td></tr>" % re.escape(key), page)
    assert m, key
    return _visible(m.group(1)).strip()


def test_epsilon_and_delta_with_accountant_and_relation(report, page, text):
    g = report["privacy"]["guarantee"]
    assert (g["epsilon"], g["delta"], g["accountant"], g["neighbouring_relation"]) == (1.9731, 1e-05, "pld",
                                                                                      "add_or_remove_one")
    assert _row(page, "epsilon") == "1.973" and _row(page, "delta") == "1e-05"
    assert _row(page, "accountant") == "pld" and _row(page, "neighbouring relation") == "add_or_remove_one"
    assert _row(page, "privacy unit") == "row" and _row(page, "target epsilon") == "2"
    statement = ("(1.973, 1e-05)-differential privacy for add or remove one row of source "
                 "'hospital-a-admissions-2024' (pld accountant)")
    assert statement in _visible(page)
    assert f"privacy: {statement}" in text
    # each mechanism with what it covers; its epsilon alone is labelled as not additive
    for m in g["mechanisms"]:
        assert m["covers"] in _visible(page)
    assert "epsilon alone (not additive)" in _visible(page)


def test_this_models_ledger_entry_is_numbered_the_same_in_page_table_and_text(page, text):
    visible = _visible(page)
    assert "this model is run #3; its receipt, ledger entry 4 (the entry that finished run #3), matches" in visible
    assert "#3 (this model)" in visible and "#1 (this model)" not in visible
    rows = re.findall(r"<tr><td>#(\d+)( \(this model\))?</td>", page)
    assert rows == [("1", ""), ("3", " (this model)")]
    ledger = next(line for line in text.splitlines() if line.startswith("ledger:"))
    assert ledger.startswith("ledger: verified; this model is run #3 (its receipt: ledger entry 4, the entry that "
                             "finished run #3)"), ledger
    assert "spent epsilon 2.6174 of budget 5 over 2 run(s)" in ledger
    # the composed spend, not the naive sum of per-run epsilons
    assert _row(page, "spent (composed)") == "epsilon 2.617 at delta 1e-05 (pld)"
    assert "2.918" not in visible


def test_suppressed_slices_are_counted_and_only_large_slices_are_shown(report, page, text):
    visible = _visible(page)
    assert "Slices with fewer than 100 rows are suppressed (3 suppressed)" in visible
    assert "evaluation (not covered; slices under 100 rows suppressed: 3):" in text
    shown = [s["slice"] for s in report["evaluation"]["slices"]]
    section = page.split("<h2 id=evaluation>")[1].split("<h2")[0]
    assert re.findall(r"<tr><td>([^<]+)</td>", section) == shown   # every shown slice, in order, nothing else
    for name in shown:
        assert re.search(r"^  %s\s" % re.escape(name), text, flags=re.M)
    # an undefined metric is labelled, with its reason, never drawn as 0
    assert "sex=Male auc: every example in the slice has the same label" in visible
    assert re.search(r"^  sex=Male\s+auc undefined ", text, flags=re.M)


def test_what_the_guarantee_does_not_cover_is_listed(report, page, text):
    items = report["privacy"]["guarantee"]["not_covered"]
    assert len(items) == 3
    listed = re.search(r"<p>Not covered by epsilon:</p><ul>(.*?)</ul>", page).group(1)
    assert [html.unescape(i) for i in re.findall(r"<li>(.*?)</li>", listed)] == items
    for item in items:
        assert f"  not covered: {item}" in text
    # the evaluation is computed on a private split: labelled so beside the metrics
    visible = _visible(page)
    assert "not covered by epsilon computed on a private eval split" in visible
    assert "evaluation metrics: computed on the PRIVATE eval split and NOT covered by epsilon" in visible


def test_blessing_baseline_and_serving_versions(page, text):
    assert _row(page, "baseline") == "model 5, pushed version 1764990000, AUC 0.865"
    assert "blessing: blessed: overall AUC 0.871 >= minimum 0.5 (--min-auc); baseline model 5" in text
    assert "serving versions: 1764990000, 1765000000 (this) (latest)" in text
    assert "this report latest (served by default)" in _visible(page)
