"""Benchmark: an identical re-run of `privtrain run` through the command line, as a user types it, on a sample of
Adult (default 3,000 training / 1,500 eval rows), side by side in one run:

  cold        the first run (every component runs)
  replay      the identical re-run: the CLI finds the last run's record (pipeline/run_memo.py) and prints it
  tfx_cached  the same re-run without the record: TFX's cache reuses everything up to the Trainer, the Evaluator
              evaluates the model against itself as the baseline and the Pusher pushes it again (the old path)

Wall times include the process start (the interpreter, and TensorFlow where a path imports it). The machine's
load average is recorded beside the figures.

  python simulations/bench_rerun.py [--rows 3000] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _sample(directory: str, train_rows: int, eval_rows: int) -> str:
    adult = os.path.join(ROOT, "data", "adult")
    os.makedirs(directory)
    for name in ("schema.pbtxt",):
        shutil.copy(os.path.join(adult, name), directory)
    with open(os.path.join(adult, "dataset.json")) as f:
        description = json.load(f)
    description["privacy"].update({"source_id": f"bench-rerun-{os.getpid()}", "public_row_estimate": train_rows})
    with open(os.path.join(directory, "dataset.json"), "w") as f:
        json.dump(description, f)
    for filename, rows in (("adult.data", train_rows), ("adult.test", eval_rows)):
        with open(os.path.join(adult, filename)) as src, open(os.path.join(directory, filename), "w") as dst:
            for i, line in enumerate(src):
                if i >= rows:
                    break
                dst.write(line)
    return directory


def _run(args, env):
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "privtrain_cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    seconds = time.perf_counter() - started
    if r.returncode != 0:
        raise SystemExit(f"bench_rerun: privtrain {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return seconds, r


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--trainer", default="standard")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="privtrain-bench-rerun-")
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
               PRIVTRAIN_LEDGER=os.path.join(tmp, "ledger.sqlite"))
    try:
        data = _sample(os.path.join(tmp, "data"), args.rows, args.rows // 2)
        run = ["run", "--trainer", args.trainer, "--data", data, "--workdir", os.path.join(tmp, "work"),
               "--allow-non-private", "--json"]
        load_before = os.getloadavg()
        cold, _ = _run(run, env)
        replay, r = _run(run, env)
        assert "identical to the run" in r.stderr, r.stderr[-2000:]
        os.remove(os.path.join(tmp, "work", "runs", "last.json"))
        tfx_cached, r = _run(run, env)
        states = {c["component"]: c["state"] for c in json.loads(r.stdout)["components"]}
        result = {"rows": args.rows, "trainer": args.trainer, "cold_seconds": round(cold, 2),
                  "replay_seconds": round(replay, 2), "tfx_cached_seconds": round(tfx_cached, 2),
                  "replay_over_tfx_cached": round(replay / tfx_cached, 4), "tfx_cached_states": states,
                  "load_average_before": [round(x, 2) for x in load_before],
                  "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
