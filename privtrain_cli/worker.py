"""``privtrain federated-worker``: one TFF worker for ``--workers HOST:PORT`` (federated/workers.py)."""
from __future__ import annotations


def add_parser(sub) -> None:
    from federated.workers import add_worker_arguments

    add_worker_arguments(sub.add_parser("federated-worker", help="serve one TFF worker (for simulate/run "
                                                                 "--workers HOST:PORT) until Ctrl-C"))


def run(args) -> int:
    from federated.workers import run_worker

    return run_worker(args)
