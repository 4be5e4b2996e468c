"""``privtrain privacy report``: every trained model with its guarantee, metrics, blessing and push (ML Metadata)."""
from __future__ import annotations

import os
import sys

from privtrain_cli.common import workdir_flag


def add_parser(sub) -> None:
    privacy = sub.add_parser("privacy", help="privacy facts recorded in ML Metadata")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True)
    p = privacy_sub.add_parser("report", help="every trained model with its guarantee, metrics, blessing, push")
    workdir_flag(p)
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from pipeline.config import RunConfig
    from pipeline.report import report

    try:
        print(report(RunConfig(workdir=os.path.abspath(args.workdir)).metadata_path, as_json=args.json))
    except FileNotFoundError as e:
        print(f"privtrain privacy report: {e}", file=sys.stderr)
        return 2
    return 0
