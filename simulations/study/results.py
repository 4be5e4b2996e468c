"""The study's tidy table (one row per grid point and replicate), what each column is with respect to the privacy
guarantee, the aggregation across replicates (mean and 95% interval), and the files written to the output.

Every column that leaves in ``results.csv`` / ``results.json`` / ``aggregate.csv`` is declared in
:data:`COLUMNS` (or matches a declared family in :data:`COLUMN_FAMILIES`); the writer refuses anything else
and a test enumerates the files. Never written: exact training row counts, content hashes, paths.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

PUBLIC = "public parameter"
GUARANTEE = "the guarantee (privacy layer, as recorded in ML Metadata)"
COVERED_EVAL = ("covered: post-processing of the trained model (DP for private points), evaluated on the eval split "
                "the data set declares public; for non-private points no guarantee applies")
NOT_COVERED = "NOT covered"

# column -> (status, what it is)
COLUMNS: Dict[str, Tuple[str, str]] = {
    "point": (PUBLIC, "the grid point: arm / target epsilon [/ partition] / replicate"),
    "arm": (PUBLIC, "the arm's name (a trainer kind with its settings)"),
    "trainer": (PUBLIC, "the trainer kind"),
    "partition": (PUBLIC, "federated client partition (empty for other kinds)"),
    "replicate": (PUBLIC, "replicate index, not a random seed: private runs draw their DP noise, batches and client "
                          "samples from fresh OS randomness; non-private runs use the trainers' fixed public seeds "
                          "(standard: shuffling seed 0; federated: seed 0) and fixed initial weights, so their "
                          "replicates repeat the same run (identical on CPU, interval 0)"),
    "status": (PUBLIC, "ok or failed"),
    "error": (NOT_COVERED, "a failed point's error (diagnostics for the data owner; may depend on the data)"),
    "private": (GUARANTEE, "whether the run is differentially private"),
    "target_epsilon": (PUBLIC, "the target epsilon the noise was calibrated to (empty: fixed noise or non-private)"),
    "epsilon": (GUARANTEE, "the run's epsilon (inf for a non-private run)"),
    "delta": (GUARANTEE, "the guarantee's delta"),
    "accountant": (GUARANTEE, "the accountant"),
    "relation": (GUARANTEE, "the neighbouring relation"),
    "noise_multiplier": (PUBLIC, "the noise multiplier this run used (calibrated from public inputs, or given; "
                                 "a noise-cohort simulation: the simulated multiplier, see simulation_setting)"),
    "simulation_setting": (PUBLIC, "federated noise-cohort simulation setting (--noise-cohort-size): the point's "
                                   "target epsilon and the deployment's noise multiplier are calibrated for a "
                                   "deployment that does NOT cover this run's data; the run's own guarantee is the "
                                   "epsilon column (empty for ordinary runs)"),
    "l2_norm_clip": (PUBLIC, "clip norm (DP-SGD; DP-FedAvg: client clip)"),
    "steps": (PUBLIC, "DP-SGD steps, planned from the public planning size"),
    "rounds": (PUBLIC, "federated rounds"),
    "accuracy": (COVERED_EVAL, "binary accuracy on the eval split (TFMA, the pipeline's Evaluator)"),
    "auc": (COVERED_EVAL, "ROC AUC on the eval split (TFMA)"),
    "audit_epsilon_lower_bound": ("covered: post-processing of the model, the synthetic canaries and the coins",
                                  "empirical epsilon lower bound of the one-run audit (when audit_canaries > 0)"),
    "wall_seconds": (NOT_COVERED, "the point's wall time: it grows with the private data's size"),
}
PUBLIC_EVAL_COUNT = ("public: a count of rows of the eval split, which the data set declares public (written only "
                     "then: on a private eval split it would count private rows)")
SLICE_SIZE = r"slice_size\[[^\]]+\]"
# Per-slice metrics: "accuracy[sex=Female]" etc.; slices with fewer rows than min_slice_size are suppressed.
COLUMN_FAMILIES: Dict[str, Tuple[str, str]] = {
    r"accuracy\[[^\]]+\]": (COVERED_EVAL, "binary accuracy of one slice of the eval split (small slices suppressed)"),
    SLICE_SIZE: (PUBLIC_EVAL_COUNT, "the number of eval-split rows in one shown slice (TFMA's example count; the same "
                                    "for every point)"),
}
# results.json rows carry one structured field more (not in the CSV):
ROUND_COVERED = ("covered: for private federated points each round's model is post-processing of the DP aggregates "
                 "released up to that round, evaluated on the eval split the data set declares public; for "
                 "non-private points no guarantee applies")
ROW_FIELDS = {"round_accuracy": (ROUND_COVERED,
                                 "federated: accuracy on the eval split after each round, [[round, accuracy]]")}
AGGREGATED = ("accuracy", "auc", "epsilon", "audit_epsilon_lower_bound", "wall_seconds")
GROUP_KEYS = ("arm", "trainer", "partition", "target_epsilon")


def declared(column: str) -> Optional[Tuple[str, str]]:
    if column in COLUMNS:
        return COLUMNS[column]
    if column in ROW_FIELDS:
        return ROW_FIELDS[column]
    for pattern, what in COLUMN_FAMILIES.items():
        if re.fullmatch(pattern, column):
            return what
    base = re.sub(r"_(mean|ci95|n)$", "", column)
    if base != column and (base in AGGREGATED or any(re.fullmatch(p, base) for p in COLUMN_FAMILIES)):
        return declared(base)
    return None


def eval_coverage(eval_public: bool) -> str:
    if eval_public:
        return COVERED_EVAL
    return (NOT_COVERED + ": evaluated on the PRIVATE eval split (the data set does not declare it public); "
            "metrics are not covered by epsilon")


# ------------------------------------------------------------------------------------------------
# One row from a finished pipeline run
# ------------------------------------------------------------------------------------------------
def row_from_summary(point, summary, min_slice_size: int, round_accuracy=None,
                     eval_public: bool = False) -> Dict[str, Any]:
    """``eval_public``: the data set declares its eval split public; only then are the shown slices' sizes
    (``slice_size[...]``, counts of eval rows) part of the row."""
    from pipeline.runner import guarantee_of, visible_slices

    g = guarantee_of(summary.model_properties)
    row = base_row(point)
    row.update(status="ok", wall_seconds=round(summary.wall_seconds, 2))
    if g is not None:
        row.update(guarantee_columns(g))
    shown = visible_slices(summary.metrics, min_slice_size)
    overall = shown.get("Overall", {})
    row["accuracy"] = overall.get("binary_accuracy")
    row["auc"] = overall.get("auc") if overall.get("mean_label", 0.5) not in (0.0, 1.0) else None
    for name, values in sorted(shown.items()):
        if name != "Overall" and "binary_accuracy" in values:
            row[f"accuracy[{name}]"] = values["binary_accuracy"]
            if eval_public and values.get("example_count") is not None:
                row[f"slice_size[{name}]"] = int(values["example_count"])
    if round_accuracy:
        row["round_accuracy"] = [[int(r), float(a)] for r, a in round_accuracy]
    return row


def guarantee_columns(g) -> Dict[str, Any]:
    """The row's columns from a run's guarantee (dp_training.guarantee.Guarantee). A noise-cohort simulation
    setting: ``noise_multiplier`` is the multiplier the run used, and ``simulation_setting`` labels the point's
    target epsilon and the deployment's multiplier as the deployment's, which does not cover the data."""
    p = g.parameters
    out = dict(private=bool(g.private), epsilon=g.epsilon if g.private else math.inf, delta=g.delta,
               accountant=g.accountant, relation=g.relation, noise_multiplier=p.get("noise_multiplier"),
               l2_norm_clip=p.get("l2_norm_clip", p.get("dp_clip")), steps=p.get("steps"), rounds=p.get("rounds"))
    sim = getattr(g, "simulation", None)
    if sim or p.get("simulation_setting"):
        sim = dict(sim or {})
        dep = sim.get("deployment_epsilon")
        out["noise_multiplier"] = p.get("simulated_noise_multiplier", p.get("noise_multiplier"))
        out["simulation_setting"] = (
            f"{sim.get('label') or p.get('simulation_setting')}: target epsilon and noise multiplier "
            f"{p.get('noise_multiplier')} are the deployment's"
            + (f" (epsilon {dep:.4g} at delta {g.delta:.3g})" if isinstance(dep, (int, float)) else "")
            + "; that figure does NOT cover this run's data, whose guarantee is the epsilon column")
    if g.audit:
        out["audit_epsilon_lower_bound"] = g.audit.get("epsilon_lower_bound")
    return out


_PATH = re.compile(r"(?<![\w).])(?:~|\.{1,2})?(?:/[^/\s'\"`:,;()\[\]]+)+/?")


def public_error(text: str) -> str:
    """A failed point's error for the table: the first line, every path cut to its last name."""
    first = (text or "failed").splitlines()[0] if text else "failed"
    return _PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/")) or "/", first)[:500]


def base_row(point) -> Dict[str, Any]:
    return {"point": point.id, "arm": point.arm.name, "trainer": point.arm.trainer, "partition": point.partition or "",
            "replicate": point.replicate, "target_epsilon": point.target_epsilon}


def failed_row(point, error: str, wall_seconds: float) -> Dict[str, Any]:
    row = base_row(point)
    row.update(status="failed", error=public_error(error),
               wall_seconds=round(wall_seconds, 2))
    return row


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------
def mean_ci95(values: Sequence[float]) -> Tuple[Optional[float], Optional[float], int]:
    """Mean and the half-width of the 95% t-interval across replicates (None with one replicate)."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(vals)
    if n == 0:
        return None, None, 0
    mean = sum(vals) / n
    if any(math.isinf(v) for v in vals):
        return mean, None, n
    if n == 1:
        return mean, None, 1
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)), n


def aggregate(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault(tuple(r.get(k) for k in GROUP_KEYS), []).append(r)
    out = []
    for key, members in groups.items():
        agg: Dict[str, Any] = dict(zip(GROUP_KEYS, key))
        columns = list(AGGREGATED) + sorted({c for m in members for c in m if c.startswith("accuracy[")})
        for c in columns:
            mean, ci, n = mean_ci95([m.get(c) for m in members])
            agg[f"{c}_mean"], agg[f"{c}_ci95"] = mean, ci
            if c == "accuracy":
                agg["accuracy_n"] = n
        for c in sorted({c for m in members for c in m if c.startswith("slice_size[")}):
            sizes = {m.get(c) for m in members if m.get(c) is not None}
            agg[c] = sizes.pop() if len(sizes) == 1 else None   # one eval split: every replicate counts the same
        out.append(agg)
    order = {}
    for r in rows:
        order.setdefault(r["arm"], len(order))
    out.sort(key=lambda a: (order.get(a["arm"], 0), a["partition"] or "",
                            a["target_epsilon"] if a["target_epsilon"] is not None else math.inf))
    return out


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def _columns(rows: Iterable[Dict[str, Any]], first: Sequence[str]) -> List[str]:
    seen = list(first)
    for r in rows:
        for c in r:
            if c not in seen and c != "round_accuracy":
                seen.append(c)
    return [c for c in seen if any(c in r for r in rows)] if rows else list(first)


def check_declared(columns: Iterable[str], eval_public: bool = True) -> None:
    """Every written column is declared; counts of eval rows (``slice_size[...]``) only for a public eval split."""
    columns = list(columns)
    undeclared = [c for c in columns if declared(c) is None]
    if undeclared:
        raise AssertionError(f"study output columns not declared in simulations/study/results.py: {undeclared}")
    if not eval_public:
        counts = [c for c in columns if re.fullmatch(SLICE_SIZE, c)]
        if counts:
            raise AssertionError(f"slice sizes count rows of the PRIVATE eval split and are never written: {counts}")


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.6g}"
    return v


def _json_value(v):
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return "inf" if math.isinf(v) else None
    return v


def write_csv(path: str, rows: Sequence[Dict[str, Any]], first: Sequence[str], eval_public: bool = True) -> List[str]:
    columns = _columns(rows, first)
    check_declared(columns, eval_public)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in columns])
    os.replace(tmp, path)
    return columns


def write_json(path: str, document: Dict[str, Any], eval_public: bool = True) -> None:
    for r in document.get("rows", []) + document.get("aggregate", []):
        check_declared(r, eval_public)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(document), f, indent=1)
    os.replace(tmp, path)


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return _json_value(x)


def load_rows(path: str) -> List[Dict[str, Any]]:
    """Rows of an earlier (interrupted) study's results.json, for --resume ("inf" back to a float)."""
    with open(path) as f:
        doc = json.load(f)
    rows = doc.get("rows", [])
    for r in rows:
        if r.get("epsilon") == "inf":
            r["epsilon"] = math.inf
    return rows


SLICE_SIZES_WITHHELD = ("slice sizes: not published (the eval split is private, so the number of eval rows in a "
                        "slice is a count of private rows)")


def not_covered(eval_public: bool) -> List[str]:
    """The study outputs no guarantee covers (results.json's ``not_covered``, the report's list)."""
    return (["wall_seconds: timings grow with the private data's size",
             "error: a failed point's diagnostics may depend on the data"]
            + ([] if eval_public else ["accuracy, auc, per-slice accuracy, round_accuracy (and the federated rounds "
                                       "plot): the eval split is private"]))


def declarations(eval_public: bool) -> Dict[str, Dict[str, str]]:
    """What every column is (written into results.json and shown in the report)."""
    out = {}
    for name, (status, what) in list(COLUMNS.items()) + list(COLUMN_FAMILIES.items()) + list(ROW_FIELDS.items()):
        if status == PUBLIC_EVAL_COUNT and not eval_public:
            continue   # never written for a private eval split (SLICE_SIZES_WITHHELD says so)
        if status in (COVERED_EVAL, ROUND_COVERED) and not eval_public:
            status = eval_coverage(eval_public)
        out[name] = {"status": status, "what": what}
    return out


ROW_FIRST = ("point", "arm", "trainer", "partition", "replicate", "status", "private", "target_epsilon", "epsilon",
             "delta", "accountant", "relation", "simulation_setting", "noise_multiplier", "l2_norm_clip", "steps",
             "rounds", "accuracy", "auc", "audit_epsilon_lower_bound", "wall_seconds", "error")
AGG_FIRST = GROUP_KEYS + ("accuracy_n",)
