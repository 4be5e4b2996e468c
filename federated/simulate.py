"""Pipeline-free entry point: ``federated.simulate(SimulationConfig(...)) -> FederatedResult``."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

from federated.engine import FederatedConfig, FederatedResult, run_federated

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "adult")


@dataclasses.dataclass
class SimulationConfig(FederatedConfig):
    """A federated run on a raw CSV data set (default: the vendored Adult data set)."""

    data_dir: str = DEFAULT_DATA
    output_dir: Optional[str] = None
    train_sample: Optional[int] = None  # use a random subset of the training rows (tests, quick looks)
    eval_sample: Optional[int] = None
    hidden: Tuple[int, ...] = (64,)


def simulate(config: SimulationConfig, *, log: Callable[[str], None] = print,
             on_round: Optional[Callable[[Dict[str, Any]], None]] = None, data=None) -> FederatedResult:
    """Loads and preprocesses the data, partitions it into clients and runs the rounds with TFF.

    ``data`` (a :class:`federated.data.TabularData`) skips loading, e.g. to reuse one load across runs.
    Writes metrics.csv / metrics.json / accuracy.png / checkpoints under ``config.output_dir`` if set.
    """
    from federated.data import build_mlp, load_tabular

    if data is None:
        data = load_tabular(config.data_dir)
    data = data.subsample(config.train_sample, config.eval_sample, seed=config.seed)
    numeric, vocab = list(data.numeric), data.vocab_sizes
    hidden = tuple(config.hidden)

    def build_model():
        return build_mlp(numeric, vocab, hidden)

    return run_federated(data.train_features, data.train_labels, data.eval_features, data.eval_labels,
                         build_model, config, output_dir=config.output_dir, log=log, on_round=on_round,
                         model_key=("mlp", tuple(numeric), tuple(sorted(vocab.items())), hidden))
