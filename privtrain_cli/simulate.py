"""``privtrain simulate federated``: TFF rounds over client shards of a raw data set (federated/)."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulations that run without the pipeline")
    kinds = p.add_subparsers(dest="simulation", required=True)
    federated = kinds.add_parser("federated", help="TFF federated averaging (optionally DP-FedAvg) over client "
                                                   "shards of a raw data set")
    from federated.cli import add_simulate_arguments

    add_simulate_arguments(federated)


def run(args) -> int:
    from federated.cli import run_simulate

    try:
        return run_simulate(args)
    except ValueError as e:
        print(f"privtrain simulate federated: {e}", file=sys.stderr)
        return 2
