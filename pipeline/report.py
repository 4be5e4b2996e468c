"""``privtrain privacy report``: every trained model with its privacy guarantee, evaluation, blessing and
push, read back from ML Metadata."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List

from ml_metadata.proto import metadata_store_pb2

from pipeline.evaluation import defined_metrics, executions_with_input, model_evaluation
from pipeline.metadata import custom_properties, open_store


def _pushes(store, model_id: int) -> List[Dict[str, Any]]:
    """Properties of the PushedModel outputs of the Pusher runs whose ``model`` input is this model."""
    out = []
    for execution in executions_with_input(store, model_id, "model", "Pusher"):
        ids = [e.artifact_id for e in store.get_events_by_execution_ids([execution.id])
               if e.type == metadata_store_pb2.Event.OUTPUT]
        out += [custom_properties(a) for a in store.get_artifacts_by_id(ids)]
    return out


def collect(metadata_path: str) -> List[Dict[str, Any]]:
    rows = []
    with open_store(metadata_path) as store:
        for model in sorted(store.get_artifacts_by_type("Model"), key=lambda a: a.create_time_since_epoch):
            if model.state != metadata_store_pb2.Artifact.LIVE:
                continue
            props = custom_properties(model)
            text = props.get("privacy_guarantee")
            privacy = json.loads(text) if isinstance(text, str) and text else {}
            # The model's own evaluation: the Evaluator run whose candidate ``model`` it was (a later run that
            # used it as its ``baseline_model`` is that later model's evaluation).
            evaluation = model_evaluation(store, model.id) or {}
            overall = defined_metrics(evaluation.get("metrics", {}).get("Overall", {}))
            pushed = [p.get("pushed_destination") for p in _pushes(store, model.id) if p.get("pushed")]
            rows.append({
                "model_id": model.id, "uri": model.uri, "trainer": props.get("trainer_kind", "?"),
                "private": bool(props.get("private", 0)), "privacy": privacy,
                "source_id": privacy.get("source_id"),
                "metrics": {k: overall[k] for k in ("auc", "binary_accuracy", "precision", "recall")
                            if k in overall},
                "blessed": evaluation.get("blessed"),
                "blessing_reason": evaluation.get("reason"),
                "baseline_model_id": (evaluation.get("baseline") or {}).get("model_id"),
                "pushed_to": pushed[-1] if pushed else None,
            })
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def _metric(row: Dict[str, Any], name: str) -> str:
    """A metric of the model's own evaluation: "undefined" (never 0) when TFMA could not define it."""
    if name not in row["metrics"]:
        return "-"
    return "undefined" if row["metrics"][name] is None else _fmt(row["metrics"][name])


def format_report(rows: List[Dict[str, Any]]) -> str:
    if not rows:
        return "No trained models recorded in this workdir yet."
    header = ["model", "trainer", "source", "epsilon", "delta", "relation", "accountant", "sigma", "steps",
              "audit_lb", "auc", "accuracy", "blessed", "pushed"]
    table = [header]
    for r in rows:
        p = r["privacy"]
        params = p.get("parameters", {})
        audit = p.get("audit") or {}
        table.append([str(r["model_id"]), r["trainer"], _fmt(p.get("source_id")),
                      _fmt(p.get("epsilon")) if r["private"] else "inf (non-private)",
                      _fmt(p.get("delta")), _fmt(p.get("neighbouring_relation")), _fmt(p.get("accountant")),
                      _fmt(params.get("noise_multiplier")), _fmt(params.get("steps")),
                      _fmt(audit.get("epsilon_lower_bound")),
                      _metric(r, "auc"), _metric(r, "binary_accuracy"),
                      {True: "yes", False: "no", None: "-"}[r["blessed"]], r["pushed_to"] or "no"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.append("")
    lines += [f"model {r['model_id']}: {r['blessing_reason']}" for r in rows if r.get("blessing_reason")]
    return "\n".join(lines)


def report(metadata_path: str, as_json: bool = False) -> str:
    rows = collect(metadata_path)
    return json.dumps(rows, indent=1, sort_keys=True) if as_json else format_report(rows)
