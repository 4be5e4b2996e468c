"""``privtrain export``: the run `privtrain run` would run, compiled for another orchestrator (pipeline/export.py,
docs/scaling.md)."""
from __future__ import annotations

import os
import sys

from privtrain_cli.common import is_refusal
from privtrain_cli.run import add_run_flags, run_config


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="compile the pipeline for another orchestrator (Kubeflow Pipelines v2, "
                                      "Airflow)",
                       description="Compile the same pipeline `privtrain run` would run, for another orchestrator "
                                   "(docs/scaling.md#orchestrator-export). The data directory, workdir and ledger "
                                   "must be paths the orchestrator's workers see.")
    p.add_argument("orchestrator", choices=["kubeflow", "airflow"])
    p.add_argument("--output", required=True, metavar="FILE",
                   help="kubeflow: the pipeline spec (pipeline.json); airflow: the DAG file (dag.py)")
    p.add_argument("--image", default="privtrain:latest",
                   help="kubeflow: the container image every component runs in; it must hold this repository "
                        "and its platform environment (default privtrain:latest)")
    add_run_flags(p)


def run(args) -> int:
    """``privtrain export``: builds the run's configuration as `privtrain run` does, then compiles it."""
    from core.dataset import DatasetError
    from dp_training.ledger import LedgerError
    from pipeline.export import ExportError, export

    try:
        config = run_config(args)
        message = export(args.orchestrator, config, os.path.abspath(args.output), image=args.image,
                         explicit_ledger=getattr(args, "ledger", None))
    except (ExportError, DatasetError, LedgerError, ValueError) as e:
        print(f"privtrain export: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the privacy layer's refusals (PlanError, CalibrationError, ...)
        if is_refusal(e):
            print(f"privtrain export: {e}", file=sys.stderr)
            return 2
        raise
    print(message)
    return 0
