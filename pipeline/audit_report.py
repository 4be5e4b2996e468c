"""``privtrain report``: the audit report of one pushed model version, for a reviewer.

Everything comes from ML Metadata, the pushed ``privacy.json`` and the budget ledger, and everything in it may
leave the trust boundary (docs/privacy_model.md, docs/reports.md): the guarantee and its statement, the
ledger state of the data source (functions of the public DP events), the empirical audit result, the
evaluation overall and per slice with small slices suppressed (labelled "not covered" when the eval split is
private), the blessing decision with its reason and baseline, lineage (source id, reference schema, validation
result, transform, trainer kind and its public parameters, code version) and the serving versions. Never the
exact number of training rows, content hashes of the data, timings, paths of the workdir or private details.

The runner writes ``report.json`` and ``report.html`` beside every pushed version (next to ``privacy.json``);
``privtrain report`` renders them again from the current state (the ledger and serving versions may have moved
on since the push).
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Dict, List, Optional

from ml_metadata.proto import metadata_store_pb2

from core.pushed import PushedVersion, PushedVersionError, select_version, versions as pushed_versions

FORMAT = "privtrain.report/1"


class ReportError(ValueError):
    """The report cannot be made; the message says what to pass or run."""


def serving_versions(serving_dir: str, model_name: Optional[str]) -> (str, List[str]):
    """The model's name and its pushed versions, oldest first (``core.pushed``'s rule)."""
    try:
        newest = select_version(serving_dir, model_name)
    except PushedVersionError as e:
        raise ReportError(str(e)) from None
    return newest.model_name, [v.name for v in pushed_versions(os.path.dirname(newest.path))]


def _json_prop(props: Dict[str, Any], key: str) -> Dict[str, Any]:
    value = props.get(key)
    if isinstance(value, dict):
        return value
    try:
        return json.loads(value) if isinstance(value, str) and value else {}
    except ValueError:
        return {}


def _producer(store, artifact_id: int):
    ids = [e.execution_id for e in store.get_events_by_artifact_ids([artifact_id])
           if e.type == metadata_store_pb2.Event.OUTPUT]
    return store.get_executions_by_id(ids[-1:])[0] if ids else None


def _inputs(store, execution_id: int) -> Dict[str, List[Any]]:
    from pipeline.evaluation import _events_by_key

    by_key = _events_by_key(store, execution_id, metadata_store_pb2.Event.INPUT)
    return {k: store.get_artifacts_by_id(v) for k, v in by_key.items()}


def _state(execution) -> str:
    from pipeline.metadata import STATE_NAMES

    return STATE_NAMES.get(execution.last_known_state, "UNKNOWN")


def _public_arguments(kind_name, args) -> Dict[str, Any]:
    """The trainer's public arguments only (``TrainerKind.public_arguments``: never a seed, which fixes the
    Poisson batches of a private run); nothing for a kind this code does not know."""
    from pipeline.trainers import get_trainer

    try:
        kind = get_trainer(kind_name)
    except Exception:   # an unknown kind (an old store): publish none of its arguments
        return {}
    return kind.public_arguments(args)


def _lineage(store, model, trainer_execution) -> Dict[str, Any]:
    from pipeline.metadata import custom_properties

    types = {t.id: t.name for t in store.get_execution_types()}
    config = _json_prop(custom_properties(trainer_execution), "custom_config")
    out: Dict[str, Any] = {
        "trainer": {"kind": config.get("trainer"), "state": _state(trainer_execution),
                    "arguments": _public_arguments(config.get("trainer"), config.get("trainer_args")),
                    "hidden_units": config.get("hidden_units")},
        "code_version": config.get("code_version"),
        "dataset": (config.get("dataset") or {}).get("name"),
    }
    inputs = _inputs(store, trainer_execution.id)
    for schema in inputs.get("schema", [])[:1]:
        importer = _producer(store, schema.id)
        schema_file = custom_properties(importer).get("schema_file", "") if importer else ""
        match = re.match(r"([0-9a-f]{16})-(.*)$", os.path.basename(schema_file))
        out["schema"] = {"file": match.group(2) if match else os.path.basename(schema_file) or None,
                         "version": match.group(1) if match else None,
                         "kind": "curated reference schema (public by declaration)" if importer and types.get(
                             importer.type_id, "").endswith("ImportSchemaGen") else "inferred schema"}
    for examples in inputs.get("examples", [])[:1]:
        transform = _producer(store, examples.id)
        if transform is not None:
            tconfig = _json_prop(custom_properties(transform), "custom_config")
            out["transform"] = {"preprocessing_fn": custom_properties(transform).get("preprocessing_fn"),
                                "code_version": tconfig.get("code_version"), "state": _state(transform),
                                "what": "public functions only: vocabulary positions and clip ranges from the "
                                        "reference schema, declared log1p; nothing estimated from the rows"}
    # the validation that let this data through: the run's (strict) ExampleValidator
    validation = {"result": "not recorded"}
    for context in store.get_contexts_by_execution(trainer_execution.id):
        if store.get_context_types_by_id([context.type_id])[0].name != "pipeline_run":
            continue
        for execution in store.get_executions_by_context(context.id):
            if types.get(execution.type_id, "").endswith("ExampleValidator"):
                validation = _validation(custom_properties(execution), _state(execution))
    out["validation"] = validation
    return out


def _validation(props: Dict[str, Any], state: str) -> Dict[str, Any]:
    """The data gate's published part: its decision over the PUBLIC splits only (a private split never stops a
    run and its anomalies stay private; docs/privacy_model.md, "Which checks can stop a run")."""
    raw = props.get("public_splits")
    public = _json_prop(props, "public_splits") if isinstance(raw, str) and raw else None
    if not isinstance(public, list):   # a run recorded before the gate was row-local: it decided on private rows
        return {"result": "not published (this run's validation decided on private rows)",
                "checks": [], "state": "not published"}
    comparators = _json_prop(props, "comparators") or {}
    both_public = {"train", "eval"} <= set(public)
    ok = state in ("COMPLETE", "CACHED")
    return {
        "result": (("passed" if ok else "failed") + f" (public splits: {', '.join(public)})") if public
        else "no public split to validate",
        "checks": ([f"the public splits ({', '.join(public)}) against the reference schema (types, presence, "
                    "domains, ranges)"] if public else [])
        + [f"{kind} {feature} {stat} <= {t:g}" for kind, by in sorted(comparators.items()) if both_public
           for feature, stats in sorted(by.items()) for stat, t in sorted(stats.items())],
        "private_splits": "handled row by row by the public transform (values clipped to the public ranges, "
                          "unknown categories out-of-vocabulary, damaged lines dropped); never a reason to stop a "
                          "run, their counts stay private in the workdir",
        "state": state}


def _ledger_state(source_id: str, guarantee, ledger_path: Optional[str]) -> Dict[str, Any]:
    from dp_training.ledger import Ledger, LedgerError, resolve_ledger_path

    try:
        ledger = Ledger(resolve_ledger_path(ledger_path))
        receipt = guarantee.ledger or {}
        anchors = [(int(receipt["seq"]), receipt["head_hash"])] if receipt.get("head_hash") else []
        verified = ledger.verify(anchors)
        (history,) = ledger.history(source_id)
    except (LedgerError, OSError, ValueError) as e:
        return {"available": False, "problem": str(e).splitlines()[0]}
    runs = [{"seq": r["seq"], "trainer": r["trainer"], "private": r["private"], "status": r["status"],
             "epsilon": r["epsilon"], "charged": r["charged"],
             "this_model": (guarantee.ledger or {}).get("seq") in (r["seq"], r.get("finish_seq"))} for r in history["runs"]]
    return {"available": True, "verified": True, "entries": verified.entries,
            "receipt": {"seq": (guarantee.ledger or {}).get("seq"), "head_hash": (guarantee.ledger or {}).get(
                "head_hash")},
            "relation": history["relation"], "budget": history["budget"],
            "spent": {k: history["spent"][k] for k in ("epsilon", "delta", "accountant", "remaining", "runs",
                                                        "open_runs", "non_private_runs", "naive_epsilon_sum")},
            "runs": runs}


def collect(workdir: str, model_name: Optional[str] = None, version: Optional[str] = None,
            ledger_path: Optional[str] = None, version_dir: Optional[str] = None) -> Dict[str, Any]:
    """The report's content as plain JSON (every value public; see the module docstring)."""
    from dp_training.guarantee import Guarantee
    from dp_training.protocol import DEFAULT_MIN_SLICE_SIZE
    from pipeline.config import RunConfig
    from pipeline.evaluation import blessing_reason, defined_metrics, model_evaluation, undefined_reason
    from pipeline.metadata import custom_properties, open_store
    from pipeline.runner import visible_slices

    config = RunConfig(workdir=os.path.abspath(workdir))
    if version_dir is not None:
        version_dir = os.path.abspath(version_dir)
        this = PushedVersion(version_dir)
        model_name, version = this.model_name, this.name
        versions = [v.name for v in pushed_versions(os.path.dirname(version_dir))]
    else:
        try:
            this = select_version(config.serving_dir, model_name, None if version is None else str(version))
        except PushedVersionError as e:
            raise ReportError(str(e)) from None
        model_name, version, version_dir = this.model_name, this.name, os.path.abspath(this.path)
        versions = [v.name for v in pushed_versions(os.path.dirname(version_dir))]
    with open_store(config.metadata_path) as store:
        pushed = [a for a in store.get_artifacts_by_type("PushedModel")
                  if os.path.abspath(str(custom_properties(a).get("pushed_destination", ""))) == version_dir]
        if not pushed:
            raise ReportError(f"ML Metadata at {config.metadata_path} has no record of pushing {model_name} version "
                              f"{version}; pass the --workdir of the run that pushed it")
        pusher = _producer(store, pushed[-1].id)
        (model,) = _inputs(store, pusher.id)["model"][:1]
        props = custom_properties(model)
        trainer_execution = _producer(store, model.id)
        guarantee = Guarantee.loads(props["privacy_guarantee"])
        published = this.privacy()
        consistent = None if published is None else published == json.loads(props["privacy_guarantee"])
        lineage = _lineage(store, model, trainer_execution)
        trainer_config = _json_prop(custom_properties(trainer_execution), "custom_config")
        min_size = int((trainer_config.get("privacy") or {}).get("min_slice_size") or DEFAULT_MIN_SLICE_SIZE)
        evaluation = model_evaluation(store, model.id) or {"metrics": {}, "blessed": None, "baseline": None,
                                                           "min_auc": None, "max_auc_drop": None}
        if evaluation.get("reason") is None:
            evaluation["reason"] = blessing_reason(evaluation)
        baseline = evaluation.get("baseline")
        if baseline:  # the baseline's pushed version, when it was pushed
            from pipeline.report import _pushes

            pushes = [p.get("pushed_version") for p in _pushes(store, baseline["model_id"]) if p.get("pushed")]
            baseline = dict(baseline, pushed_version=pushes[-1] if pushes else None)
    shown = visible_slices(evaluation["metrics"], min_size)
    eval_private = any("PRIVATE eval split" in item for item in guarantee.not_covered)
    slices = []
    for name in sorted(shown, key=lambda s: (s != "Overall", s)):
        values = shown[name]
        metrics = defined_metrics(values)
        slices.append({"slice": name, "metrics": metrics,
                       "undefined": {m: undefined_reason(m, values) for m in metrics if metrics[m] is None}})
    serving = []
    for v in versions:
        entry = {"version": v, "this_report": v == version, "latest": v == versions[-1]}
        g = PushedVersion(os.path.join(os.path.dirname(version_dir), v)).privacy()
        if g is not None:
            entry.update(trainer=g.get("trainer"), private=g.get("private"), epsilon=g.get("epsilon"),
                         delta=g.get("delta"))
        serving.append(entry)
    return {
        "format": FORMAT, "model_name": model_name, "version": version, "model_id": model.id,
        # when this report was made (to the minute; the ledger and serving sections are as of then)
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dataset": guarantee.dataset, "source_id": guarantee.source_id,
        "privacy": {"guarantee": guarantee.to_json(), "statement": guarantee.statement(),
                    "privacy_json_matches_metadata": consistent},
        "ledger": _ledger_state(guarantee.source_id, guarantee, ledger_path),
        "audit": guarantee.audit,
        "evaluation": {"split": "eval", "covered": "not covered" if eval_private else "public split",
                       "not_covered": [i for i in guarantee.not_covered if "evaluation" in i],
                       "min_slice_size": min_size, "suppressed_slices": len(evaluation["metrics"]) - len(shown),
                       "slices": slices},
        "blessing": {"blessed": evaluation.get("blessed"), "reason": evaluation.get("reason"),
                     "min_auc": evaluation.get("min_auc"), "max_auc_drop": evaluation.get("max_auc_drop"),
                     "baseline": baseline},
        "lineage": lineage,
        "serving": {"model_name": model_name, "versions": serving},
    }


def format_text(report: Dict[str, Any]) -> str:
    g = report["privacy"]["guarantee"]
    b = report["blessing"]
    led = report["ledger"]
    lines = [f"audit report: model {report['model_name']} version {report['version']} (data source "
             f"{report['source_id']!r}); generated {report.get('generated', '-')}, code version "
             f"{report['lineage'].get('code_version')}", "", f"privacy: {report['privacy']['statement']}"]
    lines += [f"  not covered: {item}" for item in g.get("not_covered", [])]
    audit = report.get("audit")
    lines.append(f"empirical audit: epsilon lower bound {audit['epsilon_lower_bound']:.3g}" if audit and isinstance(
        audit.get("epsilon_lower_bound"), (int, float)) else "empirical audit: not run (--audit-canaries N)")
    if led.get("available"):
        budget = led["budget"]["epsilon"] if led.get("budget") else None
        # this model's run, numbered as the page numbers it: run #seq, its receipt the entry that finished it
        this = next((x for x in led.get("runs", []) if x.get("this_model")), None)
        receipt = (led.get("receipt") or {}).get("seq")
        which = ""
        if this is not None:
            which = f"; this model is run #{this['seq']}" + (
                f" (its receipt: ledger entry {receipt}, the entry that finished run #{this['seq']})"
                if receipt not in (None, this["seq"]) else "")
        elif receipt is not None:
            which = f"; this model's receipt: ledger entry {receipt}"
        lines.append(f"ledger: verified{which}; spent epsilon {led['spent']['epsilon']}"
                     + (f" of budget {budget:g}" if budget is not None else " (no budget set)")
                     + f" over {led['spent']['runs']} run(s)")
    else:
        lines.append(f"ledger: not available ({led.get('problem')})")
    ev = report["evaluation"]
    lines.append(f"evaluation ({ev['covered']}; slices under {ev['min_slice_size']} rows suppressed: "
                 f"{ev['suppressed_slices']}):")
    from pipeline.evaluation import SHOWN_METRICS, format_metric

    for s in ev["slices"]:
        lines.append(f"  {s['slice']:<34}" + "  ".join(f"{m} {format_metric(m, s['metrics'].get(m))}"
                                                      for m in SHOWN_METRICS if m in s["metrics"]))
    lines.append(f"blessing: {b['reason']}")
    lin = report["lineage"]
    lines.append(f"lineage: trainer {lin['trainer']['kind']}, code version {lin.get('code_version')}, schema "
                 f"{(lin.get('schema') or {}).get('file')} ({(lin.get('schema') or {}).get('version')}), "
                 f"validation {lin['validation']['result']}")
    lines.append("serving versions: " + ", ".join(
        v["version"] + (" (this)" if v["this_report"] else "") + (" (latest)" if v["latest"] else "")
        for v in report["serving"]["versions"]))
    return "\n".join(lines)


def write_pushed_report(workdir: str, version_dir: str, ledger_path: Optional[str] = None) -> List[str]:
    """report.json and report.html beside a pushed version (the runner calls this after a push)."""
    from pipeline.report_html import render_html

    report = collect(workdir, version_dir=version_dir, ledger_path=ledger_path)
    return PushedVersion(version_dir).write_report(report, render_html(report))
