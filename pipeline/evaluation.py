"""Reading an evaluation back from ML Metadata: which Evaluator run belongs to a model, its metrics (undefined
ones as undefined, never 0) and why the model was or was not blessed.

The blessing gate (``pipeline.pipeline_def.eval_config``) is the overall AUC: above ``--min-auc`` and, when a
blessed model of the same data set and trainer kind exists (the baseline), not lower than the baseline's AUC
by more than ``--max-auc-drop``. Both thresholds are read back from the Evaluator's recorded ``eval_config``, so
an explanation always states the numbers the decision was made with.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List, Optional

from ml_metadata.proto import metadata_store_pb2

from pipeline.metadata import custom_properties, load_slice_metrics

SHOWN_METRICS = ("auc", "binary_accuracy", "sparse_categorical_accuracy", "precision", "recall", "example_count")
METRIC_TITLES = {"auc": "AUC", "binary_accuracy": "accuracy", "sparse_categorical_accuracy": "accuracy",
                 "precision": "precision", "recall": "recall", "example_count": "examples"}
# The blessing gate's metric: TFMA class name -> (metric key, title, the flag of its minimum). Binary (tabular) data
# sets gate on AUC, multi-class (image) data sets on accuracy (pipeline/image_pipeline.py).
GATES = {"AUC": ("auc", "AUC", "--min-auc"),
         "SparseCategoricalAccuracy": ("sparse_categorical_accuracy", "accuracy", "--min-accuracy")}


def undefined_reason(metric: str, values: Dict[str, float]) -> Optional[str]:
    """Why a metric of one slice is undefined (None when it is defined)."""
    value = values.get(metric)
    mean_label = values.get("mean_label")
    one_class = (mean_label is not None and (mean_label <= 0.0 or mean_label >= 1.0)) or (
        mean_label is None and _nan(values.get("recall")))
    if metric == "auc" and one_class:
        return "undefined: the slice holds only one class"
    if metric == "recall" and (_nan(value) or (mean_label is not None and mean_label <= 0.0)):
        return "undefined: no positive examples"
    if metric == "precision" and _nan(value):
        return "undefined: no predicted positives"
    if _nan(value):
        return "undefined"
    return None


def _nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def defined_metrics(values: Dict[str, float]) -> Dict[str, Optional[float]]:
    """The shown metrics of one slice, None where undefined (JSON ``null``; shown as "undefined")."""
    out: Dict[str, Optional[float]] = {}
    for metric in SHOWN_METRICS:
        if metric in values:
            out[metric] = None if undefined_reason(metric, values) else float(values[metric])
    return out


def format_metric(metric: str, value: Optional[float]) -> str:
    if value is None:
        return "undefined"
    return str(int(value)) if metric == "example_count" else f"{value:.4f}"


# -- ML Metadata ------------------------------------------------------------------------------------------
def _events_by_key(store, execution_id: int, kind) -> Dict[str, List[int]]:
    out: Dict[str, List[int]] = {}
    for event in store.get_events_by_execution_ids([execution_id]):
        if event.type == kind:
            key = event.path.steps[0].key if event.path.steps else "?"
            out.setdefault(key, []).append(event.artifact_id)
    return out


def executions_with_input(store, artifact_id: int, input_key: str, type_suffix: str = "") -> List[Any]:
    """Executions that consumed the artifact under ``input_key`` (e.g. the Evaluator runs whose *candidate*
    ``model`` it was, not those that used it as ``baseline_model``), oldest first."""
    ids = set()
    for event in store.get_events_by_artifact_ids([artifact_id]):
        if event.type == metadata_store_pb2.Event.INPUT and event.path.steps \
                and event.path.steps[0].key == input_key:
            ids.add(event.execution_id)
    executions = store.get_executions_by_id(sorted(ids)) if ids else []
    if type_suffix:
        types = {t.id: t.name for t in store.get_execution_types()}
        executions = [e for e in executions if types.get(e.type_id, "").endswith(type_suffix)]
    return sorted(executions, key=lambda e: (e.create_time_since_epoch, e.id))


def _snake(value):
    if isinstance(value, dict):
        return {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower(): _snake(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snake(v) for v in value]
    return value


def _thresholds(eval_config_json: str) -> Dict[str, Optional[float]]:
    """min_auc and max_auc_drop from the Evaluator's recorded eval_config (the overall AUC threshold)."""
    out: Dict[str, Any] = {"min_auc": None, "max_auc_drop": None, "gate": "AUC"}
    try:
        config = _snake(json.loads(eval_config_json))  # TFX records snake_case; protobuf's default is camelCase
    except (TypeError, ValueError):
        return out
    for spec in config.get("metrics_specs", []):
        for metric in spec.get("metrics", []):
            if metric.get("class_name") not in GATES:
                continue
            out["gate"] = metric["class_name"]
            thresholds = [t.get("threshold", {}) for t in metric.get("per_slice_thresholds", [])]
            if metric.get("threshold"):
                thresholds.append(metric["threshold"])
            for t in thresholds:
                lower = t.get("value_threshold", {}).get("lower_bound")
                if lower is not None:
                    out["min_auc"] = float(lower)
                absolute = t.get("change_threshold", {}).get("absolute")
                if absolute is not None:
                    out["max_auc_drop"] = round(max(0.0, -float(absolute) - 1e-10), 9)
    return out


def _baseline_auc(evaluation_uri: str, key: str = "auc") -> Optional[float]:
    """The baseline model's overall AUC as TFMA computed it in the same evaluation (same eval data)."""
    import tensorflow_model_analysis as tfma

    try:
        result = tfma.load_eval_result(evaluation_uri, model_name="baseline")
    except Exception:  # noqa: BLE001 - an evaluation without a baseline
        return None
    for slice_key, metrics in result.slicing_metrics:
        if slice_key:
            continue
        for output in metrics.values():
            for sub in output.values():
                value = sub.get(key)
                if isinstance(value, dict) and "doubleValue" in value:
                    return float(value["doubleValue"])
    return None


def model_evaluation(store, model_id: int) -> Optional[Dict[str, Any]]:
    """The model's own (latest) evaluation: metrics per slice, blessing, thresholds, baseline, reason.
    None when the model was never evaluated as the candidate."""
    executions = executions_with_input(store, model_id, "model", "Evaluator")
    if not executions:
        return None
    execution = executions[-1]
    inputs = _events_by_key(store, execution.id, metadata_store_pb2.Event.INPUT)
    outputs = _events_by_key(store, execution.id, metadata_store_pb2.Event.OUTPUT)
    props = custom_properties(execution)
    thresholds = _thresholds(props.get("eval_config", ""))
    out: Dict[str, Any] = {"evaluator_execution": execution.id, "metrics": {}, "evaluation_uri": None,
                           "blessed": None, "baseline": None, **thresholds}
    evaluations = store.get_artifacts_by_id(outputs.get("evaluation", []))
    if evaluations:
        out["evaluation_uri"] = evaluations[-1].uri
        try:
            out["metrics"] = load_slice_metrics(evaluations[-1].uri)
        except Exception:  # noqa: BLE001 - reported as missing
            out["metrics"] = {}
    blessings = store.get_artifacts_by_id(outputs.get("blessing", []))
    if blessings:
        out["blessed"] = bool(custom_properties(blessings[-1]).get("blessed", 0))
    baselines = [b for b in inputs.get("baseline_model", []) if b != model_id]
    if baselines:
        key = GATES[out["gate"]][0]
        auc = _baseline_auc(out["evaluation_uri"], key) if out["evaluation_uri"] else None
        if auc is None:  # fall back to the baseline's own evaluation
            own = model_evaluation(store, baselines[-1])
            auc = (own or {}).get("metrics", {}).get("Overall", {}).get(key)
        out["baseline"] = {"model_id": baselines[-1], "auc": auc}
    out["reason"] = blessing_reason(out)
    return out


def blessing_reason(e: Dict[str, Any]) -> str:
    """One sentence: why the model was (or was not) blessed, with the numbers the gate used."""
    blessed = e.get("blessed")
    overall = e.get("metrics", {}).get("Overall", {})
    key, title, flag = GATES[e.get("gate") or "AUC"]
    auc = defined_metrics(overall).get(key) if overall else None
    min_auc, drop = e.get("min_auc"), e.get("max_auc_drop") or 0.0
    base = e.get("baseline")
    if blessed is None:
        return "no blessing recorded (the Evaluator did not finish)"
    if auc is None:
        why = undefined_reason(key, overall) if overall else f"no overall {title} recorded"
        return f"{'blessed' if blessed else 'not blessed'}: overall {title} {why or 'undefined'}"
    parts: List[str] = []
    failed: List[str] = []
    if min_auc is not None:
        (parts if auc > min_auc else failed).append(
            f"overall {title} {auc:.4f} {'>' if auc > min_auc else 'is not above'} the minimum {min_auc:g} ({flag})")
    if base is None:
        parts.append("no earlier blessed model of this data set and trainer kind to compare with (no baseline)")
    elif base.get("auc") is None:
        parts.append(f"baseline model {base['model_id']} has no defined {title}")
    else:
        b = base["auc"]
        ok = auc >= b - drop - 1e-10
        text = (f"{title} {auc:.4f} vs baseline model {base['model_id']}'s {b:.4f} (change {auc - b:+.4f}, allowed drop "
                f"{drop:g}, --max-auc-drop)")
        (parts if ok else failed).append(text)
    if blessed:
        return "blessed: " + "; ".join(parts)
    if not failed:  # TFMA refused for a reason the numbers above do not show
        failed.append("the Evaluator's validation failed")
    return "not blessed: " + "; ".join(failed + parts)
