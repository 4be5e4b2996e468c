"""Small numpy preprocessing of a raw CSV data set (Adult) for pipeline-free simulations.

Numeric columns: optional log1p, then z-score with the training split's mean/std.
Categorical columns: integer ids from the training split's vocabulary (id 0 = missing/unknown).
The model built by :func:`build_mlp` one-hot encodes the ids, so the same feature dict serves both
this path and partitioning by a column (``column:native-country`` partitions by that id).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np


@dataclasses.dataclass
class TabularData:
    name: str
    train_features: Dict[str, np.ndarray]
    train_labels: np.ndarray
    eval_features: Dict[str, np.ndarray]
    eval_labels: np.ndarray
    numeric: List[str]
    categorical: Dict[str, List[str]]  # name -> vocabulary (index 0 is "<unknown>")

    @property
    def vocab_sizes(self) -> Dict[str, int]:
        return {k: len(v) for k, v in self.categorical.items()}

    def subsample(self, n_train: Optional[int], n_eval: Optional[int], seed: int = 0) -> "TabularData":
        rng = np.random.default_rng(seed)

        def take(feats, labels, n):
            if n is None or n >= labels.shape[0]:
                return feats, labels
            idx = np.sort(rng.choice(labels.shape[0], size=n, replace=False))
            return {k: v[idx] for k, v in feats.items()}, labels[idx]

        tf_, tl = take(self.train_features, self.train_labels, n_train)
        ef, el = take(self.eval_features, self.eval_labels, n_eval)
        return dataclasses.replace(self, train_features=tf_, train_labels=tl, eval_features=ef, eval_labels=el)


def _read_rows(path: str, delimiter: str, n_cols: int) -> List[List[str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("|"):
                continue
            parts = [p.strip() for p in line.split(delimiter)]
            if len(parts) != n_cols:
                continue
            rows.append(parts)
    return rows


def load_tabular(data_dir: str) -> TabularData:
    """Loads a ``dataset.json``-described CSV data set (e.g. ``data/adult``) into numpy features."""
    spec_path = os.path.join(data_dir, "dataset.json")
    if not os.path.isfile(spec_path):
        raise FileNotFoundError(f"{spec_path} not found: --data must be a directory with dataset.json "
                                "and the split files it names (e.g. data/adult); nothing is downloaded")
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    cols = spec["columns"]
    delim = spec.get("delimiter", ",")
    missing = spec.get("missing_value", "?")
    splits = {}
    for split in ("train", "eval"):
        p = os.path.join(data_dir, spec["splits"][split])
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} (split {split!r} of {spec_path}) not found")
        splits[split] = _read_rows(p, delim, len(cols))

    numeric = [c["name"] for c in cols if c["type"] == "numeric"]
    categorical_cols = [c["name"] for c in cols if c["type"] == "categorical"]
    label_col = next(c for c in cols if c["type"] == "label")
    li = [c["name"] for c in cols].index(label_col["name"])
    col_index = {c["name"]: i for i, c in enumerate(cols)}

    def labels(rows):
        suffix = label_col.get("strip_suffix", "")
        out = []
        for r in rows:
            v = r[li]
            if suffix and v.endswith(suffix):
                v = v[: -len(suffix)]
            out.append(1.0 if v == label_col["positive"] else 0.0)
        return np.asarray(out, np.float32)

    def numeric_raw(rows, c):
        i = col_index[c["name"]]
        vals = np.asarray([np.nan if r[i] == missing else float(r[i]) for r in rows], np.float64)
        if c.get("log1p"):
            vals = np.log1p(np.maximum(vals, 0.0))
        return vals

    train_rows, eval_rows = splits["train"], splits["eval"]
    feats = {"train": {}, "eval": {}}
    for c in cols:
        if c["type"] != "numeric":
            continue
        tr = numeric_raw(train_rows, c)
        mean, std = np.nanmean(tr), np.nanstd(tr) or 1.0
        for split, rows in (("train", train_rows), ("eval", eval_rows)):
            v = (numeric_raw(rows, c) - mean) / std
            feats[split][c["name"]] = np.nan_to_num(v, nan=0.0).astype(np.float32)
    vocabs = {}
    for name in categorical_cols:
        i = col_index[name]
        vocab = ["<unknown>"] + sorted({r[i] for r in train_rows if r[i] != missing})
        lookup = {v: k for k, v in enumerate(vocab)}
        vocabs[name] = vocab
        for split, rows in (("train", train_rows), ("eval", eval_rows)):
            feats[split][name] = np.asarray([lookup.get(r[i], 0) for r in rows], np.int64)
    return TabularData(spec.get("name", os.path.basename(data_dir)), feats["train"], labels(train_rows),
                       feats["eval"], labels(eval_rows), numeric, vocabs)


def build_mlp(numeric: List[str], vocab_sizes: Mapping[str, int], hidden: Tuple[int, ...] = (64,),
              seed: Optional[int] = None):
    """Uncompiled functional Keras MLP: dict of features -> one logit (numeric + one-hot categoricals)."""
    import tensorflow as tf

    inputs, parts = {}, []
    for name in numeric:
        inputs[name] = tf.keras.Input(shape=(), dtype=tf.float32, name=name)
        parts.append(tf.keras.layers.Reshape((1,))(inputs[name]))
    for name, size in vocab_sizes.items():
        inputs[name] = tf.keras.Input(shape=(), dtype=tf.int64, name=name)
        parts.append(tf.keras.layers.CategoryEncoding(num_tokens=size, output_mode="one_hot")(inputs[name]))
    x = tf.keras.layers.Concatenate()(parts)
    init = lambda i: tf.keras.initializers.GlorotUniform(seed=None if seed is None else seed + i)  # noqa: E731
    for i, units in enumerate(hidden):
        x = tf.keras.layers.Dense(units, activation="relu", kernel_initializer=init(i))(x)
    logit = tf.keras.layers.Dense(1, kernel_initializer=init(len(hidden)))(x)
    return tf.keras.Model(inputs=inputs, outputs=logit)
