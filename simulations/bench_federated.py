"""Seconds per federated round vs a plain Keras fit on the same number of examples (same process).

    PYTHONPATH=. python simulations/bench_federated.py [--rounds 4] [--cpr 10 100] [--accuracy-rounds 30]

Adult, 100 IID shards, batch 32, 1 local epoch, the same MLP (``dp_training.model.build_model``, 64 hidden
units); fixed-size sampling so every round has exactly the same number of clients. The first round (tracing /
worker start) is reported separately and excluded from the mean. Then (optional) final held-out accuracy after
R rounds for the row-stable IID-like (hash) and label-skewed (hash-dirichlet:0.1) partitions, with and without
DP-FedAvg. Every run goes through the privacy protocol and is recorded in the budget ledger
(``PRIVTRAIN_LEDGER`` / ``--ledger``); the non-private ones as unbounded spend (``allow_non_private``).
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


def keras_seconds(data, n_examples: int, repeats: int = 3) -> float:
    import numpy as np
    import tensorflow as tf

    from dp_training.model import bucket_sizes, build_model

    model = build_model(data.spec, bucket_sizes(data.spec), None, (64,))
    model.compile(optimizer=tf.keras.optimizers.SGD(0.05),
                  loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
    idx = np.random.default_rng(0).choice(data.train_labels.shape[0], n_examples, replace=False)
    x = {k: v[idx] for k, v in data.train_features.items()}
    y = data.train_labels[idx]
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # warm-up: tracing
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_rounds(data, cpr: int, rounds: int, ledger=None, **overrides):
    from federated.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(clients=100, clients_per_round=cpr, rounds=rounds, sampling="fixed", partition="iid",
                           client_batch_size=32, local_epochs=1, eval_every=0, plot=False,
                           privacy=_privacy(ledger, allow_non_private=True), **overrides)
    res = simulate(cfg, data=data, log=lambda m: None)
    secs = [h["round_seconds"] for h in res.history]
    examples = statistics.mean(h["examples"] for h in res.history)
    return {"clients_per_round": cpr, "first_round_s": secs[0], "round_s": statistics.median(secs[1:]),
            "examples_per_round": examples, "build_s": res.final["build_seconds"]}


def _privacy(ledger, **extra):
    out = dict(extra)
    if ledger:
        out["ledger"] = ledger
    return out


def accuracy_runs(data, rounds: int, out_dir: str, cpr: int = 50, ledger=None):
    from federated.simulate import SimulationConfig, simulate

    rows = []
    for part in ("hash", "hash-dirichlet:0.1"):
        for dp in (None, 1.0):
            cfg = SimulationConfig(clients=100, clients_per_round=cpr, rounds=rounds, partition=part,
                                   client_lr=0.05, dp_noise_multiplier=dp, dp_clip=0.5,
                                   eval_every=max(1, rounds // 5), output_dir=os.path.join(
                                       out_dir, f"{part.replace(':', '')}-{'dp' if dp else 'nodp'}"),
                                   privacy=_privacy(ledger, allow_non_private=dp is None, delta=1e-5))
            cfg.resume = False
            res = simulate(cfg, data=data, log=lambda m: None)
            g = res.privacy
            rows.append({"partition": part, "dp_noise_multiplier": dp, "rounds": rounds, "clients_per_round": cpr,
                         "eval_accuracy": res.final.get("eval_accuracy"),
                         "epsilon": g["epsilon"] if g["private"] else None,
                         "delta": g["delta"] if g["private"] else None,
                         "relation": f"{g['neighbouring_relation']} of one {g['privacy_unit']}"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--cpr", type=int, nargs="+", default=[10, 100])
    p.add_argument("--accuracy-rounds", type=int, default=0, help="0: skip the accuracy table")
    p.add_argument("--out", default="bench-federated-out")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--ledger", default=None, help="budget ledger (default: $PRIVTRAIN_LEDGER, else the user's)")
    p.add_argument("--train-sample", type=int, default=None, help="about N training rows (quick checks)")
    p.add_argument("--stock", action="store_true",
                   help="also time TFF's defaults (DATASET_REDUCE client loop, unlimited worker concurrency)")
    args = p.parse_args(argv)

    from federated.data import load_tabular
    from federated.simulate import DEFAULT_DATA

    data = load_tabular(DEFAULT_DATA)
    if args.train_sample:
        data = data.sample(args.train_sample, None, data.spec.require_privacy().public_row_estimate)
    results = {"timing": [], "accuracy": []}
    for cpr in args.cpr:
        r = bench_rounds(data, cpr, args.rounds, ledger=args.ledger)
        r["keras_fit_s"] = keras_seconds(data, int(r["examples_per_round"]))
        r["overhead_ratio"] = r["round_s"] / r["keras_fit_s"]
        if args.stock:
            s = bench_rounds(data, cpr, args.rounds, ledger=args.ledger, client_loop="reduce",
                             max_concurrent_computation_calls=-1)
            r["stock_round_s"] = s["round_s"]
            r["stock_overhead_ratio"] = s["round_s"] / r["keras_fit_s"]
        results["timing"].append(r)
        print(json.dumps(r), flush=True)
    if args.accuracy_rounds:
        results["accuracy"] = accuracy_runs(data, args.accuracy_rounds, args.out, ledger=args.ledger)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
