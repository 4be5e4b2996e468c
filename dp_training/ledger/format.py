"""The ledger's views: ``history`` (one JSON-able dict per source) and ``format_budget`` (``privtrain budget``'s
text or JSON). Reads a verified ``dp_training.ledger.Ledger``; computes no spend of its own."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional

from dp_training import events as ev
from dp_training.ledger.store import _Source


def fmt_num(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def json_num(x: Optional[float]):
    if x is None:
        return None
    return "inf" if math.isinf(x) else x


def history(ledger, source_id: Optional[str] = None) -> List[Dict[str, Any]]:
    """One JSON-able dict per source: relation, budget (and earlier budgets), spend, runs."""
    state = ledger._state()
    ids = sorted(state.sources) if source_id is None else [source_id]
    out = []
    for sid in ids:
        src = state.sources.get(sid) or _Source(sid)
        spend = ledger._spend_of(sid, src.runs, src.budget, src.relation, None, None)
        runs = []
        for r in src.runs:
            p, f = r.payload, r.finish
            runs.append({
                "seq": r.seq, "run_id": p["run_id"], "label": p.get("label"), "trainer": p["trainer"],
                "private": bool(p["private"]) and r.private, "accountant": p["accountant"],
                "delta": p["delta"], "started": p["time"],
                "status": f["status"] if f else "open", "finished": f["time"] if f else None,
                "finish_seq": r.finish_seq, "planned_event": p["event"], "new_source": p.get("new_source"),
                "released_event": f["event"] if f else None,
                "charged": ev.describe(r.charged),
                "epsilon": json_num(ledger._epsilon(r.charged, float(p["delta"]), p["accountant"], spend.relation)),
            })
        b = src.budget
        out.append({
            "source_id": sid, "relation": src.relation,
            "budget": None if b is None else {"epsilon": b.epsilon, "delta": b.delta,
                                              "accountant": b.accountant, "seq": b.seq},
            "budget_changes": len(src.budgets),
            "spent": {"epsilon": json_num(spend.epsilon), "delta": spend.delta,
                      "accountant": spend.accountant, "relation": spend.relation,
                      "composition": "adaptive composition: per run, its released event if finished, "
                                     "else its planned event",
                      "remaining": json_num(spend.remaining),
                      "naive_epsilon_sum": json_num(spend.naive_epsilon_sum),
                      "naive_delta_sum": spend.naive_delta_sum,
                      "runs": spend.runs, "open_runs": spend.open_runs,
                      "non_private_runs": spend.non_private_runs},
            "runs": runs,
        })
    return out


def format_budget(ledger=None, source_id: Optional[str] = None, as_json: bool = False,
                  path: Optional[str] = None) -> str:
    """Renders the ledger for ``privtrain budget [--source ID] [--json]`` (verifies it first)."""
    if ledger is None:
        from dp_training.ledger.policy import Ledger

        ledger = Ledger(path)
    hist = ledger.history(source_id)
    if as_json:
        return json.dumps(hist, indent=2, sort_keys=True)
    if not hist:
        return f"No sources in the privacy ledger {ledger.path} yet (the first run records one).\n"
    lines: List[str] = [f"Privacy ledger {ledger.path}", ""]
    for ds in hist:
        b, s = ds["budget"], ds["spent"]
        lines.append(f"Source {ds['source_id']}" + (f" ({ds['relation']})" if ds["relation"] else ""))
        if b:
            changed = f", changed {ds['budget_changes'] - 1} time(s)" if ds["budget_changes"] > 1 else ""
            lines.append(f"  budget:    epsilon={fmt_num(b['epsilon'])}  delta={b['delta']:g}  "
                         f"accountant={b['accountant']}  (entry {b['seq']}{changed})")
        else:
            lines.append("  budget:    none set")
        spent = math.inf if s["epsilon"] == "inf" else s["epsilon"]
        rem = math.inf if s["remaining"] == "inf" else s["remaining"]
        lines.append(f"  spent:     epsilon={fmt_num(spent)} at delta={s['delta']:g} (composed, {s['accountant']})"
                     + (f"  remaining={fmt_num(rem)}" if b else ""))
        naive = math.inf if s["naive_epsilon_sum"] == "inf" else s["naive_epsilon_sum"]
        lines.append(f"  naive sum: epsilon={fmt_num(naive)}  delta={s['naive_delta_sum']:g} (reference only)")
        header = ("entry", "run_id", "trainer", "started", "status", "epsilon", "delta", "charged")
        rows = [header]
        for r in ds["runs"]:
            eps = math.inf if r["epsilon"] == "inf" else r["epsilon"]
            status = r["status"] + ("*" if r["status"] == "open" else "")
            rows.append((str(r["seq"]), r["run_id"], r["trainer"], r["started"], status, fmt_num(eps),
                         fmt_num(r["delta"]), r["charged"]))
        if len(rows) > 1:
            widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
            for i, row in enumerate(rows):
                lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
                if i == 0:
                    lines.append("  " + "  ".join("-" * w for w in widths))
            if any(r["status"] == "open" for r in ds["runs"]):
                lines.append("  * open: running, or died without a record; charged its planned event")
        else:
            lines.append("  no runs recorded")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["history", "format_budget", "fmt_num", "json_num"]
