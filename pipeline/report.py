"""``privtrain privacy report``: every trained model with its privacy guarantee, evaluation, blessing and
push, read back from ML Metadata."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List

from ml_metadata.proto import metadata_store_pb2

from pipeline.metadata import custom_properties, load_slice_metrics, open_store



def _downstream(store, artifact_id: int) -> Dict[str, List[Any]]:
    """Outputs of the executions that consumed the artifact, by output key."""
    consumers = {e.execution_id for e in store.get_events_by_artifact_ids([artifact_id])
                 if e.type == metadata_store_pb2.Event.INPUT}
    outputs: Dict[str, List[Any]] = {}
    if not consumers:
        return outputs
    events = [e for e in store.get_events_by_execution_ids(list(consumers))
              if e.type == metadata_store_pb2.Event.OUTPUT]
    artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    for event in events:
        key = event.path.steps[0].key if event.path.steps else "?"
        outputs.setdefault(key, []).append(artifacts[event.artifact_id])
    return outputs


def collect(metadata_path: str) -> List[Dict[str, Any]]:
    rows = []
    with open_store(metadata_path) as store:
        for model in sorted(store.get_artifacts_by_type("Model"), key=lambda a: a.create_time_since_epoch):
            if model.state != metadata_store_pb2.Artifact.LIVE:
                continue
            props = custom_properties(model)
            text = props.get("privacy_guarantee")
            privacy = json.loads(text) if isinstance(text, str) and text else {}
            downstream = _downstream(store, model.id)
            metrics = {}
            for evaluation in downstream.get("evaluation", [])[-1:]:
                try:
                    metrics = load_slice_metrics(evaluation.uri).get("Overall", {})
                except Exception:  # noqa: BLE001 - an unreadable evaluation is reported as missing
                    metrics = {}
            blessings = downstream.get("blessing", [])
            pushes = [custom_properties(p) for p in downstream.get("pushed_model", [])]
            pushed = [p.get("pushed_destination") for p in pushes if p.get("pushed")]
            rows.append({
                "model_id": model.id, "uri": model.uri, "trainer": props.get("trainer_kind", "?"),
                "private": bool(props.get("private", 0)), "privacy": privacy,
                "source_id": privacy.get("source_id"),
                "metrics": {k: metrics[k] for k in ("auc", "binary_accuracy", "precision", "recall")
                            if k in metrics},
                "blessed": bool(custom_properties(blessings[-1]).get("blessed", 0)) if blessings else None,
                "pushed_to": pushed[-1] if pushed else None,
            })
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


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
                      _fmt(r["metrics"].get("auc")), _fmt(r["metrics"].get("binary_accuracy")),
                      {True: "yes", False: "no", None: "-"}[r["blessed"]], r["pushed_to"] or "no"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def report(metadata_path: str, as_json: bool = False) -> str:
    rows = collect(metadata_path)
    return json.dumps(rows, indent=1, sort_keys=True) if as_json else format_report(rows)
