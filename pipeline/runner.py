"""Runs the pipeline with TFX's LocalDagRunner (Beam, SQLite ML Metadata), shows progress, and summarises
the run from ML Metadata."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Dict, List, Optional

from pipeline.config import RunConfig
from core.dataset import load_dataset
from pipeline.metadata import (ComponentRecord, components_of_run, custom_properties, load_slice_metrics, open_store,
                               run_context_ids)
from pipeline.pipeline_def import create_pipeline
from pipeline.progress import ProgressReporter
from pipeline.quiet import quiet_libraries


class PipelineRunError(RuntimeError):
    """The run failed; ``summary`` holds what ran before the failure."""

    def __init__(self, message: str, summary: "RunSummary", cause: Optional[BaseException] = None):
        super().__init__(message)
        self.summary = summary
        self.cause = cause


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
    min_slice_size: Optional[int] = None
    blessing_reason: Optional[str] = None  # why the model was (not) blessed (pipeline.evaluation)

    def outputs(self, node_id: str, key: str):
        for record in self.components:
            if record.node_id == node_id:
                return record.outputs.get(key, [])
        return []

    def to_json(self) -> dict:
        return {"pipeline": self.pipeline_name, "wall_seconds": round(self.wall_seconds, 2),
                "components": [{"component": c.node_id, "state": c.state, "seconds": round(c.seconds, 2)}
                               for c in self.components],
                "metrics": _public_metrics(visible_slices(self.metrics, self.min_slice_size or 30)), "blessed": self.blessed,
                "blessing_reason": self.blessing_reason, "pushed_path": self.pushed_path,
                "model_uri": self.model_uri, "model_properties": self.model_properties, "error": self.error}


def _public_metrics(metrics: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, Optional[float]]]:
    """The shown metrics per slice, undefined ones (one class, no positives) as None (JSON null), never 0."""
    from pipeline.evaluation import defined_metrics

    return {name: defined_metrics(values) for name, values in metrics.items()}


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

    from core.private_files import private_dir, private_umask

    private_umask()  # every file this run writes (and its executors, Beam workers, children): 0600 / dirs 0700
    spec = load_dataset(config.data_dir)
    spec.require_privacy()
    from pipeline.data_gate import check_raw_data, write_private_checks

    # the data gate's structural half: file-level problems and a public split's damaged line stop the run (one
    # line naming file, line and problem); a private split's damaged lines are dropped and counted privately
    tally = check_raw_data(spec)
    for directory in {config.workdir, config.store_dir or config.workdir}:
        private_dir(directory)  # 0700; an existing one open to other users is refused (chmod 700 fix)
    write_private_checks(config.workdir, tally)
    if not config.validate_only:  # nothing is trained or charged when only the data gate runs
        preflight(config, spec)
    pipeline = create_pipeline(config, spec)
    started = time.time()
    absl_logging.get_absl_handler().setLevel(logging.ERROR)
    with open_store(config.metadata_path, must_exist=False) as store:
        before = run_context_ids(store)
    error: Optional[BaseException] = None
    try:
        reporter = ProgressReporter(progress, started, [c.id for c in pipeline.components], config.workdir)
        with reporter.observing(local_dag_runner, launcher):
            tfx.orchestration.LocalDagRunner().run(pipeline)
    except Exception as e:  # noqa: BLE001 - reported with the summary below
        error = e
    summary = summarize(config, pipeline.pipeline_info.pipeline_name, before, time.time() - started)
    if error is not None:
        cause = root_cause(error)
        summary.error = f"{type(cause).__name__}: {cause}"
        raise PipelineRunError(summary.error, summary, cause) from error
    if summary.pushed_path:  # the audit report beside the pushed version (docs/reports.md)
        from pipeline.audit_report import write_pushed_report

        write_pushed_report(config.workdir, summary.pushed_path, config.privacy.get("ledger"))
    return summary


def run_plan(config: RunConfig, spec, privacy_args=None):
    """The run's plan from public inputs (``dp_training.planner.plan_for``, the function the Trainer plans with):
    used by the pre-flight and by ``privtrain export``."""
    from dp_training.planner import PlanOptions, plan_for
    from pipeline.trainers import get_trainer

    exact = None
    if spec.require_privacy().relation == "replace_one":  # the count is public under this relation
        from pipeline.data_gate import readable_rows

        exact = readable_rows(spec, "train")   # as ingestion reads them: one damaged row never changes it
    return plan_for(spec, get_trainer(config.trainer), config.trainer_args,
                    config.privacy_args() if privacy_args is None else privacy_args,
                    PlanOptions(image_model=config.image_model, exact_rows=exact))


def preflight(config: RunConfig, spec) -> None:
    """Plans the run from public inputs and checks it against the data source's ledger before anything runs
    (the Trainer repeats the check atomically when it reserves). Raises PlanError / ledger errors / ValueError."""
    from dp_training.protocol import RunProtocol

    from dp_training.fingerprint import content_digest
    from pipeline.receipts import workdir_anchors

    # the receipts this workdir holds must be in the ledger (a forged ledger is refused before anything runs)
    privacy = {**config.privacy_args(), "anchors": workdir_anchors([os.path.dirname(config.metadata_path)])}
    RunProtocol(run_plan(config, spec, privacy), content_digest=content_digest(spec)).check()


def summarize(config: RunConfig, pipeline_name: str, before: set, wall_seconds: float) -> RunSummary:
    with open_store(config.metadata_path) as store:
        new_runs = sorted(run_context_ids(store) - before)
        components = components_of_run(store, new_runs[-1]) if new_runs else []
        summary = RunSummary(pipeline_name=pipeline_name, components=components, wall_seconds=wall_seconds,
                             min_slice_size=config.privacy_args().get("min_slice_size"))
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
        if models and (evaluations or blessings):
            from pipeline.evaluation import model_evaluation

            summary.blessing_reason = (model_evaluation(store, models[0].id) or {}).get("reason")
        pushes = summary.outputs("Pusher", "pushed_model")
        if pushes:
            props = custom_properties(pushes[0])
            if props.get("pushed"):
                summary.pushed_path = props.get("pushed_destination")
    return summary


def _g(value, spec=".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def guarantee_of(properties: Dict[str, object]):
    """The run's Guarantee from the Model artifact's properties (None when there is none)."""
    from dp_training.guarantee import Guarantee

    text = properties.get("privacy_guarantee")
    return Guarantee.loads(text) if isinstance(text, str) and text else None


def format_guarantee(guarantee) -> str:
    """The recorded guarantee as a paragraph (the same object is in privacy.json and ML Metadata)."""
    g = guarantee
    if not g.private:
        lines = [f"privacy guarantee: NONE ({g.statement()})"]
    else:
        lines = [f"privacy guarantee: epsilon = {g.epsilon:.4g}, delta = {g.delta:.3g} ({g.accountant} accountant), "
                 f"for {g.relation_text} of source {g.source_id!r}"]
        if g.simulation:   # noise-cohort simulation setting (docs/federated.md): the label first, then what it covers
            dep = g.simulation.get("deployment_epsilon")
            lines.insert(0, f"{g.simulation['label']}: the noise corresponds to epsilon "
                            f"{'inf' if dep is None else format(dep, '.4g')} for the stated deployment only "
                            f"({g.simulation.get('covers')}), NOT for this run's data, whose guarantee follows")
        for m in g.mechanisms:
            alone = f" (epsilon {m.epsilon_alone:.3g} alone)" if m.epsilon_alone is not None else ""
            lines.append(f"  covers {m.covers}: {m.name}{alone}")
        from pipeline.trainers import TRAINER_KINDS, get_trainer

        if g.trainer in TRAINER_KINDS:   # the kind states its own parameters
            lines.extend("  " + line for line in get_trainer(g.trainer).summary_lines(g.parameters))
    if g.audit:
        lines.append(f"  empirical audit: epsilon lower bound {g.audit.get('epsilon_lower_bound', float('nan')):.3g} "
                     f"({g.audit.get('method', 'canaries')})")
    led = g.ledger or {}
    if led:
        budget = led.get("budget_epsilon")
        spent = led.get("spent_epsilon")
        spent_text = spent if isinstance(spent, str) else f"{spent:.4g}"
        lines.append(f"  data source budget: spent epsilon {spent_text}"
                     + (f" of {budget:.4g}" if isinstance(budget, (int, float)) else " (no budget set)")
                     + f"; ledger entry {led.get('seq')} ({str(led.get('head_hash', ''))[:12]})")
    for item in g.not_covered:
        lines.append(f"  not covered: {item}")
    return "\n".join(lines)


def visible_slices(metrics: Dict[str, Dict[str, float]], min_size: int) -> Dict[str, Dict[str, float]]:
    """Slices with at least ``min_size`` examples (small groups are suppressed from what is shown/published)."""
    return {name: values for name, values in metrics.items()
            if name == "Overall" or values.get("example_count", 0) >= min_size}


def format_summary(summary: RunSummary) -> str:
    lines = [f"pipeline {summary.pipeline_name}: {'FAILED' if summary.error else 'succeeded'} "
             f"in {summary.wall_seconds:.1f}s", "", f"{'component':<28} {'state':<10} {'seconds':>8}"]
    for c in summary.components:
        lines.append(f"{c.node_id:<28} {c.state:<10} {c.seconds:8.1f}")
    lines.append("(timings are operational: they grow with the private data's size and are not covered by the "
                 "privacy guarantee; keep them with the operator)")
    if summary.metrics:
        from dp_training.protocol import DEFAULT_MIN_SLICE_SIZE

        shown = visible_slices(summary.metrics, summary.min_slice_size or DEFAULT_MIN_SLICE_SIZE)
        names = ["auc", "binary_accuracy", "precision", "recall", "example_count"]
        if any("sparse_categorical_accuracy" in v for v in shown.values()):   # multi-class (image) data sets
            names = ["sparse_categorical_accuracy", "example_count"]
        lines += ["", f"{'slice':<36}" + "".join(f"{n:>16}" for n in names)]
        from pipeline.evaluation import defined_metrics, format_metric

        for slice_name in sorted(shown, key=lambda s: (s != "Overall", s)):
            values = defined_metrics(shown[slice_name])  # undefined (one class, no positives): "undefined"
            lines.append(f"{slice_name:<36}" + "".join(
                f"{format_metric(n, values[n]):>16}" if n in values else f"{'-':>16}" for n in names))
        hidden = len(summary.metrics) - len(shown)
        if hidden:
            lines.append(f"({hidden} slice(s) with fewer than {summary.min_slice_size or DEFAULT_MIN_SLICE_SIZE} "
                         "rows suppressed)")
    guarantee = guarantee_of(summary.model_properties)
    if guarantee is not None:
        lines += ["", format_guarantee(guarantee)]
    if summary.blessed is not None:
        lines += ["", f"blessed: {'yes' if summary.blessed else 'no'}"
                  + (f" ({summary.blessing_reason.split(': ', 1)[-1]})" if summary.blessing_reason else "")]
    lines.append(f"pushed: {summary.pushed_path or 'no'}")
    if summary.error:
        lines += ["", f"error: {summary.error}",
                  "(diagnostics about the data are for its owner: they are not covered by the privacy guarantee)"]
    return "\n".join(lines)
