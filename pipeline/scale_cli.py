"""``privtrain run``'s scaling flags (--beam-arg, --tf-config, --train-workers) and ``privtrain export``
(docs/scaling.md). The CLI delegates here; the work is in pipeline.beam_options, pipeline.trainers.multiworker
and pipeline.export."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict


def add_run_flags(p) -> None:
    g = p.add_argument_group("scaling (docs/scaling.md)")
    g.add_argument("--beam-arg", action="append", default=[], metavar="--OPTION=VALUE", dest="beam_args",
                   help="a Beam pipeline option for the Beam-based components, repeatable, e.g. "
                        "--beam-arg=--direct_running_mode=multi_processing --beam-arg=--direct_num_workers=2, "
                        "or --beam-arg=--runner=FlinkRunner --beam-arg=--flink_master=HOST:8081 "
                        "(default: the direct runner in this process)")
    g.add_argument("--tf-config", default=None, metavar="FILE",
                   help="standard trainer: train with MultiWorkerMirroredStrategy over the cluster of this "
                        "TF_CONFIG JSON file (default: the TF_CONFIG environment variable, if set); every task is "
                        "started on this machine")
    g.add_argument("--train-workers", type=int, default=None, metavar="N",
                   help="standard trainer: train with MultiWorkerMirroredStrategy over N local worker processes")


def run_options(args) -> Dict[str, Any]:
    """Validated scaling options of a run: {"beam_args": (...), "trainer_args": {...}}. Raises ValueError (one
    line) on a bad value. TF_CONFIG is taken out of this process's environment: the executor starts the tasks."""
    from pipeline.beam_options import validate
    from pipeline.trainers import multiworker

    beam_args = tuple(validate(args.beam_args or []))
    cluster, origin = None, None
    if args.tf_config is not None:
        try:
            with open(args.tf_config) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"--tf-config {args.tf_config}: cannot read it ({e.strerror})") from None
        origin = f"--tf-config {args.tf_config}"
    else:
        text = os.environ.pop("TF_CONFIG", None)
        origin = "the TF_CONFIG environment variable" if text else None
    if text is not None:
        cluster = multiworker.cluster_from_tf_config(text, origin)
    if cluster is not None and args.train_workers is not None:
        raise ValueError(f"--train-workers and {origin} both name the training cluster: give one of them")
    workers = multiworker.num_tasks(cluster) if cluster else (args.train_workers or 1)
    if args.train_workers is not None and args.train_workers < 1:
        raise ValueError(f"--train-workers {args.train_workers}: give a number of workers >= 1")
    if workers > 1 and args.trainer != "standard":
        if args.trainer == "dp_sgd":
            raise ValueError(f"{origin or '--train-workers'}: DP-SGD runs in one replica only; with several "
                             "replicas the noise would be added once per replica instead of once per global step "
                             "as accounted. Train dp_sgd without a cluster (unset TF_CONFIG), or use "
                             "--trainer standard for multi-worker training")
        raise ValueError(f"{origin or '--train-workers'}: multi-worker training is for --trainer standard only; "
                         f"the {args.trainer} trainer has its own workers (docs/federated.md)")
    trainer_args: Dict[str, Any] = {}
    if args.trainer != "standard":  # one task at most here: the kind trains in the executor's process
        pass
    elif cluster is not None:
        trainer_args["cluster"] = cluster
    elif args.train_workers is not None and args.train_workers > 1:
        trainer_args["train_workers"] = args.train_workers
    return {"beam_args": beam_args, "trainer_args": trainer_args}


def add_export_parser(sub, add_run_flags_fn) -> None:
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
    add_run_flags_fn(p)


def cmd_export(args, run_config_fn) -> int:
    """``privtrain export``: builds the run's configuration as `privtrain run` does, then compiles it."""
    from dp_training.dataset import DatasetError
    from dp_training.ledger import LedgerError
    from pipeline.export import ExportError, export

    try:
        config = run_config_fn(args)
        message = export(args.orchestrator, config, os.path.abspath(args.output), image=args.image,
                         explicit_ledger=getattr(args, "ledger", None))
    except (ExportError, DatasetError, LedgerError, ValueError) as e:
        print(f"privtrain export: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the privacy layer's refusals (PlanError, CalibrationError, ...)
        if type(e).__name__ in ("PlanError", "UnsupportedRelationError", "CalibrationError"):
            print(f"privtrain export: {e}", file=sys.stderr)
            return 2
        raise
    print(message)
    return 0
