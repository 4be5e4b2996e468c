"""The audit report as one self-contained HTML page: inline CSS, matplotlib plots embedded as base64 PNGs, no
script and no external reference (it opens offline, and a reviewer's browser fetches nothing)."""
from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any, Dict, List, Optional

from pipeline.evaluation import METRIC_TITLES, SHOWN_METRICS, format_metric

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1000px;color:#1b1f23;
background:#fff;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #d0d7de;padding:.25em .6em;text-align:left}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:.15em .6em;border-radius:.8em;font-weight:600;color:#fff}
.ok{background:#1a7f37}.bad{background:#cf222e}.warn{background:#9a6700}.info{background:#0969da}
.cover{font-size:.85em;color:#57606a;margin:.2em 0 .8em}.statement{background:#f6f8fa;padding:.8em;
border-left:4px solid #0969da}img{max-width:100%}ul{margin-top:.3em}
"""


def _e(x: Any) -> str:
    return html.escape("-" if x is None else str(x))


def _num(x: Any, spec: str = ".4g") -> str:
    if isinstance(x, bool) or x is None:
        return _e(x)
    if isinstance(x, (int, float)):
        return "inf" if isinstance(x, float) and math.isinf(x) else format(x, spec)
    return _e(x)


def _value(x: Any) -> str:
    """A parameter value as a reviewer reads it: ``epochs=3, l2_norm_clip=1.0`` for a mapping, ``64, 32`` for a
    list, never a Python repr (``{'epochs': 3}``)."""
    if isinstance(x, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in sorted(x.items())) or "none"
    if isinstance(x, (list, tuple)):
        return ", ".join(_value(v) for v in x) or "none"
    if isinstance(x, bool) or x is None:
        return {True: "yes", False: "no", None: "-"}[x]
    if isinstance(x, float):
        return _num(x, "g")
    return str(x) if isinstance(x, (int, str)) else json.dumps(x, default=str)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _this_run(led: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    return next((x for x in led.get("runs", []) if x.get("this_model")), None)


def _table(header: List[str], rows: List[List[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i >= numeric_from else ''}>{cell}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(pairs: List[tuple]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs) + "</table>"


def _cover(text: str) -> str:
    return f"<p class=cover>{_e(text)}</p>"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width=7.5, height=3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def plot_slices(slices: List[Dict[str, Any]]) -> Optional[str]:
    """Grouped bars: AUC and accuracy per shown slice (undefined values are marked, not drawn as 0)."""
    if not slices:
        return None
    fig, ax = _figure(7.5, 0.5 + 0.45 * len(slices))
    names = [s["slice"] for s in slices][::-1]
    for offset, metric, color in ((-0.2, "auc", "#0969da"), (0.2, "binary_accuracy", "#1a7f37")):
        values = [s["metrics"].get(metric) for s in slices][::-1]
        ys = [i + offset for i in range(len(names))]
        ax.barh(ys, [v if v is not None else 0 for v in values], height=0.38, color=color,
                label=METRIC_TITLES[metric])
        for y, v in zip(ys, values):
            ax.text((v if v is not None else 0) + 0.01, y, "undefined" if v is None else f"{v:.3f}",
                    va="center", fontsize=7)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("metric on the eval split")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Evaluation per slice (small slices suppressed)", fontsize=10)
    return _png(fig)


def plot_ledger(ledger: Dict[str, Any]) -> Optional[str]:
    """Per-run epsilon of the source's ledger entries, the composed spend and the budget."""
    runs = [r for r in ledger.get("runs", []) if isinstance(r.get("epsilon"), (int, float))]
    if not ledger.get("available") or not ledger.get("runs"):
        return None
    fig, ax = _figure()
    labels = [f"run #{r['seq']}" + (" (this)" if r["this_model"] else "") for r in ledger["runs"]]
    values = [r["epsilon"] if isinstance(r.get("epsilon"), (int, float)) else math.nan for r in ledger["runs"]]
    colors = ["#cf222e" if r["this_model"] else "#8c959f" for r in ledger["runs"]]
    finite = [v for v in values if not math.isnan(v)]
    top = max(finite + [0.1])
    ax.bar(range(len(values)), [0 if math.isnan(v) else v for v in values], color=colors)
    for i, v in enumerate(values):
        if math.isnan(v):
            ax.text(i, 0, "non-private\n(inf)", ha="center", va="bottom", fontsize=7)
    spent = ledger.get("spent", {}).get("epsilon")
    if _finite(spent):
        ax.axhline(spent, color="#0969da", linestyle="--", label=f"composed spend {spent:.3g}")
        top = max(top, spent)
    budget = (ledger.get("budget") or {}).get("epsilon")
    if _finite(budget):
        ax.axhline(budget, color="#cf222e", label=f"budget {budget:.3g}")
        top = max(top, budget)
    ax.set_ylim(0, top * 1.2)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=8, rotation=30 if len(labels) > 8 else 0)
    ax.set_ylabel("epsilon")
    ax.set_title(f"Privacy ledger of the data source (runs: {len(values)}; {len(runs)} with finite epsilon)",
                 fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


def plot_versions(versions: List[Dict[str, Any]]) -> Optional[str]:
    pts = [(v["version"], v.get("epsilon"), v["this_report"]) for v in versions]
    if len(pts) < 1:
        return None
    fig, ax = _figure(7.5, 2.6)
    vals = [e if isinstance(e, (int, float)) else math.nan for _, e, _ in pts]
    ax.bar(range(len(pts)), [0 if math.isnan(v) else v for v in vals],
           color=["#cf222e" if this else "#8c959f" for _, _, this in pts])
    for i, v in enumerate(vals):
        ax.text(i, 0 if math.isnan(v) else v, "non-private" if math.isnan(v) else f"{v:.3g}", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(range(len(pts)))
    ax.set_xticklabels([p[0] for p in pts], fontsize=7, rotation=20)
    ax.set_ylabel("epsilon")
    ax.set_title("Pushed versions of this model and their guarantees", fontsize=10)
    return _png(fig)


def render_html(r: Dict[str, Any]) -> str:
    g = r["privacy"]["guarantee"]
    b = r["blessing"]
    led = r["ledger"]
    ev = r["evaluation"]
    lin = r["lineage"]
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Audit report: {_e(r['model_name'])} "
             f"version {_e(r['version'])}</title><style>{CSS}</style></head><body>"]
    blessed = b.get("blessed")
    badge = ("<span class='badge ok'>blessed</span>" if blessed else
             "<span class='badge bad'>not blessed</span>" if blessed is False else
             "<span class='badge warn'>no blessing</span>")
    private = ("<span class='badge info'>differentially private</span>" if g.get("private")
               else "<span class='badge bad'>no privacy guarantee</span>")
    parts.append(f"<h1>Audit report: model {_e(r['model_name'])}, version {_e(r['version'])}</h1>"
                 f"<p>{badge} {private} data set <b>{_e(r['dataset'])}</b>, data source <b>{_e(r['source_id'])}</b>, "
                 f"trainer <b>{_e(g.get('trainer'))}</b></p>")
    parts.append(f"<p class=cover>Generated {_e(r.get('generated') or 'at an unrecorded time')} from privtrain code "
                 f"version {_e(lin.get('code_version'))}. The ledger and serving sections are as of that time (a "
                 "report regenerated later with <code>privtrain report</code> shows their state then); everything "
                 "else is fixed when the model is pushed.</p>")
    parts.append("<p class=cover>Everything on this page is covered by the model's privacy guarantee or public by "
                 "declaration (docs/privacy_model.md, docs/reports.md): no exact training row count, content "
                 "hashes of the data, timings or private run details.</p>")

    # 1. privacy guarantee
    parts.append("<h2 id=privacy>Privacy guarantee</h2>")
    parts.append(f"<p class=statement>{_e(r['privacy']['statement'])}</p>")
    parts.append(_kv([("epsilon", _num(g.get("epsilon"))), ("delta", _num(g.get("delta"), ".3g")),
                      ("accountant", _e(g.get("accountant"))), ("neighbouring relation",
                                                                 _e(g.get("neighbouring_relation"))),
                      ("privacy unit", _e(g.get("privacy_unit"))), ("target epsilon", _num(g.get("target_epsilon"))),
                      ("privacy.json beside the model matches ML Metadata",
                       _e({True: "yes", False: "NO", None: "privacy.json missing"}[
                           r["privacy"]["privacy_json_matches_metadata"]]))]))
    if g.get("mechanisms"):
        parts.append(_table(["mechanism", "covers", "epsilon alone (not additive)"],
                            [[_e(m["name"]), _e(m["covers"]), _num(m.get("epsilon_alone"))]
                             for m in g["mechanisms"]], numeric_from=2))
    params = g.get("parameters") or {}
    if params:
        parts.append("<p>Public run parameters:</p>" + _table(
            ["parameter", "value"], [[_e(k), _e(_value(v))] for k, v in sorted(params.items())], numeric_from=1))
    parts.append("<p>Not covered by epsilon:</p><ul>" + "".join(f"<li>{_e(i)}</li>" for i in g.get("not_covered", []))
                 + "</ul>")
    for note in g.get("notes", []):
        parts.append(f"<p class=cover>{_e(note)}</p>")

    # 2. empirical audit
    parts.append("<h2 id=audit>Empirical audit</h2>")
    audit = r.get("audit")
    if audit:
        parts.append(_kv([(k, _num(v) if isinstance(v, (int, float)) else _e(v)) for k, v in sorted(audit.items())]))
        lb = audit.get("epsilon_lower_bound")
        if isinstance(lb, (int, float)) and isinstance(g.get("epsilon"), (int, float)):
            verdict = ("consistent with the stated epsilon" if lb <= g["epsilon"] else
                       "ABOVE the stated epsilon: the guarantee is refuted")
            parts.append(f"<p>Lower bound {lb:.3g} vs stated epsilon {g['epsilon']:.4g}: <b>{verdict}</b>.</p>")
        parts.append(_cover("Covered: post-processing of the model, synthetic canaries and the inclusion coins."))
    else:
        parts.append("<p>No empirical audit was run for this model (run with <code>--audit-canaries N</code>).</p>")

    # 3. ledger
    parts.append("<h2 id=ledger>Privacy ledger of the data source</h2>")
    if led.get("available"):
        budget = led.get("budget")
        s = led["spent"]
        this = _this_run(led)
        receipt = led["receipt"].get("seq")
        if this is not None:
            which = (f"this model is run #{this['seq']}" + (
                f"; its receipt, ledger entry {receipt} (the entry that finished run #{this['seq']}), matches"
                if led["receipt"].get("head_hash") and receipt != this["seq"] else
                "; its receipt matches" if led["receipt"].get("head_hash") else ""))
        else:
            which = (f"this model's receipt (ledger entry {receipt}) matches" if led["receipt"].get("head_hash")
                     else "")
        parts.append(_kv([
            ("ledger", "hash chain verified" + (f"; {which}" if which else "")),
            ("neighbouring relation", _e(led.get("relation"))),
            ("budget", f"epsilon {_num(budget['epsilon'])}, delta {_num(budget['delta'], '.3g')} "
                       f"({_e(budget['accountant'])})" if budget else "no budget set"),
            ("spent (composed)", f"epsilon {_num(s['epsilon'])} at delta {_num(s['delta'], '.3g')} "
                                 f"({_e(s['accountant'])})"),
            ("remaining", _num(s.get("remaining"))),
            ("runs", f"{s['runs']} ({s['non_private_runs']} non-private, {s['open_runs']} open)")]))
        img = plot_ledger(led)
        if img:
            parts.append(f"<img alt='privacy ledger plot' src='{img}'>")
        non_private = [x for x in led["runs"] if x.get("private") is False]
        if not _finite(s.get("epsilon")) and s.get("epsilon") is not None and non_private:
            own = g.get("epsilon")
            parts.append(
                "<p class=statement>Why the spent epsilon is infinite: "
                + ", ".join(f"run #{_e(x['seq'])}" for x in non_private)
                + " on this data source " + ("was" if len(non_private) == 1 else "were")
                + " not private (trained without noise, so what it released has no finite bound), and the "
                "ledger composes every release from the source, so the source's total is unbounded from then on. "
                + (f"This model's own guarantee (epsilon {_num(own)}) still holds for what this model released; "
                   "it is the source's cumulative loss that is unbounded." if _finite(own) and g.get("private")
                   else "")
                + "</p>")
        parts.append(_table(["run (ledger entry)", "trainer", "private", "status", "epsilon", "charged event"],
                            [[f"#{_e(x['seq'])}" + (" (this model)" if x["this_model"] else ""), _e(x["trainer"]),
                              _e(x["private"]), _e(x["status"]), _num(x["epsilon"]), _e(x["charged"])]
                             for x in led["runs"]], numeric_from=4))
        parts.append(_cover("Public: the ledger holds the DP events each run released; the spend and budget "
                            "figures are functions of those events."))
    else:
        parts.append(f"<p>The ledger could not be read or verified: {_e(led.get('problem'))}</p>")

    # 4. evaluation
    parts.append("<h2 id=evaluation>Evaluation</h2>")
    label = ("<span class='badge bad'>not covered by epsilon</span> computed on a private eval split"
             if ev["covered"] == "not covered" else "computed on the eval split, which the data set declares public")
    parts.append(f"<p>{label}. Slices with fewer than {ev['min_slice_size']} rows are suppressed "
                 f"({ev['suppressed_slices']} suppressed).</p>")
    # only metrics some slice has (binary and multi-class accuracy are both titled "accuracy")
    metrics = [m for m in SHOWN_METRICS if any(m in s["metrics"] for s in ev["slices"])]
    rows = []
    for s in ev["slices"]:
        rows.append([_e(s["slice"])] + [
            (f"<span title='{_e(s['undefined'].get(m))}'>undefined</span>" if s["metrics"].get(m) is None
             and m in s["metrics"] else _e(format_metric(m, s["metrics"][m])) if m in s["metrics"] else "-")
            for m in metrics])
    parts.append(_table(["slice"] + [METRIC_TITLES[m] for m in metrics], rows))
    undefined = sorted({f"{s['slice']} {m}: {why}" for s in ev["slices"] for m, why in s["undefined"].items()})
    if undefined:
        parts.append("<ul>" + "".join(f"<li>{_e(u)}</li>" for u in undefined) + "</ul>")
    img = plot_slices(ev["slices"])
    if img:
        parts.append(f"<img alt='evaluation per slice plot' src='{img}'>")
    for item in ev.get("not_covered", []):
        parts.append(_cover(item))

    # 5. blessing
    parts.append("<h2 id=blessing>Blessing decision</h2>")
    base = b.get("baseline")
    parts.append(f"<p>{badge} {_e(b.get('reason'))}</p>")
    parts.append(_kv([("minimum AUC (--min-auc)", _num(b.get("min_auc"))),
                      ("allowed drop vs baseline (--max-auc-drop)", _num(b.get("max_auc_drop"))),
                      ("baseline", "none (no earlier blessed model of this data set and trainer kind)" if not base
                       else f"model {_e(base['model_id'])}" + (f", pushed version {_e(base.get('pushed_version'))}"
                                                              if base.get("pushed_version") else "")
                       + f", AUC {_num(base.get('auc'))}")]))

    # 6. lineage
    parts.append("<h2 id=lineage>Lineage (ML Metadata)</h2>")
    schema = lin.get("schema") or {}
    transform = lin.get("transform") or {}
    validation = lin.get("validation") or {}
    parts.append(_kv([
        ("data source id", _e(r["source_id"])), ("data set", _e(lin.get("dataset"))),
        ("reference schema", f"{_e(schema.get('file'))}, version {_e(schema.get('version'))} "
                             f"({_e(schema.get('kind'))})"),
        ("data validation", f"<b>{_e(validation.get('result'))}</b>: " + "; ".join(
            _e(c) for c in validation.get("checks", []))),
        ("transform", f"{_e(transform.get('preprocessing_fn'))}: {_e(transform.get('what'))}"),
        ("trainer", f"{_e(lin['trainer'].get('kind'))}, hidden units {_e(_value(lin['trainer'].get('hidden_units')))}, "
                    f"arguments {_e(_value(lin['trainer'].get('arguments')))}"),
        ("code version", _e(lin.get("code_version")))]))
    parts.append(_cover("Public by declaration: the data-set description, the reference schema, the code and the "
                        "hyper-parameters. The validation result is the gate's decision on the public splits only "
                        "(a private split never stops a run; statistics and anomalies stay private in the "
                        "workdir)."))

    # 7. serving
    parts.append("<h2 id=serving>Serving versions</h2>")
    parts.append(_table(["version", "trainer", "private", "epsilon", "delta", ""],
                        [[_e(v["version"]), _e(v.get("trainer")), _e(v.get("private")), _num(v.get("epsilon")),
                          _num(v.get("delta"), ".3g"), ("this report" if v["this_report"] else "")
                          + (" latest (served by default)" if v["latest"] else "")]
                         for v in r["serving"]["versions"]], numeric_from=3))
    img = plot_versions(r["serving"]["versions"])
    if img:
        parts.append(f"<img alt='serving versions plot' src='{img}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
