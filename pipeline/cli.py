"""``privtrain`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.config import DEFAULT_DATA_DIR, RunConfig
from pipeline.trainers import TRAINER_KINDS, trainer_module


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="run the pipeline: ingestion to a pushed model",
                       description="Run the TFX pipeline on a data set, from ingestion to a pushed model.")
    _add_run_flags(p)


def _add_run_flags(p) -> None:
    """The run's flags (`privtrain run`, and `privtrain export`, which compiles the same run)."""
    p.add_argument("--trainer", choices=sorted(TRAINER_KINDS), default="dp_sgd",
                   help="trainer kind (default dp_sgd: DP-SGD calibrated to epsilon 3)")
    p.add_argument("--data", default=DEFAULT_DATA_DIR, help="data directory with dataset.json (default: Adult)")
    p.add_argument("--workdir", default=os.path.join(os.getcwd(), "privtrain-work"),
                   help="work directory: pipeline outputs, ML Metadata store, serving dir (default ./privtrain-work)")
    p.add_argument("--model-name", default=None, help="serving name (default: the data set's name)")
    p.add_argument("--min-auc", type=float, default=0.80, help="absolute AUC a model must exceed to be blessed")
    p.add_argument("--max-auc-drop", type=float, default=0.0,
                   help="allowed AUC drop against the latest blessed model of the same trainer kind")
    p.add_argument("--model", default=None, choices=["scatternet_linear", "scatternet_cnn", "cnn"],
                   help="image data sets: the model (default scatternet_linear; docs/image_data.md)")
    p.add_argument("--min-accuracy", type=float, default=0.5,
                   help="image data sets: overall accuracy a model must exceed to be blessed (default 0.5)")
    p.add_argument("--allow-non-private", action="store_true",
                   help="allow a non-private trainer on a data set that has a privacy budget")
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
                   help="hidden layer widths of the MLP (default 64 64; at epsilon 1 one layer of 32 did better on "
                        "Adult's validation split, docs/dp_training.md)")
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
    seen = {"--epochs", "--batch-size", "--learning-rate", "--target-epsilon", "--delta", "--accountant",
            "--preprocessing-epsilon", "--budget-epsilon", "--audit-canaries", "--min-slice-size"}
    for kind in TRAINER_KINDS:
        try:
            module = trainer_module(kind)
        except ImportError:
            continue
        if hasattr(module, "add_arguments"):
            module.add_arguments(_DedupParser(p, seen))
    from pipeline.scale_cli import add_run_flags

    add_run_flags(p)  # --beam-arg, --tf-config, --train-workers (docs/scaling.md)


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


def _run_config(args) -> RunConfig:
    """The RunConfig of `privtrain run`'s (or `privtrain export`'s) flags; ValueError (one line) on a bad one."""
    from pipeline.scale_cli import run_options

    scale = run_options(args)
    module = trainer_module(args.trainer)
    trainer_args = module.trainer_args(args) if hasattr(module, "trainer_args") else {}
    trainer_args.update(scale["trainer_args"])
    image = {}
    if getattr(args, "data", None):
        from dp_training.dataset import load_dataset

        if load_dataset(args.data).is_image:  # the model's published defaults under the flags given
            from pipeline.image_pipeline_cli import image_run_options
            trainer_args, image = image_run_options(args, trainer_args)
    privacy = {"target_epsilon": args.target_epsilon, "delta": args.delta, "accountant": args.accountant,
               "preprocessing_epsilon": args.preprocessing_epsilon, "budget_epsilon": args.budget_epsilon,
               "ledger": getattr(args, "ledger", None), "audit_canaries": args.audit_canaries,
               "min_slice_size": args.min_slice_size}
    config = RunConfig(data_dir=args.data, workdir=os.path.abspath(args.workdir), trainer=args.trainer,
                       trainer_args=trainer_args, model_name=args.model_name, min_auc=args.min_auc,
                       max_auc_drop=args.max_auc_drop, enable_cache=not args.no_cache,
                       allow_non_private=args.allow_non_private, privacy=privacy,
                       validate_only=args.validate_only, beam_args=scale["beam_args"], **image,
                       **({"hidden_units": tuple(args.hidden_units)} if args.hidden_units else {}))
    return config


def _cmd_run(args) -> int:
    from dp_training.ledger import LedgerError
    from dp_training.dataset import DatasetError, load_dataset
    from pipeline.data_gate import check_raw_data

    try:  # damaged files: one line naming file, line and problem, in a second, before TFX is even imported
        spec = load_dataset(args.data)
        if spec.is_image or args.model:
            from pipeline.image_pipeline_cli import check_image_run
            check_image_run(spec, args)
        check_raw_data(spec)
    except DatasetError as e:
        print(f"privtrain: {e}", file=sys.stderr)
        return 2
    from pipeline.runner import PipelineRunError, format_summary, run_pipeline

    try:
        config = _run_config(args)
    except ValueError as e:
        print(f"privtrain: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_pipeline(config)
    except (DatasetError, LedgerError, ValueError) as e:
        print(f"privtrain: {e}", file=sys.stderr)
        return 2
    except PipelineRunError as e:
        if isinstance(e.cause, (LedgerError, DatasetError)) or type(e.cause).__name__ in (
                "PlanError", "UnsupportedRelationError", "CalibrationError"):
            print(f"privtrain: {e.cause}", file=sys.stderr)   # refused by the privacy layer: nothing trained
            return 2
        print(json.dumps(e.summary.to_json(), indent=1) if args.json else format_summary(e.summary))
        print(f"\nprivtrain: the run failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary.to_json(), indent=1) if args.json else format_summary(summary))
    return 0


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve pushed models over TF Serving's REST and gRPC APIs",
                       description="Serve the models pushed under <workdir>/serving with TF Serving's APIs "
                                   "(the built-in server; see docs/serving.md).")
    p.add_argument("--workdir", default=os.path.join(os.getcwd(), "privtrain-work"))
    p.add_argument("--rest-port", type=int, default=8501, help="0 picks a free port")
    p.add_argument("--grpc-port", type=int, default=8500, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--backend", default="auto", choices=["auto", "builtin", "tfserving"])
    p.add_argument("--enable-batching", action="store_true", help="merge concurrent predict requests")
    from serving.server import add_serve_flags

    add_serve_flags(p)  # TLS, bearer-token auth, request limits (docs/serving.md)
    from encrypted_serving.cli import add_serve_flags as add_encrypted_flags

    add_encrypted_flags(p)  # --encrypted, --encrypted-output, --isolation (docs/encrypted_serving.md)


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict raw rows with the newest pushed model (plain or encrypted)")
    _workdir_flag(p)
    p.add_argument("--input", required=True, help="file of raw rows in the data set's format (label optional)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--model-name", default=None, help="pushed model name (default: the only one)")
    from encrypted_serving.cli import add_predict_flags

    add_predict_flags(p)  # --encrypted, --client, --timeout
    p.add_argument("--json", action="store_true")


def _cmd_predict(args) -> int:
    from dp_training.dataset import DatasetError
    from encrypted_serving.preprocessing import PreprocessingError
    from pipeline.predict import (PredictError, check_input_file, format_predictions, latest_pushed_model,
                                  predict_plain)

    workdir = os.path.abspath(args.workdir)
    try:
        check_input_file(args.input, args.limit)
        version_dir = latest_pushed_model(RunConfig(workdir=workdir).serving_dir, args.model_name)
        if args.encrypted:
            from encrypted_serving import cli as encrypted_cli
            from encrypted_serving.service import EncryptedServiceError

            try:
                result = encrypted_cli.predict(args, workdir, version_dir)
            except EncryptedServiceError as e:
                raise PredictError(str(e)) from e
        else:
            result = predict_plain(version_dir, args.input, args.limit)
    except (PredictError, FileNotFoundError, DatasetError, PreprocessingError) as e:
        print(f"privtrain predict: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_predictions(result))
    return 0


def _cmd_serve(args) -> int:
    from pipeline.config import RunConfig
    from serving.errors import ServingConfigError
    from serving.server import server_from_args

    workdir = os.path.abspath(args.workdir)
    serving_dir = RunConfig(workdir=workdir).serving_dir
    encrypted = None
    try:
        server = server_from_args(args, serving_dir)
        server.start()
    except ServingConfigError as e:  # bad flag, file, port or address: one line
        print(f"privtrain serve: {e}", file=sys.stderr)
        return 2
    try:
        if args.encrypted:
            from encrypted_serving.cli import start_for_serve

            encrypted = start_for_serve(args, workdir)
            if encrypted is None:
                return 2
        return server.serve_forever(  # READY once SIGTERM is handled (drain)
            on_ready=lambda: print(f"READY rest={server.rest_port} grpc={server.grpc_port}", flush=True))
    finally:
        server.stop()
        if encrypted is not None:
            encrypted.stop()


def _workdir_flag(p) -> None:
    p.add_argument("--workdir", default=os.path.join(os.getcwd(), "privtrain-work"),
                   help="work directory of earlier runs (default ./privtrain-work)")


def _add_privacy_parsers(sub) -> None:
    privacy = sub.add_parser("privacy", help="privacy facts recorded in ML Metadata")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True)
    p = privacy_sub.add_parser("report", help="every trained model with its guarantee, metrics, blessing, push")
    _workdir_flag(p)
    p.add_argument("--json", action="store_true")
    b = sub.add_parser("budget", help="the privacy budget ledger: budget, spend and runs per data source; verify",
                       description="Show the shared privacy budget ledger (budget, composed spend, runs per "
                                   "source), verify its hash chain (privtrain budget verify), or set / raise a "
                                   "source's budget explicitly (--set-epsilon).")
    b.add_argument("action", nargs="?", choices=["show", "verify"], default="show",
                   help="show (default) or verify: recompute the hash chain and every source's spend")
    b.add_argument("--ledger", dest="budget_ledger", default=None, metavar="PATH",
                   help="ledger file (default: $PRIVTRAIN_LEDGER, else $XDG_DATA_HOME/privtrain/ledger.sqlite, "
                        "else ~/.local/share/privtrain/ledger.sqlite)")
    which = b.add_mutually_exclusive_group()
    which.add_argument("--source", default=None, metavar="ID", help="the data source id")
    which.add_argument("--data", default=None, metavar="DIR",
                       help="data directory whose dataset.json declares \"privacy\": {\"source_id\": ...}")
    b.add_argument("--json", action="store_true")
    b.add_argument("--set-epsilon", type=float, default=None, metavar="E",
                   help="set (or change) the source's total budget; needs --source or --data")
    b.add_argument("--delta", type=float, default=None,
                   help="with --set-epsilon: the budget's delta (default: the current budget's)")
    b.add_argument("--accountant", default=None, help="with --set-epsilon: pld or rdp (default: the current "
                                                      "budget's, else pld)")
    b.add_argument("--relation", default=None, choices=["add_or_remove_one", "replace_one"],
                   help="with --set-epsilon on a new source: its neighbouring relation (default: the one fixed "
                        "by the source's first entry, else the one dataset.json declares)")
    b.add_argument("--anchor", action="append", default=[], metavar="SEQ:HASH",
                   help="with verify: a receipt recorded elsewhere (privacy.json, ML Metadata); repeatable")


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="audit report of a pushed model version (HTML page, JSON or text)",
                       description="The audit report of one pushed model version for a reviewer: privacy guarantee, "
                                   "ledger state of the data source, empirical audit, evaluation per slice, blessing "
                                   "decision, lineage and serving versions (docs/reports.md). The same report.html "
                                   "and report.json are written beside every pushed version.")
    _workdir_flag(p)
    p.add_argument("--model-name", default=None, help="pushed model name (default: the only one)")
    p.add_argument("--version", default=None, help="pushed version (default: the latest)")
    p.add_argument("--html", default=None, metavar="FILE", help="write the self-contained HTML page to FILE")
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: a text summary)")


def _cmd_report(args) -> int:
    from dp_training.ledger import LedgerError
    from pipeline.audit_report import ReportError, collect, format_text

    try:
        report = collect(os.path.abspath(args.workdir), args.model_name, args.version, getattr(args, "ledger", None))
        if args.html:
            from pipeline.report_html import render_html

            with open(args.html, "w") as f:
                f.write(render_html(report))
    except (ReportError, FileNotFoundError, LedgerError, OSError) as e:
        print(f"privtrain report: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1, sort_keys=True) if args.json else format_text(report))
    if args.html:
        print(f"HTML report: {os.path.abspath(args.html)}", file=sys.stderr)
    return 0


def _cmd_privacy(args) -> int:
    from pipeline.report import report

    try:
        print(report(RunConfig(workdir=os.path.abspath(args.workdir)).metadata_path, as_json=args.json))
    except FileNotFoundError as e:
        print(f"privtrain privacy report: {e}", file=sys.stderr)
        return 2
    return 0


def _budget_source(args):
    """--source, or the source id that --data's dataset.json declares (None when neither is given)."""
    if args.source is not None:
        return args.source, {}
    if args.data is None:
        return None, {}
    from dp_training.dataset import DESCRIPTION_FILE, DatasetError, load_dataset

    spec = load_dataset(args.data)
    path = os.path.join(spec.directory, DESCRIPTION_FILE)
    with open(path) as f:
        privacy = json.load(f).get("privacy") or {}
    source = getattr(spec, "source_id", None) or (privacy.get("source_id") if isinstance(privacy, dict) else None)
    if not source:
        raise DatasetError(f"{path} declares no data source id; add \"privacy\": {{\"source_id\": \"<name>\"}} "
                           "to it, or pass --source ID")
    return source, privacy if isinstance(privacy, dict) else {}


def _cmd_budget(args) -> int:
    from dp_training import ledger as ledger_mod

    try:
        ledger = ledger_mod.Ledger(args.budget_ledger or getattr(args, "ledger", None))
        source, privacy = _budget_source(args)
        if (args.source is not None and args.action == "show" and args.set_epsilon is None
                and source not in ledger.sources()):
            known = ", ".join(ledger.sources()) or "none yet"
            raise ValueError(f"no data source {source!r} in the ledger {ledger.path} (its sources: {known}); "
                             "check the id, or pass --data DIR to use the id its dataset.json declares (a source "
                             "appears with its first run or with --set-epsilon)")
        if args.action == "verify":
            anchors = []
            for a in args.anchor:
                seq, sep, digest = a.partition(":")
                if not (sep and seq.isdigit() and len(digest) == 64):
                    raise ValueError(f"--anchor {a!r} is not SEQ:HASH (an entry number and its 64-hex-digit "
                                     "hash, as privacy.json records them)")
                anchors.append((int(seq), digest))
            result = ledger.verify(anchors)
            spends = [ledger.spend(s) for s in ledger.sources()]  # recomputed from the events
            if args.json:
                print(json.dumps({"ok": True, "path": result.path, "entries": result.entries,
                                  "head_seq": result.head_seq, "head_hash": result.head_hash,
                                  "sources": {s.source_id: ("inf" if s.epsilon == float("inf") else s.epsilon)
                                              for s in spends}}))
            else:
                print(f"ledger OK: {result.entries} entries, head {result.head_hash} ({result.path})")
                for s in spends:
                    budget = f" of {s.budget_epsilon:.4g}" if s.budget_epsilon is not None else " (no budget)"
                    print(f"  {s.source_id}: spent epsilon {s.epsilon:.4g}{budget} at delta {s.delta:g}")
            return 0
        if args.set_epsilon is not None:
            if source is None:
                raise ValueError("--set-epsilon needs the source: pass --data DIR or --source ID")
            current = ledger.get_budget(source)
            delta = args.delta if args.delta is not None else (current.delta if current else privacy.get("delta"))
            if delta is None:
                raise ValueError(f"source {source!r} has no budget yet: pass --delta (e.g. 1e-5; below 1/n for "
                                 "n people in the data)")
            relation = (ledger.relation(source) or args.relation or privacy.get("relation"))
            if relation is None:
                raise ValueError(f"source {source!r} has no ledger entry yet: pass --relation replace_one or "
                                 "add_or_remove_one (the relation its runs are accounted under; it is fixed by "
                                 "the first entry)")
            if args.relation is not None and args.relation != relation:
                raise ledger_mod.RelationMismatchError(
                    f"source {source!r} is accounted under {relation} (fixed by its first ledger entry); "
                    f"--relation {args.relation} cannot change that: drop --relation")
            accountant = args.accountant or (current.accountant if current else "pld")
            ledger.set_budget(source, args.set_epsilon, delta, accountant, relation, replace=True)
        print(ledger_mod.format_budget(ledger, source, as_json=args.json), end="")
    except ledger_mod.LedgerTamperedError as e:
        print(f"privtrain budget: {e}", file=sys.stderr)
        return 1
    except (ledger_mod.LedgerError, ValueError, OSError) as e:
        print(f"privtrain budget: {e}", file=sys.stderr)
        return 2
    return 0


def _add_simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulations that run without the pipeline")
    kinds = p.add_subparsers(dest="simulation", required=True)
    federated = kinds.add_parser("federated", help="TFF federated averaging (optionally DP-FedAvg) over client "
                                                   "shards of a raw data set")
    from federated.cli import add_simulate_arguments

    add_simulate_arguments(federated)


def _cmd_simulate(args) -> int:
    from federated.cli import run_simulate

    try:
        return run_simulate(args)
    except ValueError as e:
        print(f"privtrain simulate federated: {e}", file=sys.stderr)
        return 2


def _add_federated_worker_parser(sub) -> None:
    from federated.workers import add_worker_arguments

    add_worker_arguments(sub.add_parser("federated-worker", help="serve one TFF worker (for simulate/run "
                                                                 "--workers HOST:PORT) until Ctrl-C"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privtrain", description="Privacy-preserving training platform.")
    parser.add_argument("--ledger", default=None, metavar="PATH",
                        help="privacy budget ledger shared by all workdirs (default: $PRIVTRAIN_LEDGER, else "
                             "$XDG_DATA_HOME/privtrain/ledger.sqlite, else ~/.local/share/privtrain/ledger.sqlite)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    _add_serve_parser(sub)
    _add_privacy_parsers(sub)
    _add_report_parser(sub)
    _add_predict_parser(sub)
    from encrypted_serving.cli import add_party_parser

    add_party_parser(sub)
    _add_simulate_parser(sub)
    from pipeline.scale_cli import add_export_parser

    add_export_parser(sub, _add_run_flags)  # privtrain export kubeflow|airflow (docs/scaling.md)
    _add_federated_worker_parser(sub)
    from simulations.study.cli import add_parser as add_study_parser

    add_study_parser(sub)   # privtrain study (simulations/study, docs/studies.md)
    return parser


COMMANDS = {"run": _cmd_run, "serve": _cmd_serve, "privacy": _cmd_privacy, "budget": _cmd_budget,
            "predict": _cmd_predict, "report": _cmd_report, "simulate": _cmd_simulate,
            "export": lambda args: __import__("pipeline.scale_cli").scale_cli.cmd_export(args, _run_config),
            "study": lambda args: __import__("simulations.study.cli").study.cli.run(args),
            "encrypted-party": lambda args: __import__("encrypted_serving.cli").cli.cmd_party(args),
            "federated-worker": lambda args: __import__("federated.workers").workers.run_worker(args)}


def _command_of(argv) -> str:
    """The sub-command in ``argv`` (skipping the global ``--ledger PATH``), before anything is parsed."""
    it = iter(argv)
    for a in it:
        if a == "--ledger":
            next(it, None)
        elif not a.startswith("-"):
            return a
    return ""


def main(argv=None) -> int:
    from pipeline.quiet import quiet_libraries

    if _command_of(sys.argv[1:] if argv is None else argv) == "serve":
        # Before anything imports TensorFlow (building the parser does): the server's memory figures
        # need TensorFlow's oneDNN allocator off, as `python -m serving.server` has it (docs/serving.md).
        from serving.server import prefer_returning_allocator

        prefer_returning_allocator(lambda m: None)
    quiet_libraries()
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
