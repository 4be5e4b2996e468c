"""``report.html``: one self-contained page (inline CSS, the PNGs as data URIs, no script, nothing fetched) with
the grid, the study's privacy cost, the aggregated and per-point tables, the plots, what each column is with
respect to the guarantee, the command and the software versions. No paths, content hashes or row counts."""
from __future__ import annotations

import base64
import math
import os
import shlex
import sys
from typing import Any, Dict, List, Sequence

from pipeline.report_html import CSS, _cover, _e, _kv, _num, _table

PATH_FLAGS = ("--data", "--output", "--workdir", "--config", "--ledger")


def _path_flag(flag: str) -> bool:
    """A path flag, also abbreviated (argparse accepts unique prefixes where abbreviations are allowed)."""
    return flag.startswith("--") and len(flag) > 2 and any(f.startswith(flag) for f in PATH_FLAGS)


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../")) or os.sep in value.rstrip(os.sep)


def _cut(value: str) -> str:
    return os.path.basename(value.rstrip("/")) or value


def public_command(argv: Sequence[str]) -> str:
    """The command as run, with directory and file arguments cut to their last name (paths stay private):
    the path flags' values (``--data DIR``, ``--data=DIR``, abbreviated ``--dat DIR``) and any other argument
    that looks like a path."""
    out: List[str] = []
    take = False
    for a in argv:
        if take:
            out.append(_cut(a))
            take = False
            continue
        flag, eq, value = a.partition("=")
        if eq and flag.startswith("--"):
            out.append(f"{flag}={_cut(value) if _path_flag(flag) or _looks_like_path(value) else value}")
        elif eq and _looks_like_path(value):          # --set KEY=/a/path
            out.append(f"{flag}={_cut(value)}")
        elif not a.startswith("-") and _looks_like_path(a):
            out.append(_cut(a))
        else:
            out.append(a)
            take = _path_flag(a)
    return " ".join(shlex.quote(x) for x in out)


def provenance(spec) -> Dict[str, Any]:
    from importlib import metadata

    from pipeline.config import code_version

    versions = {}
    for package in ("tfx", "tensorflow", "tensorflow-privacy", "dp-accounting", "tensorflow-model-analysis",
                    "tensorflow-federated"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"command": spec.command or "(Python API: simulations.Study)", "python": sys.version.split()[0],
            "versions": versions, "code_version": code_version()}


def _epsilon_note(rows) -> str:
    from simulations.study.plots import epsilon_note

    return epsilon_note(rows)


def _pm(mean, ci) -> str:
    if mean is None:
        return "-"
    if isinstance(mean, float) and math.isinf(mean):
        return "inf"
    return f"{mean:.4f}" + (f" ± {ci:.4f}" if ci is not None else "")


def _eps(v) -> str:
    if v is None:
        return "-"
    return "inf (non-private)" if isinstance(v, float) and math.isinf(v) else f"{v:.4g}"


def _slice_table(aggregate, eval_public: bool) -> list:
    """Per-slice accuracy (mean ± 95% interval) per arm and epsilon; each slice labelled with its number of eval
    rows when the eval split is public (``slice_size[...]``), else one line saying why sizes are withheld."""
    from simulations.study.plots import with_size
    from simulations.study.results import SLICE_SIZES_WITHHELD

    names = sorted({c[len("accuracy["):-len("]_mean")] for a in aggregate for c in a
                    if c.startswith("accuracy[") and c.endswith("]_mean")})
    if not names:
        return []
    heads = ["slice"] + [f"{a['arm']}{' ' + a['partition'] if a.get('partition') else ''} "
                         f"{'eps ' + format(a['target_epsilon'], 'g') if a.get('target_epsilon') is not None else ''}"
                         .strip() for a in aggregate]
    body = []
    for name in names:
        label = with_size(name, aggregate, name) if eval_public else name
        body.append([_e(label)] + [_pm(a.get(f"accuracy[{name}]_mean"), a.get(f"accuracy[{name}]_ci95"))
                                   for a in aggregate])
    note = ("n: the slice's rows in the eval split, which the data set declares public" if eval_public
            else SLICE_SIZES_WITHHELD)
    return ["<h2>Accuracy per slice</h2>", _table(heads, body, 1), _cover(note)]


def write_report(spec, plan, rows: Sequence[Dict[str, Any]], aggregate: Sequence[Dict[str, Any]],
                 pngs: Sequence[str], document: Dict[str, Any]) -> str:
    path = os.path.join(spec.output, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(render(spec, plan, rows, aggregate, pngs, document))
    os.replace(tmp, path)
    return os.path.basename(path)


def render(spec, plan, rows, aggregate, pngs, document) -> str:
    source = plan.dataset.require_privacy()
    eval_public = source.is_public_split("eval")
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>Study {_e(spec.name)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Privacy–utility study: {_e(spec.name)}</h1>",
             f"<p>Data set <b>{_e(plan.dataset.name)}</b>, source <b>{_e(source.source_id)}</b>; "
             f"{len(rows)} point(s) recorded of {document['points']}.</p>",
             "<h2>Privacy cost of the study</h2>",
             f"<p class=statement>{_e(document['privacy_cost'])}</p>",
             _cover("Each point's own guarantee (epsilon, delta, accountant, relation) is the one the privacy layer "
                    "recorded in ML Metadata for that run; the study's total is what the ledger holds for it: the "
                    "composition of every ledger entry labelled with the study's name on the source (each attempt, "
                    "also a point interrupted or failed after its reservation), accounted once by the privacy "
                    "layer."
                    + (" The data set is declared a public benchmark: runs are recorded, no budget applies."
                       if plan.public_benchmark else ""))]
    arms = [[_e(a.name), _e(a.trainer), _e(", ".join(f"{e:g}" for e in a.epsilons) or
                                            ("fixed noise" if a.fixed_noise else "non-private")),
             _e(", ".join(p for p in a.partitions if p) or "-"),
             _e(", ".join(f"{k}={v}" for k, v in sorted({**a.settings, **a.run, **a.privacy}.items())) or "defaults")]
            for a in spec.arms]
    parts += ["<h2>Grid</h2>", _table(["arm", "trainer", "target epsilons", "partitions", "settings"], arms, 99),
              _cover(f"{spec.replicates} replicate(s) per point; a replicate is an index, not a seed (each private "
                     "run draws fresh OS randomness for its DP noise, batches and client samples; initial weights "
                     "are fixed and public; non-private runs use the trainers' fixed seeds, so their replicates "
                     "repeat the same run)")]
    agg_rows = [[_e(a["arm"]), _e(a["trainer"]), _e(a.get("partition") or "-"), _eps(a.get("target_epsilon")),
                 _eps(a.get("epsilon_mean")), _pm(a.get("accuracy_mean"), a.get("accuracy_ci95")),
                 _pm(a.get("auc_mean"), a.get("auc_ci95")), _num(a.get("accuracy_n"))] for a in aggregate]
    parts += ["<h2>Results: mean and 95% interval across replicates</h2>",
              _table(["arm", "trainer", "partition", "target epsilon", "achieved epsilon", "accuracy", "AUC", "n"],
                     agg_rows, 3),
              _cover("achieved epsilon: the mean of the points' guarantees (" + _epsilon_note(rows) + "). "
                     "accuracy and AUC: " + ("evaluated on the eval split the data set declares public "
                                             "(post-processing of each model)" if eval_public else
                                             "evaluated on the PRIVATE eval split: NOT covered by epsilon")
                     + "; interval: Student t, n-1 degrees of freedom.")]
    parts += _slice_table(aggregate, eval_public)
    for png in pngs:
        with open(os.path.join(spec.output, png), "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        parts.append(f"<h2>{_e(png[:-4].replace('_', ' '))}</h2><img alt='{_e(png)}' "
                     f"src='data:image/png;base64,{data}'>")
    point_rows = [[_e(r["point"]), _e(r.get("status")), _eps(r.get("epsilon")), _num(r.get("delta"), ".3g"),
                   _e(r.get("accountant")), _num(r.get("noise_multiplier")), _num(r.get("accuracy")),
                   _num(r.get("auc")), _num(r.get("audit_epsilon_lower_bound")), _num(r.get("wall_seconds"), ".1f"),
                   _e(r.get("error") or "")] for r in rows]
    parts += ["<h2>Every point</h2>",
              _table(["point", "status", "epsilon", "delta", "accountant", "noise", "accuracy", "AUC", "audit bound",
                      "wall s", "error"], point_rows, 2),
              _cover("wall s: NOT covered by the guarantee (it grows with the private data's size); errors: "
                     "diagnostics for the data owner, NOT covered.")]
    decl = [[_e(k), _e(v["status"]), _e(v["what"])] for k, v in document["columns"].items()]
    parts += ["<h2>What each column is</h2>", _table(["column", "privacy status", "what"], decl, 99),
              "<h2>Not covered by any guarantee</h2><ul>"
              + "".join(f"<li>{_e(x)}</li>" for x in document["not_covered"]) + "</ul>"]
    prov = document["provenance"]
    parts += ["<h2>Provenance</h2>",
              _kv([("command", f"<code>{_e(prov['command'])}</code>"), ("python", _e(prov["python"])),
                   ("code version", _e(prov["code_version"]))]
                  + [(k, _e(v)) for k, v in prov["versions"].items()]),
              _cover("Paths are cut to their last name; no content hash or row count of the data is shown."),
              "</body></html>"]
    return "\n".join(parts)
