"""Command-line flags shared by ``privtrain train --trainer federated`` and ``privtrain simulate federated``.

The CLI wiring belongs to the platform; it calls :func:`add_simulate_arguments` / :func:`run_simulate`
(and :func:`federated.trainer.add_arguments` / :func:`federated.trainer.trainer_args`).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from federated.engine import FederatedConfig


def _partition(text: str) -> str:
    from federated.partition import PartitionSpec

    try:
        return str(PartitionSpec.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_federated_arguments(parser: argparse.ArgumentParser) -> None:
    d = FederatedConfig()
    g = parser.add_argument_group("federated learning")
    g.add_argument("--clients", type=int, default=d.clients, help="number of client shards (ignored by column:)")
    g.add_argument("--clients-per-round", type=int, default=d.clients_per_round,
                   help="expected clients sampled per round")
    g.add_argument("--rounds", type=int, default=d.rounds)
    g.add_argument("--local-epochs", type=int, default=d.local_epochs)
    g.add_argument("--client-batch-size", type=int, default=d.client_batch_size)
    g.add_argument("--partition", type=_partition, default=d.partition,
                   help="iid | dirichlet:ALPHA (label skew) | column:NAME (one client per value)")
    g.add_argument("--client-optimizer", choices=["sgd", "sgdm", "adam"], default=d.client_optimizer)
    g.add_argument("--server-optimizer", choices=["sgd", "sgdm", "adam"], default=d.server_optimizer)
    g.add_argument("--client-lr", type=float, default=d.client_lr)
    g.add_argument("--server-lr", type=float, default=d.server_lr)
    g.add_argument("--dp-noise-multiplier", type=float, default=None,
                   help="enable client-level DP-FedAvg with this noise multiplier")
    g.add_argument("--dp-clip", type=float, default=d.dp_clip, help="L2 clip of client updates (initial if adaptive)")
    g.add_argument("--dp-delta", type=float, default=None, help="default min(1e-5, 1/clients^1.1)")
    g.add_argument("--adaptive-clipping", action="store_true", help="adaptive (quantile) clipping norm")
    g.add_argument("--accountant", choices=["pld", "rdp"], default=d.accountant,
                   help="accountant for poisson sampling (fixed sampling always uses RDP)")
    g.add_argument("--sampling", choices=["poisson", "fixed"], default=d.sampling,
                   help="poisson: each client joins w.p. clients-per-round/clients (accounted as such); "
                        "fixed: exactly clients-per-round, uniformly without replacement (RDP, replace-one)")
    g.add_argument("--dropout-rate", type=float, default=d.dropout_rate,
                   help="fraction of sampled clients that fail each round")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out eval every k rounds (0: never)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="checkpoint every k rounds")
    g.add_argument("--no-resume", dest="resume", action="store_false", help="ignore existing checkpoints")
    g.add_argument("--seed", type=int, default=d.seed)


def config_kwargs(ns: argparse.Namespace) -> Dict[str, Any]:
    keys = ["clients", "clients_per_round", "rounds", "local_epochs", "client_batch_size", "partition",
            "client_optimizer", "server_optimizer", "client_lr", "server_lr", "dp_noise_multiplier", "dp_clip",
            "dp_delta", "adaptive_clipping", "accountant", "sampling", "dropout_rate", "eval_every", "checkpoint_every",
            "resume", "seed", "allow_non_private"]
    return {k: getattr(ns, k) for k in keys if hasattr(ns, k)}


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``privtrain simulate federated --data DIR --output DIR [...]``."""
    from federated.simulate import DEFAULT_DATA

    parser.add_argument("--data", default=DEFAULT_DATA, help="directory with dataset.json (default: data/adult)")
    parser.add_argument("--output", required=True, help="directory for metrics.csv/json, accuracy.png, checkpoints")
    parser.add_argument("--train-sample", type=int, default=None, help="use N random training rows")
    parser.add_argument("--eval-sample", type=int, default=None, help="use N random held-out rows")
    add_federated_arguments(parser)


def run_simulate(ns: argparse.Namespace) -> int:
    """Runs the simulation described by parsed flags; prints a summary; returns an exit code."""
    from federated.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(data_dir=ns.data, output_dir=ns.output, train_sample=ns.train_sample,
                           eval_sample=ns.eval_sample, **config_kwargs(ns))
    res = simulate(cfg)
    print(json.dumps({"final": res.final, "privacy": res.privacy, "files": res.files}, indent=1, default=str))
    return 0


def main(argv=None) -> int:  # python -m federated.cli --output DIR [...]
    p = argparse.ArgumentParser(prog="privtrain simulate federated")
    add_simulate_arguments(p)
    return run_simulate(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
