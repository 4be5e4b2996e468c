"""Benchmark: the full-Adult privacy–utility study (privtrain study) — dp_sgd at target epsilons 0.5, 1, 2, 4, 8
and the non-private standard baseline, 3 replicates each — with its wall time (the upstream components run once)
and the table of mean accuracy ± 95% interval per epsilon. A ledger of its own under the output (the user's
real ledger is never charged); the study's outputs go to OUTPUT/study-adult, its workdir to a temp directory.

  python simulations/bench_study.py [--output bench-results] [--epsilons 0.5,1,2,4,8] [--seeds 3] [--jobs 1]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import DEFAULT_DATA_DIR  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="bench-results")
    parser.add_argument("--data", default=DEFAULT_DATA_DIR)
    parser.add_argument("--epsilons", default="0.5,1,2,4,8")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    out = os.path.join(os.path.abspath(args.output), "study-adult")
    shutil.rmtree(out, ignore_errors=True)
    ledger = os.path.join(os.path.abspath(args.output), "study-ledger.sqlite")
    if os.path.exists(ledger):
        os.remove(ledger)
    os.environ["PRIVTRAIN_LEDGER"] = ledger
    from pipeline.quiet import quiet_libraries

    quiet_libraries()
    workdir = tempfile.mkdtemp(prefix="privtrain-bench-study-")
    from simulations.study.spec import from_options
    from simulations.study.runner import StudyRunner

    spec = from_options(args.data, out, trainers="dp_sgd,standard", epsilons=args.epsilons, seeds=args.seeds,
                        jobs=args.jobs, settings=args.settings, workdir=workdir, name="bench", allow_non_private=True,
                        command="python simulations/bench_study.py " + " ".join(argv or sys.argv[1:]))
    load_before = os.getloadavg()
    started = time.time()
    try:
        result = StudyRunner(spec).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.time() - started
    load_after = os.getloadavg()
    load = (f"load average (1/5/15 min) at the start {' '.join(f'{x:.2f}' for x in load_before)}, at the end "
            f"{' '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} cores")
    lines = [f"full-Adult study: {len(result.rows)} runs in {wall / 60:.1f} min (jobs {args.jobs}; wall time is "
             "operational, not covered by any guarantee)", load, result.statement, "",
             f"{'arm':<10} {'target eps':>10} {'achieved eps':>13} {'accuracy (mean ± 95% CI)':>26} {'AUC':>18} {'n':>3}"]
    for a in result.aggregate:
        target = "-" if a["target_epsilon"] is None else f"{a['target_epsilon']:g}"
        eps = a.get("epsilon_mean")
        eps_text = "inf" if eps is None or math.isinf(eps) else f"{eps:.3f}"
        acc = f"{a['accuracy_mean']:.4f} ± {a['accuracy_ci95'] or 0:.4f}"
        auc = f"{a['auc_mean']:.4f} ± {a['auc_ci95'] or 0:.4f}"
        lines.append(f"{a['arm']:<10} {target:>10} {eps_text:>13} {acc:>26} {auc:>18} {a['accuracy_n']:>3}")
    print("\n".join(lines))
    with open(os.path.join(args.output, "study.json"), "w") as f:
        json.dump({"wall_seconds": round(wall, 1), "jobs": args.jobs, "runs": len(result.rows),
                   "load_average_start": load_before, "load_average_end": load_after,
                   "point_seconds": {r["point"]: r.get("wall_seconds") for r in result.rows},
                   "statement": result.statement,
                   "aggregate": [{k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in a.items()}
                                 for a in result.aggregate]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
