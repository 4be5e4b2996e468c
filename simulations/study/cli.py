"""``privtrain study``: the command-line form of :class:`simulations.Study` (privtrain_cli/study.py delegates here)."""
from __future__ import annotations

import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("study", allow_abbrev=False, help="privacy–utility study: trainers × epsilons × replicates, tables, plots, HTML",
                       description="Run a grid of trainers x target epsilons x replicates (x partitions for federated) "
                                   "as real pipeline runs that share the upstream components, and write results.csv/"
                                   "json, aggregate.csv, PNG plots and report.html (docs/studies.md).")
    p.add_argument("--config", default=None, metavar="FILE", help="a TOML study file (simulations/studies/*.toml)")
    p.add_argument("--data", default=None, help="data directory with dataset.json (default: Adult)")
    p.add_argument("--output", default=None, help="where tables, plots and report.html go (they leave the trust "
                                                  "boundary: docs/privacy_model.md)")
    p.add_argument("--workdir", default=None, help="private work directory (default ./privtrain-work/study-NAME)")
    p.add_argument("--name", default=None, help="the study's name (default: 'study', or the study file's)")
    p.add_argument("--trainers", default="dp_sgd", help="comma list of trainer kinds (default dp_sgd)")
    p.add_argument("--epsilons", default="1,3", help="comma list of target epsilons for private kinds (default 1,3)")
    p.add_argument("--seeds", default=3, help="replicates per point (default 3; private runs draw fresh randomness, non-private "
                                          "runs use fixed seeds and repeat)")
    p.add_argument("--partitions", default=None, help="federated partitions, comma list (e.g. hash,"
                                                      "hash-dirichlet:0.1; default hash)")
    p.add_argument("--delta", default=None, help="delta of every guarantee (default 1/(10 N), N the public size)")
    p.add_argument("--jobs", default=None, help="points run in parallel processes (default 1)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every trainer that has it, or TRAINER.KEY=VALUE (e.g. dp_sgd.epochs=20, "
                        "hidden_units=16, audit_canaries=1000); repeatable")
    p.add_argument("--allow-non-private", action="store_true",
                   help="allow non-private points on a data set that has a privacy budget")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study in --output")


def run(args) -> int:
    from dp_training.ledger import LedgerError
    from simulations.study import StudyError
    from simulations.study.report import public_command
    from simulations.study.runner import StudyInterrupted

    if getattr(args, "ledger", None):
        os.environ["PRIVTRAIN_LEDGER"] = os.path.abspath(args.ledger)
    command = public_command(["privtrain"] + sys.argv[1:])
    try:
        from simulations.study.runner import StudyRunner
        from simulations.study.spec import from_options, from_toml

        if args.config is not None:
            if args.settings:
                raise StudyError("--set: with --config, put settings in the study file ([[arm]] tables or [set])")
            spec = from_toml(args.config, output=args.output, workdir=args.workdir,
                             jobs=args.jobs, command=command, data=args.data)
        else:
            if args.output is None:
                raise StudyError("output: missing; pass --output DIR (tables, plots and report.html are written "
                                 "there)")
            spec = from_options(args.data, args.output, trainers=args.trainers, epsilons=args.epsilons,
                                seeds=args.seeds, partitions=args.partitions, delta=args.delta, jobs=args.jobs or 1,
                                settings=args.settings, workdir=args.workdir, name=args.name,
                                allow_non_private=args.allow_non_private, command=command)
        StudyRunner(spec, resume=args.resume).run()
    except StudyError as e:
        print(f"privtrain study: {e}. Nothing was run.", file=sys.stderr)
        return 2
    except LedgerError as e:
        print(f"privtrain study: refused for the whole study: {e}", file=sys.stderr)
        return 2
    except StudyInterrupted:
        return 130
    return 0
