"""``privtrain budget``: the privacy budget ledger (dp_training/ledger/): show, verify, set a budget."""
from __future__ import annotations

import json
import os
import sys


def add_parser(sub) -> None:
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
    b.add_argument("--workdir", dest="receipt_workdirs", action="append", default=[], metavar="DIR",
                   help="with verify: check every receipt recorded under this workdir (its ML Metadata store and "
                        "privacy.json files); repeatable")


def _budget_source(args):
    """--source, or the source id that --data's dataset.json declares (None when neither is given)."""
    if args.source is not None:
        return args.source, {}
    if args.data is None:
        return None, {}
    from core.dataset import DESCRIPTION_FILE, DatasetError, load_dataset

    spec = load_dataset(args.data)
    path = os.path.join(spec.directory, DESCRIPTION_FILE)
    with open(path) as f:
        privacy = json.load(f).get("privacy") or {}
    source = getattr(spec, "source_id", None) or (privacy.get("source_id") if isinstance(privacy, dict) else None)
    if not source:
        raise DatasetError(f"{path} declares no data source id; add \"privacy\": {{\"source_id\": \"<name>\"}} "
                           "to it, or pass --source ID")
    return source, privacy if isinstance(privacy, dict) else {}


def run(args) -> int:
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
                anchors.append((int(seq), digest, "on the command line"))
            from pipeline.receipts import workdir_anchors

            for w in args.receipt_workdirs:
                if not os.path.isdir(w):
                    raise ValueError(f"--workdir {w} is not a directory; pass the --workdir of an earlier run")
            anchors += workdir_anchors(args.receipt_workdirs)
            result = ledger.verify(anchors)
            spends = [ledger.spend(s) for s in ledger.sources()]  # recomputed from the events
            if args.json:
                print(json.dumps({"ok": True, "path": result.path, "entries": result.entries,
                                  "head_seq": result.head_seq, "head_hash": result.head_hash,
                                  "receipts_checked": len(anchors),
                                  "sources": {s.source_id: ("inf" if s.epsilon == float("inf") else s.epsilon)
                                              for s in spends}}))
            else:
                print(f"ledger OK: {result.entries} entries, head {result.head_hash} ({result.path}); "
                      f"{len(anchors)} receipt(s) checked")
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
