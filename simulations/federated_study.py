"""Small study: FedAvg on Adult with IID-like shards vs Dirichlet(0.1) label skew vs native-country silos
(all three row-stable, so ``--dp`` runs are accounted per row; every run is recorded in the budget ledger).

    PYTHONPATH=. python simulations/federated_study.py --out study-out [--rounds 20] [--dp 1.0]

Writes study.md (markdown table), study.csv, study.png (held-out accuracy per round) and one run
directory per partition (metrics.csv/json, accuracy.png).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PARTITIONS = ("hash", "hash-dirichlet:0.1", "column:native-country")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="federated-study")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--client-lr", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--dp", type=float, default=None, help="DP-FedAvg noise multiplier (default: no DP)")
    p.add_argument("--train-sample", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ledger", default=None, help="budget ledger (default: $PRIVTRAIN_LEDGER, else the user's)")
    args = p.parse_args(argv)

    from federated.data import load_tabular
    from federated.simulate import DEFAULT_DATA, SimulationConfig, simulate

    data = load_tabular(DEFAULT_DATA)
    os.makedirs(args.out, exist_ok=True)
    rows, curves = [], {}
    for part in PARTITIONS:
        cfg = SimulationConfig(clients=args.clients, clients_per_round=args.clients_per_round, rounds=args.rounds,
                               partition=part, client_lr=args.client_lr, eval_every=args.eval_every,
                               dp_noise_multiplier=args.dp, dp_clip=0.5, train_sample=args.train_sample,
                               seed=args.seed, resume=False,
                               privacy={k: v for k, v in (("ledger", args.ledger),
                                                          ("allow_non_private", args.dp is None)) if v},
                               output_dir=os.path.join(args.out, part.replace(":", "-")))
        res = simulate(cfg, data=data)
        s = res.shards
        rows.append({
            "partition": part, "clients": s["clients"], "shard_min": s["size_min"],
            "shard_median": s["size_median"], "shard_max": s["size_max"],
            "pos_rate_min": round(s["positive_rate_min"] or 0.0, 3),
            "pos_rate_max": round(s["positive_rate_max"] or 0.0, 3),
            "label_skew": round(s["label_skew"], 3), "rounds": args.rounds,
            "final_eval_accuracy": round(res.final.get("eval_accuracy") or float("nan"), 4),
            "final_eval_loss": round(res.final.get("eval_loss") or float("nan"), 4),
            "epsilon": round(res.privacy["epsilon"], 3) if res.privacy["private"] else "",
            "sec_per_round": round(res.final["mean_round_seconds"] or float("nan"), 3),
        })
        curves[part] = [(h["round"], h["eval_accuracy"]) for h in res.history if h.get("eval_accuracy") is not None]

    keys = list(rows[0])
    with open(os.path.join(args.out, "study.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[k]) for k in keys) + " |\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for part, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), "o-", label=part)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"FedAvg on Adult, {args.clients_per_round} clients/round" + (f", DP z={args.dp}" if args.dp else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "study.png"), dpi=100)
    print(open(os.path.join(args.out, "study.md")).read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
