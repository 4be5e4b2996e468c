"""Benchmark: the full pipeline's wall time under Beam's in-process direct runner (the default) against the
direct runner's multi-processing mode, side by side in one run (fresh workdir each, nothing cached).

Default settings are ``make run``'s (full Adult, the dp_sgd trainer with its defaults); the budget is charged
to a throw-away ledger. Runs alternate between the modes (A B A B ... for --repeats > 1).

  python simulations/bench_beam.py [--output DIR] [--trainer dp_sgd] [--workers 2] [--repeats 1]
                                  [--multi-processing-first]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import DEFAULT_DATA_DIR, RunConfig  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="bench-results")
    parser.add_argument("--trainer", default="dp_sgd")
    parser.add_argument("--data", default=DEFAULT_DATA_DIR)
    parser.add_argument("--workers", type=int, default=2, help="direct_num_workers of the multi-processing mode")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--multi-processing-first", action="store_true",
                        help="run the multi-processing mode first in each pair (to see the effect of the order)")
    args = parser.parse_args(argv)
    modes = {"in_memory": (),
             "multi_processing": ("--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}")}
    if args.multi_processing_first:
        modes = dict(reversed(list(modes.items())))
    scratch = tempfile.mkdtemp(prefix="privtrain-bench-beam-")
    os.environ["PRIVTRAIN_LEDGER"] = os.path.join(scratch, "ledger.sqlite")  # never the user's ledger
    from pipeline.runner import run_pipeline

    runs = []
    try:
        for repeat in range(args.repeats):
            for mode, beam_args in modes.items():
                workdir = os.path.join(scratch, f"{mode}-{repeat}")
                config = RunConfig(data_dir=args.data, workdir=workdir, trainer=args.trainer,
                                   allow_non_private=True, beam_args=beam_args, enable_cache=False)
                summary = run_pipeline(config)
                runs.append({"mode": mode, "beam_args": list(beam_args), "seconds": round(summary.wall_seconds, 1),
                             "components": {c.node_id: round(c.seconds, 1) for c in summary.components}})
                print(json.dumps(runs[-1]), flush=True)
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mean = {m: sum(r["seconds"] for r in runs if r["mode"] == m) / args.repeats for m in modes}
    result = {"trainer": args.trainer, "data": args.data, "repeats": args.repeats, "runs": runs,
              "mean_seconds": {m: round(v, 1) for m, v in mean.items()},
              "multi_processing_over_in_memory": round(mean["multi_processing"] / mean["in_memory"], 3),
              "note": "wall times are operational figures of a run on private data: not covered by any guarantee"}
    os.makedirs(args.output, exist_ok=True)
    name = "beam_runner_mp_first.json" if args.multi_processing_first else "beam_runner.json"
    with open(os.path.join(args.output, name), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
