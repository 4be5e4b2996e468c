"""``privtrain report``: the audit report of a pushed model version (pipeline/audit_report.py, docs/reports.md)."""
from __future__ import annotations

import json
import os
import sys

from privtrain_cli.common import workdir_flag


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="audit report of a pushed model version (HTML page, JSON or text)",
                       description="The audit report of one pushed model version for a reviewer: privacy guarantee, "
                                   "ledger state of the data source, empirical audit, evaluation per slice, blessing "
                                   "decision, lineage and serving versions (docs/reports.md). The same report.html "
                                   "and report.json are written beside every pushed version.")
    workdir_flag(p)
    p.add_argument("--model-name", default=None, help="pushed model name (default: the only one)")
    p.add_argument("--version", default=None, help="pushed version (default: the latest)")
    p.add_argument("--html", default=None, metavar="FILE", help="write the self-contained HTML page to FILE")
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: a text summary)")


def run(args) -> int:
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
