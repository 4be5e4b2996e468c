"""``privtrain export``: the pipeline `privtrain run` would run, compiled for another orchestrator with TFX's own
runners (docs/scaling.md#orchestrator-export):

- ``kubeflow``: a Kubeflow Pipelines v2 / Vertex pipeline spec (JSON) from TFX's KubeflowV2DagRunner;
- ``airflow``: a DAG file that builds the same pipeline with ``pipeline.pipeline_def`` and TFX's AirflowDagRunner
  (Apache Airflow is not part of privtrain's environment; the file needs an Airflow installation with this
  repository and its platform environment on its workers).

Privacy preflight. `privtrain run` plans the run and checks it against the ledger before anything starts; the
Trainer executor then reserves the plan atomically before it reads a training row. An exported pipeline keeps the
second check, which is the binding one: its Trainer reserves in the ledger named here (``--ledger``, a path every
worker sees) and refuses to train when the budget would be exceeded. The export itself plans the run (bad
privacy arguments are refused now, with the planned epsilon shown) and checks the ledger when it is reachable from
here; the output states which of the two happened and that the binding check is the Trainer's at run time."""
from __future__ import annotations

import json
import os
import pprint
import re

from pipeline.config import RunConfig

RUN_TIME_CHECK = ("the budget ledger is checked and charged by the Trainer executor at run time, before it reads "
                  "any training row: a run that would exceed the data source's budget fails in the Trainer, "
                  "nothing trained; the ledger must already exist at that path (the exported run never creates "
                  "one) on storage with working POSIX file locks (not GCS-FUSE)")


class ExportError(ValueError):
    """The export cannot be made; the message names the problem and the fix."""


def preflight_at_export(config: RunConfig, spec) -> str:
    """Plans the run (public inputs: bad privacy arguments fail here); checks the ledger too when its file is
    reachable from this machine. Returns one line saying what was checked."""
    from dp_training.ledger import resolve_ledger_path
    from dp_training.protocol import RunProtocol
    from pipeline.runner import run_plan

    plan = run_plan(config, spec)   # the planner the Trainer uses (image data sets: their own args and release)
    if plan.private:
        planned = (f"planned epsilon {plan.planned_epsilon():.4g} at delta {plan.delta:.3g} ({plan.accountant} "
                   f"accountant, {plan.source.relation} of one {plan.source.unit_name})")
    else:
        planned = "non-private training (no epsilon)"
    path = resolve_ledger_path(config.privacy_args().get("ledger"))
    if os.path.exists(path):
        RunProtocol(plan).check()
        return f"privacy preflight at export: {planned}; the ledger {path} accepts it now"
    return f"privacy preflight at export: {planned}; the ledger {path} does not exist on this machine, not checked now"


def _require_ledger(config: RunConfig, explicit_ledger) -> None:
    if not explicit_ledger:
        raise ExportError("an exported pipeline charges the budget ledger from the orchestrator's workers: pass "
                          "--ledger PATH (before `export`), a ledger file on storage every worker mounts at that "
                          "path; a worker's default ledger would be a fresh one per container")
    if not os.path.isabs(explicit_ledger):
        raise ExportError(f"--ledger {explicit_ledger}: give an absolute path (the workers resolve it, not this "
                          "directory)")


def _refuse_secret_arguments(config: RunConfig) -> None:
    """A private run's secret arguments (a seed fixes its Poisson batches) would be written into the exported
    pipeline's file, which the orchestrator shows to everyone who can see the pipeline."""
    from pipeline.trainers import get_trainer

    kind = get_trainer(config.trainer)
    secret = kind.secret_arguments_set(config.trainer_args)
    if secret and kind.is_private(config.trainer_args):
        raise ExportError(f"trainer argument {secret[0]} would be published in the exported pipeline and it fixes "
                          f"the private run's batches (the guarantee holds only while it is secret): drop "
                          f"{secret[0]} from the trainer arguments to export a private run")


def export(orchestrator: str, config: RunConfig, output: str, image: str = "privtrain:latest",
           explicit_ledger=None) -> str:
    """Writes the compiled pipeline to ``output``; returns the lines to print."""
    from core.dataset import load_dataset

    import dataclasses

    from dp_training.ledger import Ledger

    _require_ledger(config, explicit_ledger)
    # The exported Trainer never creates a ledger (a worker without the shared volume must not start a fresh
    # budget), and when the ledger is reachable here it must still contain the receipt it has now (a swapped or
    # rewritten file is refused at run time as tampered).
    privacy = {**config.privacy, "ledger": explicit_ledger, "ledger_must_exist": True}
    if os.path.exists(explicit_ledger):
        head = Ledger(explicit_ledger).verify()
        privacy["ledger_anchor"] = f"{head.head_seq}:{head.head_hash}"
    config = dataclasses.replace(config, privacy=privacy)
    if os.path.isdir(output):
        raise ExportError(f"--output {output} is a directory: name the file to write")
    if not os.path.isdir(os.path.dirname(output) or "."):
        raise ExportError(f"--output {output}: its directory does not exist")
    spec = load_dataset(config.data_dir)
    spec.require_privacy()
    _refuse_secret_arguments(config)
    checked = preflight_at_export(config, spec)
    if orchestrator == "kubeflow":
        _export_kubeflow(config, spec, output, image)
    elif orchestrator == "airflow":
        _export_airflow(config, output)
    else:
        raise ExportError(f"unknown orchestrator {orchestrator!r}; use kubeflow or airflow")
    return "\n".join([f"wrote {output} ({orchestrator}: the {config.trainer} pipeline of {spec.name})",
                      checked, f"run time: {RUN_TIME_CHECK}; ledger {explicit_ledger}",
                      "the data directory, workdir and ledger paths in it must be visible to the orchestrator's "
                      "workers"])


def _export_kubeflow(config: RunConfig, spec, output: str, image: str) -> None:
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner

    from pipeline.pipeline_def import create_pipeline, pipeline_name

    # Kubeflow names are [a-z0-9][a-z0-9-]*: adult-dp_sgd becomes adult-dp-sgd.
    name = re.sub(r"[^a-z0-9-]+", "-", pipeline_name(spec, config.trainer).lower()).strip("-")
    pipeline = create_pipeline(config, spec, name=name)
    runner = kubeflow_v2_dag_runner.KubeflowV2DagRunner(
        config=kubeflow_v2_dag_runner.KubeflowV2DagRunnerConfig(default_image=image),
        output_dir=os.path.dirname(output) or ".", output_filename=os.path.basename(output))
    runner.run(pipeline, write_out=True)
    with open(output) as f:
        compiled = json.load(f)
    # The spec says where its privacy check happens (a Kubeflow pipeline's description is shown in its UI).
    compiled.setdefault("pipelineSpec", compiled).setdefault("pipelineInfo", {})["description"] = (
        f"privtrain {config.trainer} pipeline; {RUN_TIME_CHECK}; ledger {config.privacy_args().get('ledger')}")
    with open(output, "w") as f:
        json.dump(compiled, f, indent=2, sort_keys=True)


DAG_TEMPLATE = '''"""Airflow DAG generated by `privtrain export airflow`: the privtrain pipeline ({trainer} trainer),
built by pipeline.pipeline_def as `privtrain run` builds it, run by TFX's AirflowDagRunner.

Needs: Apache Airflow with TFX 1.15.1 (privtrain's platform environment) on the scheduler and workers, and this
repository importable there (PRIVTRAIN_ROOT below, or on PYTHONPATH). The data directory, workdir and ledger
below must be paths every worker sees.

Privacy: {run_time_check}. Ledger: {ledger}
"""
import datetime
import os
import sys

PRIVTRAIN_ROOT = os.environ.get("PRIVTRAIN_ROOT", {root!r})
if PRIVTRAIN_ROOT not in sys.path:
    sys.path.insert(0, PRIVTRAIN_ROOT)

from core.dataset import load_dataset  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.pipeline_def import create_pipeline  # noqa: E402

CONFIG = RunConfig(**{config})
PIPELINE = create_pipeline(CONFIG, load_dataset(CONFIG.data_dir))
AIRFLOW_CONFIG = {{"schedule_interval": None, "start_date": datetime.datetime(2024, 1, 1)}}

try:
    from tfx.orchestration.airflow.airflow_dag_runner import AirflowDagRunner, AirflowPipelineConfig
except ImportError:  # no Airflow here: the module still builds PIPELINE (for checks), but defines no DAG
    AirflowDagRunner = None

if AirflowDagRunner is not None:
    DAG = AirflowDagRunner(AirflowPipelineConfig(AIRFLOW_CONFIG)).run(PIPELINE)
'''


def config_kwargs(config: RunConfig) -> dict:
    import dataclasses

    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = value if not isinstance(value, dict) else dict(value)
    return out


def _export_airflow(config: RunConfig, output: str) -> None:
    from pipeline.config import PROJECT_ROOT

    text = DAG_TEMPLATE.format(trainer=config.trainer, run_time_check=RUN_TIME_CHECK,
                               ledger=config.privacy_args().get("ledger"), root=PROJECT_ROOT,
                               config=pprint.pformat(config_kwargs(config), indent=1, width=100, sort_dicts=True))
    compile(text, output, "exec")  # a DAG file that does not compile is never written
    with open(output, "w") as f:
        f.write(text)
