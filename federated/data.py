"""Raw rows -> model inputs for pipeline-free federated runs, with the platform's one reader and transform.

``load_tabular(dir)`` reads ``dataset.json`` (``core.dataset.load_dataset``), every row of both splits
by the data gate's rule (``core.dataset.read_rows``: a public split strictly, a damaged line stopping the load
with file and line; a private split row by row, a damaged line dropped or, under ``replace_one``, replaced by
the placeholder row, and a numeric cell that is not a number missing, so one private row never stops a run),
and applies the public transform (``core.features.transform_columns``: public
domains and ranges, nothing estimated from the rows). The model is ``dp_training.model.build_model``, with the
DP normalisation released by the privacy protocol (``federated.simulate``).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import numpy as np

from core.dataset import DatasetSpec, load_dataset, read_rows
from core.features import transform_columns


@dataclasses.dataclass
class TabularData:
    spec: DatasetSpec
    train_features: Dict[str, np.ndarray]   # model inputs {key: [n, 1]}
    train_labels: np.ndarray                # float32 0/1
    eval_features: Dict[str, np.ndarray]
    eval_labels: np.ndarray

    @property
    def name(self) -> str:
        return self.spec.name

    def sample(self, train_sample: Optional[int], eval_sample: Optional[int], planning_rows: int,
               seed: int = 0) -> "TabularData":
        """About ``train_sample`` training rows, chosen row-stably (each row kept iff its keyed hash falls
        below ``train_sample / planning_rows``: whether a row is kept never depends on the other rows), and
        ``eval_sample`` evaluation rows chosen at random."""
        from federated.partition import row_hashes

        tf_, tl = self.train_features, self.train_labels
        if train_sample is not None:
            if train_sample < 1:
                raise ValueError(f"train_sample must be >= 1, got {train_sample}")
            rate = min(1.0, float(train_sample) / float(planning_rows))
            u = row_hashes(tf_, tl, seed=[seed, 11]).astype(np.float64) / 2.0 ** 64
            keep = np.flatnonzero(u < rate)
            tf_, tl = {k: v[keep] for k, v in tf_.items()}, tl[keep]
        ef, el = self.eval_features, self.eval_labels
        if eval_sample is not None and eval_sample < el.shape[0]:
            idx = np.sort(np.random.default_rng([seed, 12]).choice(el.shape[0], size=eval_sample, replace=False))
            ef, el = {k: v[idx] for k, v in ef.items()}, el[idx]
        return dataclasses.replace(self, train_features=tf_, train_labels=tl, eval_features=ef, eval_labels=el)


def load_tabular(data_dir: str) -> TabularData:
    """Loads a ``dataset.json``-described data set (e.g. ``data/adult``) into model inputs."""
    spec = load_dataset(data_dir)
    train = read_rows(spec, "train")
    evaluation = read_rows(spec, "eval")
    return TabularData(spec, transform_columns(spec, train.columns), train.labels,
                       transform_columns(spec, evaluation.columns), evaluation.labels)


__all__ = ["TabularData", "load_tabular"]
