"""Command-line flags shared by ``privtrain run --trainer federated`` and ``privtrain simulate federated``.

The CLI wiring belongs to the platform; it calls :func:`add_simulate_arguments` / :func:`run_simulate`
(and :func:`federated.trainer.add_arguments` / :func:`federated.trainer.trainer_args`). The run's privacy flags
(``--target-epsilon``, ``--delta``, ``--accountant``, ``--preprocessing-epsilon``, ``--budget-epsilon``,
``--allow-non-private``) are the pipeline's in ``privtrain run``; the simulation declares the same ones.
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


def _noise(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def add_federated_arguments(parser: argparse.ArgumentParser) -> None:
    d = FederatedConfig()
    g = parser.add_argument_group("federated learning")
    g.add_argument("--clients", type=int, default=d.clients,
                   help="number of clients K (public; column:NAME takes the size of NAME's public domain + 1)")
    g.add_argument("--clients-per-round", type=int, default=d.clients_per_round,
                   help="expected (poisson) or exact (fixed) clients per round")
    g.add_argument("--rounds", type=int, default=d.rounds)
    g.add_argument("--local-epochs", type=int, default=d.local_epochs)
    g.add_argument("--client-batch-size", type=int, default=d.client_batch_size)
    g.add_argument("--partition", type=_partition, default=d.partition,
                   help="row-stable: hash (IID-like) | hash-dirichlet:ALPHA (label skew) | hash:NAME | column:NAME "
                        "(one client per public value); non-private only: iid | dirichlet:ALPHA (default %(default)s)")
    g.add_argument("--client-optimizer", choices=["sgd", "sgdm", "adam"], default=d.client_optimizer)
    g.add_argument("--server-optimizer", choices=["sgd", "sgdm", "adam"], default=d.server_optimizer)
    g.add_argument("--client-lr", type=float, default=d.client_lr)
    g.add_argument("--server-lr", type=float, default=d.server_lr)
    g.add_argument("--dp-noise-multiplier", type=_noise, default=None,
                   help="DP-FedAvg with this noise multiplier (> 0), or 'auto' (calibrated to --target-epsilon, "
                        "default 3); 0 or absent: not private")
    g.add_argument("--dp-clip", type=float, default=d.dp_clip, help="L2 clip of client updates (initial if adaptive)")
    g.add_argument("--adaptive-clipping", action="store_true", help="adaptive (quantile) clipping norm")
    g.add_argument("--sampling", choices=["poisson", "fixed"], default=d.sampling,
                   help="poisson: each client joins w.p. clients-per-round/clients (PLD); fixed: exactly "
                        "clients-per-round without replacement (accounted with --accountant rdp)")
    g.add_argument("--dropout-rate", type=float, default=d.dropout_rate,
                   help="fraction of sampled clients that fail each round")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out eval every k rounds (0: never)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="checkpoint every k rounds")
    g.add_argument("--no-resume", dest="resume", action="store_false", help="ignore existing checkpoints")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="public seed: the partition hash key (and client sampling of non-private runs; private "
                        "runs sample clients, also on resume, and key their noise from OS entropy)")
    g.add_argument("--workers", type=_workers, default=None, metavar="HOST:PORT,...",
                   help="run each round's clients split across these TFF workers (started with privtrain "
                        "federated-worker --port PORT)")
    g.add_argument("--worker-processes", type=int, default=d.worker_processes, metavar="N",
                   help="start N local TFF workers for this run and stop them afterwards (default 0: TFF's own "
                        "single local worker)")
    g.add_argument("--noise-cohort-size", type=int, default=None, metavar="C",
                   help="simulation setting (DP only): calibrate the noise for a deployment cohort of C clients per "
                        "round while simulating --clients-per-round K <= C; every output is labelled, and the "
                        "stated deployment epsilon does not cover the simulated data")
    g.add_argument("--secure-aggregation", action="store_true",
                   help="SecAgg+ with distributed DP: each client quantises its clipped update, adds its share of "
                        "discrete Gaussian noise and masks it; the server learns only each round's noisy sum "
                        "(accounted with --accountant rdp; see docs/federated.md, Secure aggregation)")
    g.add_argument("--noise-population", type=int, default=None, metavar="P",
                   help="the deployment's client population for --noise-cohort-size (default: --clients)")


def _workers(text: str) -> str:
    from federated.workers import parse_addresses

    try:
        return ",".join(parse_addresses(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def config_kwargs(ns: argparse.Namespace) -> Dict[str, Any]:
    keys = ["clients", "clients_per_round", "rounds", "local_epochs", "client_batch_size", "partition",
            "client_optimizer", "server_optimizer", "client_lr", "server_lr", "dp_noise_multiplier", "dp_clip",
            "adaptive_clipping", "sampling", "dropout_rate", "eval_every", "checkpoint_every", "resume", "seed",
            "workers", "worker_processes", "noise_cohort_size", "noise_population", "secure_aggregation"]
    return {k: getattr(ns, k) for k in keys if hasattr(ns, k)}


def add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("privacy (as privtrain run; see docs/privacy_model.md)")
    g.add_argument("--target-epsilon", type=float, default=None,
                   help="the run's total epsilon; without --dp-noise-multiplier the noise is calibrated to it")
    g.add_argument("--delta", type=float, default=None, help="default 1/(10 N) for the public planning size N")
    g.add_argument("--accountant", choices=["pld", "rdp"], default=None, help="default pld")
    g.add_argument("--preprocessing-epsilon", type=float, default=None,
                   help="epsilon of the DP normalisation statistics (default: a tenth of the target)")
    g.add_argument("--budget-epsilon", type=float, default=None,
                   help="create the source's budget in the ledger if it has none")
    g.add_argument("--allow-non-private", action="store_true",
                   help="allow a non-private run on a source that has a budget (recorded as unbounded spend)")
    g.add_argument("--new-source", default=None, metavar="REASON",
                   help="the training content is already charged under another source id and this really is a "
                        "different data source: say why (recorded in the ledger)")


def privacy_kwargs(ns: argparse.Namespace) -> Dict[str, Any]:
    out = {k: getattr(ns, k, None) for k in ("target_epsilon", "delta", "accountant", "preprocessing_epsilon",
                                             "budget_epsilon", "ledger", "new_source")}
    if getattr(ns, "allow_non_private", False):
        out["allow_non_private"] = True
    return {k: v for k, v in out.items() if v is not None}


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``privtrain simulate federated --data DIR --output DIR [...]``."""
    from federated.simulate import DEFAULT_DATA

    parser.add_argument("--data", default=DEFAULT_DATA, help="directory with dataset.json (default: data/adult)")
    parser.add_argument("--output", required=True,
                        help="directory for privacy.json (public) and metrics/checkpoints (private)")
    parser.add_argument("--train-sample", type=int, default=None,
                        help="about N training rows (row-stable subsample: each row kept w.p. N / planning size)")
    parser.add_argument("--eval-sample", type=int, default=None, help="use N random held-out rows")
    add_federated_arguments(parser)
    add_privacy_arguments(parser)


def run_simulate(ns: argparse.Namespace) -> int:
    """Runs the simulation described by parsed flags; prints the guarantee and the files; returns an exit code."""
    from federated.simulate import SimulationConfig, simulate

    kwargs = config_kwargs(ns)
    if kwargs.get("dp_noise_multiplier") is None and getattr(ns, "target_epsilon", None) is not None:
        kwargs["dp_noise_multiplier"] = "auto"
    cfg = SimulationConfig(data_dir=ns.data, output_dir=ns.output, train_sample=ns.train_sample,
                           eval_sample=ns.eval_sample, privacy=privacy_kwargs(ns), **kwargs)
    import sys

    from dp_training.ledger import LedgerError
    from federated.engine import RunStopped, latest_checkpoint
    from federated.workers import WorkerError

    from core.private_files import OpenDirectoryError

    try:
        res = simulate(cfg)
    except OpenDirectoryError as e:   # an existing output directory open to other users: nothing run
        print(f"privtrain simulate federated: {e}", file=sys.stderr)
        return 2
    except LedgerError as e:   # refused or tampered ledger: nothing trained
        print(f"privtrain simulate federated: {e}", file=sys.stderr)
        return 2
    except (RunStopped, WorkerError) as e:   # a worker could not be reached or was lost mid-run
        print(f"privtrain simulate federated: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:   # workers already stopped (federated.runtime), the ledger entry marked cancelled
        ckpt = latest_checkpoint(cfg.output_dir)
        print("privtrain simulate federated: interrupted; every TFF worker this run started is stopped"
              + (f"; the last checkpoint ({ckpt}) is intact, run the same command to resume" if ckpt else ""),
              file=sys.stderr)
        return 130
    # Public facts only on stdout (the guarantee, the files, eval metrics on the eval split): training losses,
    # counts and timings are in the private metrics file.
    public = {k: res.final[k] for k in ("rounds", "clients", "clients_per_round", "eval_accuracy", "eval_loss")
              if k in res.final}
    out = {"privacy": res.privacy, "files": res.files, "final": public}
    if (res.privacy or {}).get("simulation_setting"):
        out = {"simulation_setting": res.privacy["simulation_setting"]["label"], **out}
    print(json.dumps(out, indent=1, default=str))
    return 0


def main(argv=None) -> int:  # python -m federated.cli --output DIR [...]
    import sys

    p = argparse.ArgumentParser(prog="privtrain simulate federated")
    p.add_argument("--ledger", default=None, help="budget ledger (default: $PRIVTRAIN_LEDGER, else the user's)")
    add_simulate_arguments(p)
    try:
        return run_simulate(p.parse_args(argv))
    except ValueError as e:
        print(f"privtrain simulate federated: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
