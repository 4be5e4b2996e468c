"""Secure aggregation (SecAgg+ with the distributed discrete Gaussian) vs plain DP-FedAvg, side by side.

    PYTHONPATH=. python simulations/bench_secagg.py [--rounds 4] [--accuracy-rounds 20] [--seeds 0 1 2] \
        [--eps 3] [--json bench-results/secagg.json]

Adult (32,561 training rows), 100 row-stable ``hash`` clients, all 100 per round (fixed-size sampling, so neither
side gets amplification by sampling and "equal epsilon" is the same mechanism strength), batch 32, 1 local epoch,
the platform's MLP. Three parts, each measured in this one process:

1. seconds per round (median of rounds 2..R) for: the platform's DP-FedAvg (TFF, central Gaussian), the secure
   path with the central Gaussian instead of SecAgg (same local-SGD clients: isolates the aggregation's cost),
   the secure path (SecAgg+ with distributed DP) with the clients in this process and in 2 client processes; the
   aggregation's own seconds, and its critical path (per protocol step the slowest client, plus the server: the
   latency when every client computes on its own device);
2. bytes per client: the SecAgg+ messages a client sends and receives (keys, encrypted shares, the masked vector
   at the ring's bits per coordinate, signatures, unmasking shares) vs a float32 update upload;
3. held-out accuracy after ``--accuracy-rounds`` rounds at equal epsilon (``--eps``, RDP accountant, delta
   1e-5, noise calibrated to it by each path's own accounting), per seed, for central DP-FedAvg (TFF) and the
   secure path. Hyper-parameters are fixed in advance (clip 0.5, client lr 0.1, server lr 1), never tuned on the
   eval split. Every run goes through the privacy protocol, charged to a throw-away ledger.

Plus an accounting-only table: the epsilon each path states for the same noise when the cohort is a sample of a
larger population (central DP-FedAvg is amplified by the sampling; the secure path's guarantee, held against a
server that knows the cohort, is not).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

COMMON = dict(clients=100, clients_per_round=100, sampling="fixed", partition="hash", client_batch_size=32,
              local_epochs=1, plot=False, dp_clip=0.5, client_lr=0.1, server_lr=1.0)


def _run(data, secure: bool, rounds: int, central_loop: bool = False, eval_every: int = 0, seed: int = 0, **kw):
    from federated.secagg import rounds as secure_rounds
    from federated.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(**COMMON, rounds=rounds, secure_aggregation=secure, eval_every=eval_every, seed=seed,
                           privacy=dict({"accountant": "rdp", "delta": 1e-5}, **kw.pop("privacy", {})), **kw)
    original = secure_rounds.run_secure
    if central_loop:   # the same clients, DP-FedAvg's central Gaussian instead of SecAgg+ (timing baseline only)
        secure_rounds.run_secure = functools.partial(original, aggregation="central")
    try:
        t = time.perf_counter()
        res = simulate(cfg, data=data, log=lambda m: None)
        total = time.perf_counter() - t
    finally:
        secure_rounds.run_secure = original
    return res, total


def speed(data, rounds: int):
    out = {}
    for name, secure, central, procs in (("dp-fedavg (TFF, central)", False, False, 0),
                                         ("same clients, central Gaussian", True, True, 0),
                                         ("secure aggregation (SecAgg+, DDG)", True, False, 0),
                                         ("secure aggregation, 2 client processes", True, False, 2)):
        res, _ = _run(data, secure, rounds, central_loop=central, dp_noise_multiplier=1.0, worker_processes=procs)
        h = res.history[1:] or res.history
        row = {"round_s": statistics.median(x["round_seconds"] for x in h)}
        if secure:
            row["aggregation_s"] = statistics.median(x["aggregation_seconds"] for x in h)
            row["client_train_s"] = statistics.median(x["client_train_seconds"] for x in h)
            row["bytes_per_client"] = statistics.median(x["bytes_per_client"] for x in h)
            crit = [x["aggregation_critical_path_seconds"] for x in h if x["aggregation_critical_path_seconds"]]
            if crit:   # clients on their own devices: per step the slowest client, plus the server
                row["aggregation_critical_path_s"] = statistics.median(crit)
        out[name] = row
        print(f"{name}: {row}", flush=True)
    return out


def accuracy(data, rounds: int, seeds, eps: float):
    out = {"central": [], "secure": []}
    for seed in seeds:
        for name, secure in (("central", False), ("secure", True)):
            res, _ = _run(data, secure, rounds, eval_every=rounds, seed=seed, dp_noise_multiplier="auto",
                          privacy={"target_epsilon": eps})
            out[name].append({"seed": seed, "eval_accuracy": res.final["eval_accuracy"],
                              "epsilon": res.privacy["epsilon"],
                              "noise_multiplier": res.privacy["parameters"].get("noise_multiplier")})
            print(f"{name} seed {seed}: {out[name][-1]}", flush=True)
    return out


def accounting_table(rounds: int = 20, z: float = 1.0):
    import dp_accounting

    from dp_training import accountants, events
    from federated.secagg import accounting, rounds as secure_rounds

    rows = []
    for population, cohort in ((100, 100), (1000, 100), (10000, 100)):
        central = events.ReplaceAdjacencyDpEvent(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(cohort / population, dp_accounting.GaussianDpEvent(z)), rounds))
        floor = secure_rounds.min_clients(cohort, 0.0, "fixed")
        secure = accounting.planned_event(z, floor, rounds, replace=True)
        rows.append({"population": population, "cohort": cohort, "rounds": rounds, "z": z,
                     "central_pld": accountants.epsilon(central, 1e-5, "pld"),
                     "secure_rdp": accountants.epsilon(secure, 1e-5, "rdp")})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--accuracy-rounds", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eps", type=float, default=3.0)
    p.add_argument("--json", default=None)
    p.add_argument("--ledger", default=None)
    a = p.parse_args(argv)
    os.environ["PRIVTRAIN_LEDGER"] = a.ledger or os.path.join(tempfile.mkdtemp(prefix="bench-secagg-"), "l.sqlite")
    from federated.data import load_tabular
    from federated.simulate import DEFAULT_DATA

    data = load_tabular(DEFAULT_DATA)
    result = {"load_before": os.getloadavg(), "speed": speed(data, a.rounds)}
    if a.accuracy_rounds > 0:
        result["accuracy"] = accuracy(data, a.accuracy_rounds, a.seeds, a.eps)
    result["accounting"] = accounting_table()
    result["load_after"] = os.getloadavg()
    sp = result["speed"]
    base = sp["dp-fedavg (TFF, central)"]["round_s"]
    sec = sp["secure aggregation (SecAgg+, DDG)"]
    print(f"\nround seconds: secure {sec['round_s']:.2f} vs DP-FedAvg (TFF) {base:.2f} "
          f"({sec['round_s'] / base:.2f}x); vs same clients central "
          f"{sp['same clients, central Gaussian']['round_s']:.2f}; aggregation {sec['aggregation_s']:.2f} s; "
          f"{sec['bytes_per_client'] / 1024:.1f} KiB per client")
    if "accuracy" in result:
        for name, rows in result["accuracy"].items():
            accs = [r["eval_accuracy"] for r in rows]
            print(f"accuracy {name} at eps {a.eps}: mean {statistics.mean(accs):.4f} "
                  f"({', '.join(f'{x:.4f}' for x in accs)})")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
