"""Client partitioners: split training rows into client shards (lists of row indices).

* ``iid``: a random permutation cut into ``num_clients`` near-equal shards.
* ``dirichlet:ALPHA``: label skew. For every label ``k``, a Dirichlet(alpha) draw over the clients
  decides which share of that label's rows each client gets (Hsu et al. 2019). Small alpha -> each
  client sees mostly one label. Shards may be very small; empty shards are refilled with one row
  from the largest shard so every client has data.
* ``column:NAME``: natural silos, one client per distinct value of a feature column (e.g.
  ``native-country``); ``num_clients`` is ignored (the number of distinct values decides).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PartitionSpec:
    kind: str  # "iid" | "dirichlet" | "column"
    alpha: Optional[float] = None
    column: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "PartitionSpec":
        text = (text or "iid").strip()
        if text == "iid":
            return cls("iid")
        if text.startswith("dirichlet:"):
            alpha = float(text.split(":", 1)[1])
            if not alpha > 0:
                raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
            return cls("dirichlet", alpha=alpha)
        if text.startswith("column:") and text.split(":", 1)[1]:
            return cls("column", column=text.split(":", 1)[1])
        raise ValueError(f"unknown partition {text!r}: use iid, dirichlet:ALPHA or column:NAME")

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "column":
            return f"column:{self.column}"
        return "iid"


def iid(num_rows: int, num_clients: int, rng: np.random.Generator) -> List[np.ndarray]:
    if num_clients < 1 or num_clients > num_rows:
        raise ValueError(f"need 1 <= clients <= rows, got clients={num_clients}, rows={num_rows}")
    perm = rng.permutation(num_rows)
    return [np.sort(s) for s in np.array_split(perm, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> List[np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    if num_clients < 1 or num_clients > labels.shape[0]:
        raise ValueError(f"need 1 <= clients <= rows, got clients={num_clients}, rows={labels.shape[0]}")
    shards: List[List[int]] = [[] for _ in range(num_clients)]
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        props = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(props) * idx.shape[0]).astype(int)[:-1]
        for c, part in enumerate(np.split(idx, cuts)):
            shards[c].extend(part.tolist())
    # every client needs at least one row: move one from the largest shard
    for c in range(num_clients):
        if not shards[c]:
            big = max(range(num_clients), key=lambda j: len(shards[j]))
            shards[c].append(shards[big].pop())
    return [np.sort(np.asarray(s, np.int64)) for s in shards]


def find_column(features: Mapping[str, np.ndarray], name: str) -> str:
    """Resolves a raw column name to a feature key (exact, then normalised/suffixed transformed names)."""
    if name in features:
        return name
    norm = lambda s: s.lower().replace("-", "_")  # noqa: E731
    cands = [k for k in features if norm(k) == norm(name)]
    cands = cands or [k for k in features if norm(k).startswith(norm(name))]
    cands = cands or [k for k in features if norm(name) in norm(k)]
    if len(cands) != 1:
        raise ValueError(f"column partition: cannot resolve {name!r} to one feature among "
                         f"{sorted(features)} (candidates: {cands})")
    return cands[0]


def by_column(values: np.ndarray, min_rows: int = 1) -> List[np.ndarray]:
    values = np.asarray(values)
    if values.ndim > 1:
        values = values.reshape(values.shape[0], -1)
        if values.shape[1] > 1:  # one-hot / multi-dim encoded: use the argmax as the id
            values = values.argmax(axis=1)
        values = values.reshape(-1)
    uniq, inverse = np.unique(values, return_inverse=True)
    shards = [np.flatnonzero(inverse == i) for i in range(uniq.shape[0])]
    return [s for s in shards if s.shape[0] >= min_rows]


def make_shards(spec: PartitionSpec, features: Mapping[str, np.ndarray], labels: np.ndarray, num_clients: int,
              rng: np.random.Generator) -> List[np.ndarray]:
    n = int(np.asarray(labels).shape[0])
    if spec.kind == "iid":
        return iid(n, num_clients, rng)
    if spec.kind == "dirichlet":
        return dirichlet(labels, num_clients, spec.alpha, rng)
    if spec.kind == "column":
        return by_column(features[find_column(features, spec.column)])
    raise ValueError(spec.kind)


def shard_summary(shards: Sequence[np.ndarray], labels: np.ndarray) -> Dict[str, object]:
    """Shard sizes and label mix (share of positives) plus a label-skew score.

    ``label_skew`` is the example-weighted mean total-variation distance between each shard's label
    distribution and the global one (0 = every shard has the global mix; binary labels: max 1-p).
    """
    labels = np.asarray(labels).reshape(-1)
    sizes = np.asarray([s.shape[0] for s in shards])
    pos = np.asarray([float(labels[s].mean()) if s.shape[0] else 0.0 for s in shards])
    glob = float(labels.mean())
    skew = float(np.sum(sizes * np.abs(pos - glob)) / max(sizes.sum(), 1))
    return {
        "clients": int(len(shards)),
        "rows": int(sizes.sum()),
        "size_min": int(sizes.min()), "size_median": float(np.median(sizes)), "size_max": int(sizes.max()),
        "positive_rate_global": glob,
        "positive_rate_min": float(pos.min()), "positive_rate_max": float(pos.max()),
        "label_skew": skew,
        "sizes": sizes.tolist(),
        "positive_rates": [round(float(p), 4) for p in pos],
    }
