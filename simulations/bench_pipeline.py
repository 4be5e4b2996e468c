"""Benchmark: the full-Adult pipeline's wall time cold and cached (same process, three runs), and the
standard model's test-split accuracy and AUC.

Run 2 reuses every component up to the Trainer, but its Evaluator compares the model with the baseline
that run 1 blessed (the same model), so Evaluator and Pusher run again; run 3 has the same inputs as run 2
and is fully cached.

  python simulations/bench_pipeline.py [--output DIR] [--trainer standard]
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
from pipeline.runner import run_pipeline  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="bench-results")
    parser.add_argument("--trainer", default="standard")
    parser.add_argument("--data", default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="privtrain-bench-")
    try:
        config = RunConfig(data_dir=args.data, workdir=workdir, trainer=args.trainer, allow_non_private=True)
        cold = run_pipeline(config)
        second = run_pipeline(config)
        cached = run_pipeline(config)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    overall = cold.metrics["Overall"]
    result = {
        "trainer": args.trainer,
        "cold_seconds": round(cold.wall_seconds, 1),
        "second_run_seconds": round(second.wall_seconds, 1),
        "second_over_cold": round(second.wall_seconds / cold.wall_seconds, 3),
        "cached_seconds": round(cached.wall_seconds, 1),
        "cached_over_cold": round(cached.wall_seconds / cold.wall_seconds, 3),
        "cold_components": {c.node_id: round(c.seconds, 1) for c in cold.components},
        "second_run_states": {c.node_id: c.state for c in second.components},
        "cached_states": {c.node_id: c.state for c in cached.components},
        "test_accuracy": round(overall["binary_accuracy"], 4),
        "test_auc": round(overall["auc"], 4),
        "test_rows": int(overall["example_count"]),
        "blessed": cold.blessed,
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, f"pipeline_{args.trainer}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
