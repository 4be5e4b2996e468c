"""Client partitioners: split training rows into client shards (lists of row indices).

Row-stable partitions (a row's client depends only on that row and a public seed, never on the other rows or
on their number), usable for private runs:

* ``hash``: IID-like. Client = keyed hash (BLAKE2b, key from the public seed) of the row's content mod
  ``clients``. Shard sizes are multinomial, not equal.
* ``hash-dirichlet:ALPHA``: label skew (as Hsu et al. 2019). For every label value a Dirichlet(alpha)
  proportion vector over the clients is drawn from the public seed; a row goes to the client where its
  keyed hash, read as a number in [0, 1), falls in the cumulative proportions of its label.
* ``hash:NAME``: client = keyed hash of the row's value of column NAME mod ``clients`` (every row with the
  same value lands in the same client: one person's rows stay together when NAME identifies the person).
* ``column:NAME``: natural silos, one client per value of the categorical column NAME in its *public* domain
  (the reference schema), plus one client for missing/out-of-domain values: ``clients`` = domain size + 1,
  whatever values occur in the data (clients without rows are empty).

Permutation partitions (the assignment depends on all rows and their number: removing one row moves rows
between clients), for non-private runs only:

* ``iid``: a random permutation cut into ``clients`` near-equal shards.
* ``dirichlet:ALPHA``: label skew by cutting each label's permuted rows by Dirichlet proportions; empty
  shards are refilled with one row from the largest shard.

A row's "content" is its model input (the public transform of the raw row, ``core.features``) and its
label: a deterministic function of the row alone.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

ROW_STABLE = ("hash", "hash-dirichlet", "hash-column", "column")
KINDS_HELP = "hash | hash-dirichlet:ALPHA | hash:COLUMN | column:COLUMN | iid | dirichlet:ALPHA"


@dataclasses.dataclass(frozen=True)
class PartitionSpec:
    kind: str  # "hash" | "hash-dirichlet" | "hash-column" | "column" | "iid" | "dirichlet"
    alpha: Optional[float] = None
    column: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "PartitionSpec":
        text = (text or "hash").strip()
        if text in ("iid", "hash"):
            return cls(text)
        for prefix, kind in (("dirichlet:", "dirichlet"), ("hash-dirichlet:", "hash-dirichlet")):
            if text.startswith(prefix):
                try:
                    alpha = float(text.split(":", 1)[1])
                except ValueError:
                    raise ValueError(f"{prefix}ALPHA needs a number, got {text!r}; e.g. {prefix}0.5") from None
                if not alpha > 0 or not np.isfinite(alpha):
                    raise ValueError(f"dirichlet alpha must be a finite number > 0, got {alpha}")
                return cls(kind, alpha=alpha)
        if text.startswith("column:") and text.split(":", 1)[1]:
            return cls("column", column=text.split(":", 1)[1])
        if text.startswith("hash:") and text.split(":", 1)[1]:
            return cls("hash-column", column=text.split(":", 1)[1])
        raise ValueError(f"unknown partition {text!r}: use {KINDS_HELP}")

    @property
    def row_stable(self) -> bool:
        return self.kind in ROW_STABLE

    @property
    def groups_by(self) -> Optional[str]:
        """The column whose rows always share a client (None: rows are assigned one by one)."""
        return self.column if self.kind in ("column", "hash-column") else None

    def __str__(self) -> str:
        if self.kind in ("dirichlet", "hash-dirichlet"):
            return f"{self.kind}:{self.alpha:g}"
        if self.kind == "column":
            return f"column:{self.column}"
        if self.kind == "hash-column":
            return f"hash:{self.column}"
        return self.kind


# ------------------------------------------------------------------------------------------ row-stable
def _key(seed) -> bytes:
    """The hash key: a function of the public seed only (an int, or a list of ints for derived streams)."""
    return hashlib.sha256(f"privtrain-federated-partition/{seed}".encode()).digest()[:32]


def row_hashes(features: Mapping[str, np.ndarray], labels: Optional[np.ndarray], seed,
               keys: Optional[Sequence[str]] = None) -> np.ndarray:
    """uint64 keyed hash of each row's content (``keys`` of ``features``, default all, plus the label)."""
    keys = sorted(features) if keys is None else list(keys)
    cols = [np.ascontiguousarray(np.asarray(features[k]).reshape(len(np.asarray(features[k])), -1))
            for k in keys]
    if labels is not None:
        cols.append(np.asarray(labels, np.float32).reshape(-1, 1))
    n = cols[0].shape[0] if cols else 0
    key = _key(seed)
    out = np.empty(n, np.uint64)
    for i in range(n):
        h = hashlib.blake2b(digest_size=8, key=key)
        for c in cols:
            h.update(c[i].tobytes())
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def hash_partition(hashes: np.ndarray, num_clients: int) -> List[np.ndarray]:
    if num_clients < 1:
        raise ValueError(f"need at least 1 client, got {num_clients}")
    client = (np.asarray(hashes, np.uint64) % np.uint64(num_clients)).astype(np.int64)
    return _group(client, num_clients)


def dirichlet_proportions(num_clients: int, alpha: float, seed: int, label_values=(0.0, 1.0)) -> Dict[float, np.ndarray]:
    """Per-label client proportions, drawn from the public seed only (never from the data)."""
    rng = np.random.default_rng([int(seed), 7])
    return {float(v): rng.dirichlet(np.full(num_clients, alpha)) for v in label_values}


def hash_dirichlet_partition(hashes: np.ndarray, labels: np.ndarray, num_clients: int, alpha: float,
                             seed: int) -> List[np.ndarray]:
    labels = np.asarray(labels, np.float32).reshape(-1)
    bad = set(np.unique(labels).tolist()) - {0.0, 1.0}
    if bad:
        raise ValueError(f"hash-dirichlet expects 0/1 labels, found {sorted(bad)[:3]}")
    props = dirichlet_proportions(num_clients, alpha, seed)
    u = np.asarray(hashes, np.uint64).astype(np.float64) / 2.0 ** 64
    client = np.empty(labels.shape[0], np.int64)
    for v, p in props.items():
        idx = np.flatnonzero(labels == v)
        client[idx] = np.minimum(np.searchsorted(np.cumsum(p), u[idx], side="right"), num_clients - 1)
    return _group(client, num_clients)


def column_partition(ids: np.ndarray, num_clients: int) -> List[np.ndarray]:
    """One client per public domain id (0 .. num_clients-1, the last one being out-of-domain/missing)."""
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_clients):
        raise ValueError(f"column ids outside 0..{num_clients - 1}: the column's public domain and the "
                         "number of clients disagree")
    return _group(ids, num_clients)


def _group(client: np.ndarray, num_clients: int) -> List[np.ndarray]:
    order = np.argsort(client, kind="stable")
    bounds = np.searchsorted(client[order], np.arange(num_clients + 1))
    return [np.sort(order[bounds[c]:bounds[c + 1]]) for c in range(num_clients)]


# ----------------------------------------------------------------------------------------- permutation
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


# ------------------------------------------------------------------------------------------- dispatch
def column_feature(features: Mapping[str, np.ndarray], name: str) -> str:
    """The model input of raw column ``name`` (``core.features`` naming: NAME_id / NAME_z)."""
    from core.features import categorical_key, numeric_key

    for key in (categorical_key(name), numeric_key(name), name):
        if key in features:
            return key
    raise ValueError(f"partition by column {name!r}: no such model input (have {sorted(features)[:8]}...); "
                     "name a column of dataset.json")


def make_shards(spec: PartitionSpec, features: Mapping[str, np.ndarray], labels: np.ndarray, num_clients: int,
                seed: int) -> List[np.ndarray]:
    """``num_clients`` shards (row indices; row-stable kinds may leave some empty)."""
    n = int(np.asarray(labels).shape[0])
    if spec.kind == "iid":
        return iid(n, num_clients, np.random.default_rng([seed, 1]))
    if spec.kind == "dirichlet":
        return dirichlet(labels, num_clients, spec.alpha, np.random.default_rng([seed, 1]))
    if spec.kind == "hash":
        return hash_partition(row_hashes(features, labels, seed), num_clients)
    if spec.kind == "hash-dirichlet":
        return hash_dirichlet_partition(row_hashes(features, labels, seed), labels, num_clients, spec.alpha, seed)
    if spec.kind == "hash-column":
        key = column_feature(features, spec.column)
        return hash_partition(row_hashes({key: features[key]}, None, seed), num_clients)
    if spec.kind == "column":
        key = column_feature(features, spec.column)
        if not np.issubdtype(np.asarray(features[key]).dtype, np.integer):
            raise ValueError(f"partition column:{spec.column} needs a categorical column (one client per public "
                             f"domain value); for a numeric column use hash:{spec.column}")
        return column_partition(features[key], num_clients)
    raise ValueError(f"unknown partition kind {spec.kind!r}")


def shard_summary(shards: Sequence[np.ndarray], labels: np.ndarray) -> Dict[str, object]:
    """Shard sizes and label mix (share of positives) plus a label-skew score. PRIVATE: computed from the rows.

    ``label_skew`` is the example-weighted mean total-variation distance between each shard's label
    distribution and the global one (0 = every shard has the global mix; binary labels: max 1-p).
    """
    labels = np.asarray(labels).reshape(-1)
    sizes = np.asarray([s.shape[0] for s in shards])
    pos = np.asarray([float(labels[s].mean()) if s.shape[0] else np.nan for s in shards])
    glob = float(labels.mean()) if labels.size else 0.0
    nonempty = sizes > 0
    skew = float(np.sum(sizes[nonempty] * np.abs(pos[nonempty] - glob)) / max(sizes.sum(), 1))
    return {
        "clients": int(len(shards)),
        "nonempty_clients": int(nonempty.sum()),
        "rows": int(sizes.sum()),
        "size_min": int(sizes.min()), "size_median": float(np.median(sizes)), "size_max": int(sizes.max()),
        "positive_rate_global": glob,
        "positive_rate_min": float(np.nanmin(pos)) if nonempty.any() else None,
        "positive_rate_max": float(np.nanmax(pos)) if nonempty.any() else None,
        "label_skew": skew,
        "sizes": sizes.tolist(),
        "positive_rates": [None if np.isnan(p) else round(float(p), 4) for p in pos],
    }
