"""``privtrain run``: the pipeline from ingestion to a pushed model (pipeline/runner.py does the work).

Also the run's flags, which ``privtrain export`` shares: the trainer kinds' own flags, the privacy flags, the
scaling flags (docs/scaling.md) and the image data sets' options (docs/image_data.md)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Tuple

from privtrain_cli.common import default_workdir, is_refusal


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the pipeline: ingestion to a pushed model",
                       description="Run the TFX pipeline on a data set, from ingestion to a pushed model.")
    add_run_flags(p)


def add_run_flags(p) -> None:
    """The run's flags (`privtrain run`, and `privtrain export`, which compiles the same run)."""
    from pipeline.config import DEFAULT_DATA_DIR
    from pipeline.trainers import TRAINER_KINDS, trainer_module

    p.add_argument("--trainer", choices=sorted(TRAINER_KINDS), default="dp_sgd",
                   help="trainer kind (default dp_sgd: DP-SGD calibrated to epsilon 3)")
    p.add_argument("--data", default=DEFAULT_DATA_DIR, help="data directory with dataset.json (default: Adult)")
    p.add_argument("--workdir", default=default_workdir(),
                   help="work directory: pipeline outputs, ML Metadata store, serving dir (default ./privtrain-work)")
    p.add_argument("--model-name", default=None, help="serving name (default: the data set's name)")
    p.add_argument("--min-auc", type=float, default=0.80, help="absolute AUC a model must exceed to be blessed")
    p.add_argument("--max-auc-drop", type=float, default=0.0,
                   help="allowed AUC drop against the latest blessed model of the same trainer kind")
    p.add_argument("--model", default=None,
                   choices=["scatternet_linear", "scatternet_linear_dpnorm", "scatternet_cnn", "cnn"],
                   help="image data sets: the model (default scatternet_linear; docs/image_data.md)")
    p.add_argument("--min-accuracy", type=float, default=0.5,
                   help="image data sets: overall accuracy a model must exceed to be blessed (default 0.5)")
    p.add_argument("--allow-non-private", action="store_true",
                   help="allow a non-private trainer on a data set that has a privacy budget")
    p.add_argument("--new-source", default=None, metavar="REASON",
                   help="the training data's content is already charged under another source id in the ledger, "
                        "and this really is a different data source: say why (recorded in the ledger)")
    priv = p.add_argument_group("privacy (every trainer kind; see docs/privacy_model.md)")
    priv.add_argument("--target-epsilon", type=float, default=None,
                      help="the run's total epsilon (preprocessing + training); private kinds calibrate their noise "
                           "to it (default 3 unless a noise multiplier is given)")
    priv.add_argument("--delta", type=float, default=None,
                      help="delta of the guarantee (default 1/(10 N) for the data set's public planning size N)")
    priv.add_argument("--accountant", choices=["pld", "rdp"], default=None, help="privacy accountant (default pld)")
    priv.add_argument("--preprocessing-epsilon", type=float, default=None,
                      help="epsilon the DP normalisation statistics would have alone (default: a tenth of the "
                           "target); composed with training into the run's guarantee")
    priv.add_argument("--budget-epsilon", type=float, default=None,
                      help="create the data source's total budget in the ledger if it has none (never raises an "
                           "existing one: use privtrain budget --set-epsilon)")
    priv.add_argument("--audit-canaries", type=int, default=None,
                      help="insert N synthetic canaries and report an empirical epsilon lower bound (one-run audit)")
    priv.add_argument("--min-slice-size", type=int, default=None,
                      help="evaluation slices with fewer rows are suppressed in summaries and reports (default 30)")
    p.add_argument("--hidden-units", type=int, nargs="+", default=None, metavar="N",
                   help="hidden layer widths of the MLP (default 64 64, a conventional size fixed before any "
                        "measurement; never chosen on a data set's rows, docs/dp_training.md)")
    p.add_argument("--no-cache", action="store_true", help="re-run every component")
    p.add_argument("--validate-only", action="store_true",
                   help="run only the data gate (ingestion, statistics, schema/range/drift/skew validation); "
                        "nothing is trained, charged or pushed")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    # Flags several trainer kinds share are declared once, without defaults: each kind applies its own.
    common = p.add_argument_group("training (every trainer kind; defaults depend on the kind)")
    common.add_argument("--epochs", type=float, default=None, help="passes over the training data")
    common.add_argument("--batch-size", type=int, default=None, help="(expected) batch size")
    common.add_argument("--learning-rate", type=float, default=None, help="learning rate")
    # --sampling means a different thing per kind: declared once with every kind's choices; the kind's typed
    # config accepts its own (one clear error otherwise), so no kind's choices or help win for another.
    common.add_argument("--sampling", choices=["poisson", "shuffle", "fixed"], default=None,
                        help="dp_sgd: poisson (default; amplified, variable-size batches) or shuffle (alias fixed: "
                             "fixed-size shuffled batches, one Gaussian per epoch, replace-one sources only); "
                             "federated: poisson (default; each client joins with probability m/K) or fixed "
                             "(exactly m clients per round, --accountant rdp)")
    seen = {"--epochs", "--batch-size", "--learning-rate", "--sampling", "--target-epsilon", "--delta",
            "--accountant", "--preprocessing-epsilon", "--budget-epsilon", "--audit-canaries", "--min-slice-size"}
    for kind in TRAINER_KINDS:
        try:
            module = trainer_module(kind)
        except ImportError:
            continue
        if hasattr(module, "add_arguments"):
            module.add_arguments(_DedupParser(p, seen))
    add_scaling_flags(p)  # --beam-arg, --tf-config, --train-workers (docs/scaling.md)


def add_scaling_flags(p) -> None:
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


class _DedupParser:
    """Lets trainer kinds declare the same flag (e.g. --epochs) without argparse conflicts."""

    def __init__(self, parser, seen):
        self._parser, self._seen = parser, seen

    def add_argument_group(self, *args, **kwargs):
        return _DedupParser(self._parser.add_argument_group(*args, **kwargs), self._seen)

    def add_argument(self, *flags, **kwargs):
        if any(f in self._seen for f in flags):
            return None
        self._seen.update(flags)
        return self._parser.add_argument(*flags, **kwargs)

    def add_mutually_exclusive_group(self, **kwargs):
        return _DedupParser(self._parser.add_mutually_exclusive_group(**kwargs), self._seen)

    def __getattr__(self, name):
        return getattr(self._parser, name)


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


def check_image_run(spec, args) -> None:
    """Refuses flag combinations an image data set cannot run with (one line, nothing trained)."""
    from core.dataset import DatasetError

    if not spec.is_image:
        raise DatasetError(f"--model {args.model} is for image data sets; {spec.name} is tabular (drop --model, its "
                           "model is the MLP of --hidden-units)")
    if args.trainer != "dp_sgd":
        raise DatasetError(f"image data sets train with --trainer dp_sgd only (got --trainer {args.trainer}); "
                           "drop the flag")
    if args.audit_canaries:
        raise DatasetError("--audit-canaries is not supported for image data sets yet (its canaries are tabular "
                           "rows); drop the flag")


def image_run_options(args, trainer_args: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(trainer args, RunConfig fields): the model's published defaults (``dp_training.images.IMAGE_DEFAULTS``)
    replace the dp_sgd kind's tabular defaults for every flag not given on the command line."""
    from dp_training.images import DEFAULT_MODEL, image_trainer_args
    from dp_training.trainer import DEFAULTS

    model = getattr(args, "model", None) or DEFAULT_MODEL
    given = {k: v for k, v in trainer_args.items() if k not in DEFAULTS or v != DEFAULTS[k]}
    return image_trainer_args(model, given), {"image_model": model,
                                                   "min_accuracy": getattr(args, "min_accuracy", 0.5)}


def run_config(args):
    """The RunConfig of `privtrain run`'s (or `privtrain export`'s) flags; ValueError (one line) on a bad one."""
    from pipeline.config import RunConfig
    from pipeline.trainers import get_trainer, trainer_module

    scale = run_options(args)
    module = trainer_module(args.trainer)
    trainer_args = module.trainer_args(args) if hasattr(module, "trainer_args") else {}
    trainer_args.update(scale["trainer_args"])
    get_trainer(args.trainer).config(trainer_args)   # parsed and validated once: a bad flag is one line here
    image = {}
    if getattr(args, "data", None):
        from core.dataset import load_dataset

        if load_dataset(args.data).is_image:  # the model's published defaults under the flags given
            trainer_args, image = image_run_options(args, trainer_args)
    privacy = {"target_epsilon": args.target_epsilon, "delta": args.delta, "accountant": args.accountant,
               "preprocessing_epsilon": args.preprocessing_epsilon, "budget_epsilon": args.budget_epsilon,
               "ledger": getattr(args, "ledger", None), "audit_canaries": args.audit_canaries,
               "min_slice_size": args.min_slice_size, "new_source": getattr(args, "new_source", None)}
    config = RunConfig(data_dir=args.data, workdir=os.path.abspath(args.workdir), trainer=args.trainer,
                       trainer_args=trainer_args, model_name=args.model_name, min_auc=args.min_auc,
                       max_auc_drop=args.max_auc_drop, enable_cache=not args.no_cache,
                       allow_non_private=args.allow_non_private, privacy=privacy,
                       validate_only=args.validate_only, beam_args=scale["beam_args"], **image,
                       **({"hidden_units": tuple(args.hidden_units)} if args.hidden_units else {}))
    return config


def run(args) -> int:
    from core.dataset import DatasetError, load_dataset

    try:
        spec = load_dataset(args.data)
    except DatasetError as e:
        print(f"privtrain: {e}", file=sys.stderr)
        return 2
    # An identical re-run answers from the last run's record (it passed the data gate on the same content).
    from dp_training.ledger import LedgerError

    try:
        replayed, digest = _identical_run(args, spec)
    except (LedgerError, ValueError) as e:   # the ledger contradicts this workdir's receipts (or cannot be read)
        print(f"privtrain: {e}", file=sys.stderr)
        return 2
    if replayed is not None:
        return 0
    from dp_training.ledger import LedgerError
    from pipeline.data_gate import check_raw_data

    try:  # damaged files: one line naming file, line and problem, in a second, before TFX is even imported
        if spec.is_image or args.model:
            check_image_run(spec, args)
        check_raw_data(spec)
    except DatasetError as e:
        print(f"privtrain: {e}", file=sys.stderr)
        return 2
    from pipeline.runner import PipelineRunError, format_summary, run_pipeline

    try:
        config = run_config(args)
    except ValueError as e:
        print(f"privtrain: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_pipeline(config)
    except (DatasetError, LedgerError, ValueError) as e:
        print(f"privtrain: {e}", file=sys.stderr)
        return 2
    except PipelineRunError as e:
        if isinstance(e.cause, (LedgerError, DatasetError)) or is_refusal(e.cause):
            print(f"privtrain: {e.cause}", file=sys.stderr)   # refused by the privacy layer: nothing trained
            return 2
        print(json.dumps(e.summary.to_json(), indent=1) if args.json else format_summary(e.summary))
        print(f"\nprivtrain: the run failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary.to_json(), indent=1) if args.json else format_summary(summary))
    if digest is not None:
        from pipeline import run_memo

        run_memo.record(config.workdir, config.metadata_path, digest, summary.to_json(), format_summary(summary))
    return 0


def _identical_run(args, spec):
    """(the last run's record, when this run is identical to it; the run's fingerprint, None with --no-cache or
    --validate-only). An identical re-run prints the recorded summary without starting TFX
    (pipeline/run_memo.py)."""
    if args.no_cache or args.validate_only:
        return None, None
    from pipeline import run_memo
    from pipeline.config import RunConfig

    workdir = os.path.abspath(args.workdir)
    metadata_path = RunConfig(workdir=workdir).metadata_path
    digest = run_memo.fingerprint(vars(args), spec)
    doc = run_memo.identical_run(workdir, metadata_path, digest)
    if doc is None:
        run_memo.forget(workdir)   # this run changes the store: the old record no longer describes its head
        return None, digest
    # Nothing is charged, but every run checks the ledger against this workdir's receipts (docs/ledger.md): a
    # ledger that contradicts them is refused here too (the caller prints the error; nothing is replayed).
    from dp_training.ledger import Ledger, resolve_ledger_path
    from pipeline.receipts import workdir_anchors

    Ledger(resolve_ledger_path(getattr(args, "ledger", None))).verify(workdir_anchors([workdir]))
    print(run_memo.replay_note(doc), file=sys.stderr)
    print(json.dumps(doc["summary"], indent=1) if args.json else doc["text"])
    return doc, digest
