"""The ``federated`` trainer kind for the pipeline (see pipeline/trainers/base.py)."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from typing import Any, Dict

import numpy as np

from federated.cli import add_federated_arguments, config_kwargs
from federated.engine import FederatedConfig, run_federated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--clients``, ``--rounds``, ``--partition``, ``--dp-noise-multiplier``, ... to ``parser``."""
    add_federated_arguments(parser)


def trainer_args(namespace: argparse.Namespace) -> Dict[str, Any]:
    """The federated flags of a parsed namespace as a plain dict (the context's ``args``)."""
    return config_kwargs(namespace)


def is_private(args) -> bool:
    """FedAvg is differentially private (DP-FedAvg) only with a noise multiplier."""
    return (args or {}).get("dp_noise_multiplier") is not None


_NULLABLE = ("dp_noise_multiplier", "dp_delta")


def _config(args):
    fields = {f.name for f in dataclasses.fields(FederatedConfig)}
    unknown = sorted(set(args) - fields - {"allow_non_private"})
    kwargs = {k: v for k, v in dict(args).items() if k in fields and (v is not None or k in _NULLABLE)}
    cfg = FederatedConfig(**kwargs)
    return cfg, unknown


class FederatedTrainer:
    """Federated training of ``context.build_model()`` over client shards of the training data."""

    name = "federated"

    def train(self, context):
        from pipeline.trainers.base import TrainingOutcome

        cfg, unknown = _config(context.args or {})
        if unknown:
            context.log(f"[federated] ignoring unknown trainer args: {unknown}")
        # per data set and configuration: an interrupted run with the same settings resumes its checkpoints
        cfg_hash = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
        output_dir = os.path.join(context.workdir, "federated",
                                  f"{context.dataset_fingerprint[:16]}-{cfg_hash.hexdigest()[:8]}")
        from federated.engine import _as_model_dtypes
        from federated.partition import PartitionSpec, make_shards

        shards = make_shards(PartitionSpec.parse(cfg.partition), _as_model_dtypes(context.train_features),
                             context.train_labels, cfg.clients, np.random.default_rng([cfg.seed, 1]))
        ledger = run_id = None
        if cfg.dp_noise_multiplier is not None:
            ledger, run_id = _ledger_begin(context, cfg, len(shards))
        released = []
        try:
            res = run_federated(context.train_features, context.train_labels, context.eval_features,
                                context.eval_labels, context.build_model, cfg, output_dir=output_dir,
                                log=context.log, on_round=released.append, shards=shards)
        except BaseException:
            if ledger is not None:
                _ledger_finish(ledger, run_id, "failed", cfg, None, len(released))
            raise
        if ledger is not None:
            _ledger_finish(ledger, run_id, "completed", cfg, res, len(released))
        details: Dict[str, Any] = {"strategy": "dp-fedavg" if res.privacy else "fedavg",
                                   "partition": cfg.partition, "clients": res.final["clients"],
                                   "clients_per_round": res.final["clients_per_round"], "rounds": res.final["rounds"],
                                   "dropout_rate": cfg.dropout_rate, "output_dir": output_dir,
                                   "label_skew": res.shards["label_skew"]}
        for k in ("train_loss", "train_accuracy", "eval_accuracy", "eval_loss", "mean_round_seconds"):
            if res.final.get(k) is not None:
                details[k] = float(res.final[k])
        return TrainingOutcome(model=res.model, privacy=res.privacy, details=details)


# --- budget ledger (dp_training.ledger, when present) -------------------------------------------------
# The ledger composes example-level guarantees of a data set. A client-level guarantee covers adding or
# removing a whole client; adding/removing one *example* changes one client's clipped update by at most
# 2*clip, so the example-level event recorded in the ledger uses half the noise multiplier (conservative).
def _ledger_begin(context, cfg, clients: int):
    try:
        from dp_training import ledger as ledger_lib
        from federated import accounting
    except ImportError:
        context.log("[federated] dp_training.ledger not available: the run is not recorded in a budget ledger")
        return None, None
    q = min(1.0, cfg.clients_per_round / clients)
    delta = cfg.dp_delta if cfg.dp_delta is not None else accounting.default_delta(clients)
    planned = ledger_lib.PlannedRun(fingerprint=context.dataset_fingerprint,
                                    noise_multiplier=cfg.dp_noise_multiplier / 2.0, sampling_rate=q,
                                    steps=cfg.rounds, delta=delta, sampling="poisson",
                                    accountant=cfg.accountant, trainer="federated",
                                    dataset_name=context.dataset_name)
    if cfg.sampling != "poisson":
        context.log("[federated] fixed-size client sampling is not an event the ledger composes: "
                    "the run is NOT recorded in the budget ledger (use --sampling poisson)")
        return None, None
    led = ledger_lib.PrivacyLedger(context.workdir)
    return led, led.begin_run(planned)


def _ledger_finish(led, run_id, status, cfg, res, rounds_released):
    steps = rounds_released
    if led is None:
        return
    extra = {"privacy_unit": "example (from client-level DP-FedAvg, noise multiplier halved)",
             "client_level_noise_multiplier": cfg.dp_noise_multiplier}
    if res is not None and res.privacy:
        extra["client_level_epsilon"] = res.privacy["epsilon"]
    led.finish_run(run_id, status, steps, extra=extra)
