"""The command table and the entry point (``./privtrain``, ``python -m privtrain_cli``)."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

# name -> (module under privtrain_cli, one-line help). The module defines ``add_parser(sub)`` (which adds the
# command's sub-parser with its flags) and ``run(args) -> int``.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "run": ("run", "run the pipeline: ingestion to a pushed model"),
    "serve": ("serve", "serve pushed models over TF Serving's REST and gRPC APIs"),
    "privacy": ("privacy", "privacy facts recorded in ML Metadata"),
    "budget": ("budget", "the privacy budget ledger: budget, spend and runs per data source; verify"),
    "report": ("report", "audit report of a pushed model version (HTML page, JSON or text)"),
    "predict": ("predict", "predict raw rows with the newest pushed model (plain or encrypted)"),
    "encrypted-party": ("party", "run one TF-Encrypted party of the encrypted service (started by serve)"),
    "simulate": ("simulate", "simulations that run without the pipeline"),
    "export": ("export", "compile the pipeline for another orchestrator (Kubeflow Pipelines v2, Airflow)"),
    "federated-worker": ("worker", "serve one TFF worker (for simulate/run --workers HOST:PORT) until Ctrl-C"),
    "study": ("study", "privacy-utility study: trainers x epsilons x replicates, tables, plots, HTML"),
}
LEDGER_HELP = ("privacy budget ledger shared by all workdirs (default: $PRIVTRAIN_LEDGER, else "
               "$XDG_DATA_HOME/privtrain/ledger.sqlite, else ~/.local/share/privtrain/ledger.sqlite)")


def command_module(name: str):
    return importlib.import_module(f"privtrain_cli.{COMMANDS[name][0]}")


def _selected(argv: List[str]) -> Optional[str]:
    """The command named on the command line (the first word that is one), skipping ``--ledger PATH``."""
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word == "--ledger":
            skip = True
            continue
        if word.startswith("-"):
            continue
        return word if word in COMMANDS else None
    return None


def build_parser(argv: Optional[List[str]] = None, full: bool = False) -> argparse.ArgumentParser:
    """The parser: every command is listed, but only the selected one (all of them with ``full``) gets its
    flags, so that parsing one command imports only that command's module."""
    selected = _selected(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="privtrain", description="Privacy-preserving training platform.")
    parser.add_argument("--ledger", default=None, metavar="PATH", help=LEDGER_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        if full or name == selected:
            command_module(name).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from core.private_files import private_umask

    private_umask()  # workdirs, serving directories and every file written: owner only (0700 / 0600)
    if _selected(argv) == "serve":
        # Before anything imports TensorFlow (the serve parser does): the server's memory figures need
        # TensorFlow's oneDNN allocator off, as `python -m serving.server` has it (docs/serving.md).
        from serving.server import prefer_returning_allocator

        prefer_returning_allocator(lambda m: None)
    args = build_parser(argv).parse_args(argv)
    from pipeline.quiet import quiet_libraries

    quiet_libraries()
    return command_module(args.command).run(args)


if __name__ == "__main__":
    sys.exit(main())
