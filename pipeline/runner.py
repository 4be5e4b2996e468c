"""Runs the pipeline with TFX's LocalDagRunner (Beam, SQLite ML Metadata), shows progress, and summarises
the run from ML Metadata."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from typing import Dict, List, Optional

from pipeline.config import RunConfig
from dp_training.dataset import load_dataset
from pipeline.metadata import (ComponentRecord, components_of_run, custom_properties, load_slice_metrics, open_store,
                               run_context_ids)
from pipeline.pipeline_def import create_pipeline
from pipeline.quiet import quiet_libraries
from pipeline.trainers import is_private


class PipelineRunError(RuntimeError):
    """The run failed; ``summary`` holds what ran before the failure."""

    def __init__(self, message: str, summary: "RunSummary"):
        super().__init__(message)
        self.summary = summary


@dataclasses.dataclass
class RunSummary:
    pipeline_name: str
    components: List[ComponentRecord]
    wall_seconds: float
    metrics: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)
    blessed: Optional[bool] = None
    pushed_path: Optional[str] = None
    model_uri: Optional[str] = None
    model_properties: Dict[str, object] = dataclasses.field(default_factory=dict)
    error: Optional[str] = None

    def outputs(self, node_id: str, key: str):
        for record in self.components:
            if record.node_id == node_id:
                return record.outputs.get(key, [])
        return []

    def to_json(self) -> dict:
        return {"pipeline": self.pipeline_name, "wall_seconds": round(self.wall_seconds, 2),
                "components": [{"component": c.node_id, "state": c.state, "seconds": round(c.seconds, 2)}
                               for c in self.components],
                "metrics": self.metrics, "blessed": self.blessed, "pushed_path": self.pushed_path,
                "model_uri": self.model_uri, "model_properties": self.model_properties, "error": self.error}


class _ProgressReporter:
    """Turns LocalDagRunner's component log calls into short progress lines with durations.

    LocalDagRunner reports progress only through absl logging, whose level libraries change while the
    pipeline runs (Transform turns it down), so we observe the runner module's and the launcher's
    ``logging.info`` calls directly instead of attaching a handler."""

    def __init__(self, stream, started: float):
        self._stream, self._started, self._running = stream, started, {}

    def info(self, message, *args):
        text = message % args if args else str(message)
        now = time.time()
        if text.startswith("Component ") and text.endswith(" is running."):
            node = text[len("Component "):-len(" is running.")]
            self._running[node] = now
            self._print(f"{node} started")
        elif text.startswith("Component ") and text.endswith(" is finished."):
            node = text[len("Component "):-len(" is finished.")]
            self._print(f"{node} finished in {now - self._running.pop(node, now):.1f}s")
        elif text.startswith("A cached execution"):
            self._print("  (cached result reused)")

    def _print(self, text: str) -> None:
        self._stream.write(f"[{time.time() - self._started:7.1f}s] {text}\n")
        self._stream.flush()

    @contextlib.contextmanager
    def observing(self, *modules):
        originals = [(m, m.logging) for m in modules]
        reporter = self

        class _Observed:
            def __getattr__(self, name):
                return getattr(originals[0][1], name)

            def info(self, message, *args, **kwargs):
                reporter.info(message, *args)
                return originals[0][1].info(message, *args, **kwargs)

        try:
            for module, _ in originals:
                module.logging = _Observed()
            yield
        finally:
            for module, original in originals:
                module.logging = original


def root_cause(error: BaseException) -> BaseException:
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        nxt = error.__cause__ or error.__context__
        if nxt is None:
            break
        error = nxt
    return error


def run_pipeline(config: RunConfig, progress=sys.stderr) -> RunSummary:
    quiet_libraries()
    from absl import logging as absl_logging
    from tfx import v1 as tfx
    from tfx.orchestration.local import local_dag_runner
    from tfx.orchestration.portable import launcher

    spec = load_dataset(config.data_dir)
    os.makedirs(config.workdir, exist_ok=True)
    fingerprint = spec.fingerprint("train")
    guard_non_private(config, fingerprint)
    if config.allow_non_private and not is_private(config.trainer, config.trainer_args):
        # The Trainer records the allowed non-private run in the ledger.
        config = dataclasses.replace(config, trainer_args={**config.trainer_args, "allow_non_private": True})
    pipeline = create_pipeline(config, spec, fingerprint)
    started = time.time()
    absl_logging.get_absl_handler().setLevel(logging.ERROR)
    with open_store(config.metadata_path, must_exist=False) as store:
        before = run_context_ids(store)
    error: Optional[BaseException] = None
    try:
        with _ProgressReporter(progress, started).observing(local_dag_runner, launcher):
            tfx.orchestration.LocalDagRunner().run(pipeline)
    except Exception as e:  # noqa: BLE001 - reported with the summary below
        error = e
    summary = summarize(config, pipeline.pipeline_info.pipeline_name, before, time.time() - started)
    if error is not None:
        cause = root_cause(error)
        summary.error = f"{type(cause).__name__}: {cause}"
        raise PipelineRunError(summary.error, summary) from error
    return summary


def guard_non_private(config: RunConfig, fingerprint: str) -> None:
    """Refuses, before anything runs, non-private training on a data set that has a privacy budget."""
    if is_private(config.trainer, config.trainer_args):
        return
    from dp_training.ledger import PrivacyLedger

    PrivacyLedger(config.workdir).check_non_private(fingerprint, config.allow_non_private)


def summarize(config: RunConfig, pipeline_name: str, before: set, wall_seconds: float) -> RunSummary:
    with open_store(config.metadata_path) as store:
        new_runs = sorted(run_context_ids(store) - before)
        components = components_of_run(store, new_runs[-1]) if new_runs else []
        summary = RunSummary(pipeline_name=pipeline_name, components=components, wall_seconds=wall_seconds)
        models = summary.outputs("Trainer", "model")
        if models:
            summary.model_uri = models[0].uri
            summary.model_properties = custom_properties(models[0])
        evaluations = summary.outputs("Evaluator", "evaluation")
        if evaluations:
            summary.metrics = load_slice_metrics(evaluations[0].uri)
        blessings = summary.outputs("Evaluator", "blessing")
        if blessings:
            summary.blessed = bool(custom_properties(blessings[0]).get("blessed", 0))
        pushes = summary.outputs("Pusher", "pushed_model")
        if pushes:
            props = custom_properties(pushes[0])
            if props.get("pushed"):
                summary.pushed_path = props.get("pushed_destination")
    return summary


def _g(value, spec=".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def format_guarantee(privacy: Dict[str, object]) -> str:
    """The recorded guarantee in one paragraph (every key stays in ML Metadata and privacy.json)."""
    p = privacy
    lines = [f"privacy guarantee: epsilon = {_g(p.get('epsilon'))}, delta = {_g(p.get('delta'))} "
             f"({p.get('accountant', '?')} accountant, {p.get('neighboring_relation', 'add/remove-one')})"]
    mechanism = [f"noise multiplier {_g(p.get('noise_multiplier'))}"]
    if "l2_norm_clip" in p:
        mechanism.append(f"clip {_g(p['l2_norm_clip'])}")
    mechanism.append(f"sampling rate {_g(p.get('sampling_rate'))} ({p.get('sampling', p.get('sampling_method', '?'))})")
    mechanism.append(f"{_g(p.get('steps'))} steps" + (f" / {_g(p['epochs'], '.3g')} epochs" if "epochs" in p else ""))
    lines.append("  " + ", ".join(mechanism))
    if "mia_auc" in p:
        lines.append(f"  membership inference attack AUC {_g(p['mia_auc'], '.3f')} (0.5 = chance)")
    if "ledger_spent_epsilon" in p:
        budget = p.get("ledger_budget_epsilon")
        lines.append(f"  data set budget: spent epsilon {_g(p['ledger_spent_epsilon'])}"
                     + (f" of {_g(budget)}" if budget not in (None, "", "none") else " (no budget set)"))
    return "\n".join(lines)


def format_summary(summary: RunSummary) -> str:
    lines = [f"pipeline {summary.pipeline_name}: {'FAILED' if summary.error else 'succeeded'} "
             f"in {summary.wall_seconds:.1f}s", "", f"{'component':<28} {'state':<10} {'seconds':>8}"]
    for c in summary.components:
        lines.append(f"{c.node_id:<28} {c.state:<10} {c.seconds:8.1f}")
    if summary.metrics:
        names = ["auc", "binary_accuracy", "precision", "recall", "example_count"]
        lines += ["", f"{'slice':<36}" + "".join(f"{n:>16}" for n in names)]
        for slice_name in sorted(summary.metrics, key=lambda s: (s != "Overall", s)):
            values = summary.metrics[slice_name]
            lines.append(f"{slice_name:<36}" + "".join(
                f"{values[n]:>16.4f}" if n in values and n != "example_count"
                else f"{int(values[n]):>16d}" if n in values else f"{'-':>16}" for n in names))
    privacy = {k[len("privacy_"):]: v for k, v in summary.model_properties.items() if k.startswith("privacy_")}
    if privacy:
        lines += ["", format_guarantee(privacy)]
    elif summary.model_properties:
        lines += ["", "privacy guarantee: none (non-private trainer)"]
    if summary.blessed is not None:
        lines += ["", f"blessed: {'yes' if summary.blessed else 'no'}"]
    lines.append(f"pushed: {summary.pushed_path or 'no'}")
    if summary.error:
        lines += ["", f"error: {summary.error}"]
    return "\n".join(lines)
