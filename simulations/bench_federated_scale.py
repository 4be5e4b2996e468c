"""Seconds per federated round in-process vs across 1 and 2 local TFF workers, and a 10,000-client population.

    PYTHONPATH=. python simulations/bench_federated_scale.py [--rounds 3] [--cpr 100 1000] [--json FILE]

Full Adult split into 10,000 clients by the row-stable ``hash`` partition (about 3 rows each), batch 8, 1 local
epoch, the platform's MLP (64 hidden units), fixed-size sampling so every round has exactly the same number of
clients, non-private FedAvg. For each cohort size the three runtimes (TFF's own local worker = "in-process",
``--worker-processes 1``, ``--worker-processes 2``) run one after the other in this process; the first round
(tracing, compilation, worker start) is reported separately and the median of the others is the figure. The
"population" row is the 100-client cohort of the 10,000-client population in-process (goal <= 2 s per round)
with the client data loaded per cohort. Ratios are against in-process in the same run. Every run goes through
the privacy protocol and is recorded in the budget ledger as an unbounded spend (``allow_non_private``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RUNTIMES = (("in-process", 0), ("1 worker", 1), ("2 workers", 2))


def bench(data, cpr: int, rounds: int, worker_processes: int, clients: int, ledger=None):
    from federated.simulate import SimulationConfig, simulate

    privacy = {"allow_non_private": True, **({"ledger": ledger} if ledger else {})}
    cfg = SimulationConfig(clients=clients, clients_per_round=cpr, rounds=rounds, sampling="fixed", partition="hash",
                           client_batch_size=8, local_epochs=1, eval_every=0, plot=False,
                           worker_processes=worker_processes, privacy=privacy)
    t = time.perf_counter()
    res = simulate(cfg, data=data, log=lambda m: None)
    secs = [h["round_seconds"] for h in res.history]
    return {"clients": clients, "clients_per_round": cpr, "worker_processes": worker_processes,
            "first_round_s": secs[0], "round_s": statistics.median(secs[1:]) if len(secs) > 1 else secs[0],
            "client_datasets_built": res.final.get("client_datasets_built"), "wall_s": time.perf_counter() - t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpr", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--ledger", default=None, help="budget ledger (default: $PRIVTRAIN_LEDGER, else the user's)")
    args = p.parse_args(argv)

    from federated.data import load_tabular
    from federated.simulate import DEFAULT_DATA

    data = load_tabular(DEFAULT_DATA)
    rows = []
    for cpr in args.cpr:
        base = None
        for name, n in RUNTIMES:
            r = bench(data, cpr, args.rounds, n, args.clients, args.ledger)
            r["runtime"] = name
            base = r["round_s"] if n == 0 else base
            r["ratio_vs_in_process"] = r["round_s"] / base
            rows.append(r)
            print(json.dumps(r), flush=True)
    out = {"rows": rows, "population_round_s": next((r["round_s"] for r in rows
                                                     if r["clients_per_round"] == 100 and r["worker_processes"] == 0),
                                                    None),
           "load_average": os.getloadavg(), "cores": os.cpu_count()}
    print(json.dumps({k: out[k] for k in ("population_round_s", "load_average", "cores")}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
