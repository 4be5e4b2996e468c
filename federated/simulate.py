"""Pipeline-free entry point: ``federated.simulate(SimulationConfig(...)) -> FederatedResult``.

The simulation runs the same privacy protocol as the pipeline's Trainer (``dp_training.protocol``): plan from
public inputs (``plan_run``), reserve the planned event in the data source's ledger (``RunProtocol``; refused
before any row is used if it would overspend), release the DP normalisation statistics, train with the
``federated`` kind, charge what was released and state one guarantee. Outputs in ``output_dir``:

* ``privacy.json``: the guarantee (``Guarantee.to_json()``), public;
* ``metrics.csv``, ``metrics.json``, ``accuracy.png``, ``checkpoints/``: PRIVATE (per-round and per-client
  figures computed without DP, marked so in metrics.json), not covered by the guarantee.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from federated.engine import FederatedConfig, FederatedResult

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "adult")
PRIVACY_FILE = "privacy.json"


@dataclasses.dataclass
class SimulationConfig(FederatedConfig):
    """A federated run on a raw data set described by ``dataset.json`` (default: the vendored Adult data set).

    ``dp_noise_multiplier``: None or 0 (not private), a number > 0, or ``"auto"`` (calibrated to
    ``privacy["target_epsilon"]``, default 3). ``privacy``: the run's privacy arguments, as ``privtrain run``'s
    (target_epsilon, delta, accountant, preprocessing_epsilon, budget_epsilon, ledger, allow_non_private)."""

    dp_noise_multiplier: Any = None
    data_dir: str = DEFAULT_DATA
    output_dir: Optional[str] = None
    train_sample: Optional[int] = None  # about this many training rows, chosen row-stably (tests, quick looks)
    eval_sample: Optional[int] = None
    hidden: Tuple[int, ...] = (64,)
    privacy: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def trainer_args(self) -> Dict[str, Any]:
        from federated.trainer import DEFAULTS

        return {k: getattr(self, k) for k in DEFAULTS}


def simulate(config: SimulationConfig, *, log: Callable[[str], None] = print, data=None,
             ledger=None) -> FederatedResult:
    """Loads the data with the platform's reader, plans, reserves, trains, charges; returns the result.

    ``data`` (a :class:`federated.data.TabularData` of the same ``data_dir``) skips loading, e.g. to reuse one
    load across runs. ``ledger``: a ``dp_training.ledger.Ledger`` (default: ``privacy["ledger"]`` or the default
    ledger path). The output directory holds private outputs (per-round counts and losses, checkpoints): it is
    created 0700 (an existing one open to other users is refused, ``core.private_files.private_dir``) and
    everything is written under an owner-only umask, the caller's restored after."""
    from core.private_files import owner_only, private_dir

    with owner_only():
        if config.output_dir:
            private_dir(config.output_dir, "output directory")
        return _simulate(config, log=log, data=data, ledger=ledger)


def _simulate(config: SimulationConfig, *, log: Callable[[str], None], data, ledger) -> FederatedResult:
    from core.features import numeric_key
    from dp_training.protocol import not_covered, planning_rows, run_private_training
    from federated.data import load_tabular
    from federated.trainer import FederatedTrainer, resolve_partition_clients

    if data is None:
        data = load_tabular(config.data_dir)
    spec = data.spec
    source = spec.require_privacy()
    n_all = int(data.train_labels.shape[0])
    exact = n_all if source.relation == "replace_one" else None
    data = data.sample(config.train_sample, config.eval_sample, planning_rows(source, exact), seed=config.seed)
    kind = FederatedTrainer()
    args = resolve_partition_clients(spec, config.trainer_args())
    # DP normalisation is accounted per row: only for a row unit (column units use the public scaling alone).
    numeric_keys = [numeric_key(c) for c in spec.numeric_features] if source.unit == "row" else []
    output_dir = config.output_dir
    scratch = output_dir or tempfile.mkdtemp(prefix="privtrain-federated-")
    result = run_private_training(
        spec, kind.name, args, dict(config.privacy), data.train_features, data.train_labels, data.eval_features,
        data.eval_labels, scratch_dir=scratch, kind=kind,
        log=lambda m: log(m if m.startswith("[federated]") else f"[federated] {m}"),
        hidden_units=tuple(config.hidden), not_covered=not_covered(spec, extra=(
            "per-round and per-client metrics (metrics.csv/json, accuracy.png, checkpoints): private, computed "
            "without DP, kept in the output directory",)), numeric_keys=numeric_keys, ledger=ledger)
    outcome, guarantee = result.outcome, result.guarantee
    details = outcome.private_details
    files = dict(details.get("files") or {})
    if output_dir:
        files["privacy"] = os.path.join(output_dir, PRIVACY_FILE)
        with open(files["privacy"], "w", encoding="utf-8") as f:
            f.write(guarantee.dumps())
    return FederatedResult(history=details["history"], shards=details["shards"], model=outcome.model,
                           final=details["final"], output_dir=output_dir,
                           resumed_from_round=details["resumed_from_round"], files=files,
                           privacy=guarantee.to_json(), guarantee=guarantee)


__all__ = ["SimulationConfig", "simulate", "DEFAULT_DATA"]
