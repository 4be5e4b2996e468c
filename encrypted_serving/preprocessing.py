"""Client-side preprocessing in pure numpy: raw data-set rows -> the dense model-input vector.

This is a copy of the public transform (core/features.py, pipeline/transform.py) with the DP normalisation
and one-hot folded in: it runs in the TF-Encrypted environment too, which imports nothing of the platform's
packages, core/ included (tests/encrypted_serving/test_module_separation.py), so it cannot import core.features.
tests/pipeline/test_transform_parity.py holds both copies to the Transform graph, row by row.

It reproduces the pipeline's Transform from ``preprocessing.json``, a JSON list in model-input order of

* ``{"name": "age", "kind": "numeric", "mean": m, "std": s, "log1p": false, "clip": [lo, hi], "missing": v}``
  (``clip``/``missing`` optional: the public range the model clips to and the value a missing one takes):
  one column, z = (x' - mean) / std with x' = log1p(x) if log1p else x (z = x' - mean when std == 0,
  like tft.scale_to_z_score); a missing or unparsable value gives z = 0.
* ``{"name": "workclass", "kind": "categorical", "vocabulary": [...], "num_oov_buckets": 1}``:
  a one-hot block of width len(vocabulary) + 1; the value's index in the vocabulary, or the last
  (OOV) slot for a value not in the vocabulary or missing. Only num_oov_buckets == 1 is supported.

The dense input vector is the concatenation of the blocks in list order. (``{"features": [...]}`` is
accepted as an alias for the bare list.)

Raw rows are read with the data set's ``dataset.json`` (delimiter, missing-value token, column order),
e.g. Adult: comma+space separated, no header, ``?`` for missing. Runs in both environments.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np


class PreprocessingError(ValueError):
    """The preprocessing spec or a raw input file is unusable; the message says what."""


def block_width(entry: dict) -> int:
    return 1 if entry["kind"] == "numeric" else len(entry["vocabulary"]) + 1


def validate_spec(spec, expected_dim: Optional[int] = None) -> list:
    if isinstance(spec, dict) and "features" in spec:
        spec = spec["features"]
    if not isinstance(spec, list) or not spec:
        raise PreprocessingError("preprocessing.json must be a non-empty JSON list of feature entries")
    names = set()
    for i, e in enumerate(spec):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise PreprocessingError("preprocessing entry %d needs a string 'name'" % i)
        if e["name"] in names:
            raise PreprocessingError("preprocessing: feature %r appears twice" % e["name"])
        names.add(e["name"])
        kind = e.get("kind")
        if kind == "numeric":
            for key in ("mean", "std"):
                v = e.get(key)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    raise PreprocessingError("preprocessing %r: %r must be a finite number, got %r" % (e["name"], key, v))
            if e["std"] < 0:
                raise PreprocessingError("preprocessing %r: std must be >= 0" % e["name"])
            if not isinstance(e.get("log1p", False), bool):
                raise PreprocessingError("preprocessing %r: log1p must be true or false" % e["name"])
        elif kind == "categorical":
            vocab = e.get("vocabulary")
            if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
                raise PreprocessingError("preprocessing %r: vocabulary must be a list of strings" % e["name"])
            if len(set(vocab)) != len(vocab):
                raise PreprocessingError("preprocessing %r: vocabulary has duplicates" % e["name"])
            if e.get("num_oov_buckets", 1) != 1:
                raise PreprocessingError("preprocessing %r: only num_oov_buckets == 1 is supported, got %r"
                                         % (e["name"], e.get("num_oov_buckets")))
        else:
            raise PreprocessingError("preprocessing %r: kind must be 'numeric' or 'categorical', got %r"
                                     % (e["name"], kind))
    if expected_dim is not None:
        dim = input_dim(spec)
        if dim != expected_dim:
            raise PreprocessingError("preprocessing.json gives %d input columns but the model expects input_dim=%d"
                                     % (dim, expected_dim))
    return spec


def input_dim(spec: list) -> int:
    return sum(block_width(e) for e in spec)


def load_spec(path: str, expected_dim: Optional[int] = None) -> list:
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as e:
        raise PreprocessingError("cannot read preprocessing spec %s: %s" % (path, e)) from e
    except ValueError as e:
        raise PreprocessingError("%s is not valid JSON: %s" % (path, e)) from e
    return validate_spec(spec, expected_dim)


def transform(rows: Sequence[Dict[str, Optional[str]]], spec: list) -> np.ndarray:
    """rows: dicts feature name -> raw string value (None or absent = missing). Returns float32 [n, D]."""
    spec = validate_spec(spec)
    n = len(rows)
    out = np.zeros((n, input_dim(spec)), dtype=np.float32)
    col = 0
    for e in spec:
        name = e["name"]
        if e["kind"] == "numeric":
            mean, std, log1p = float(e["mean"]), float(e["std"]), bool(e.get("log1p", False))
            clip = e.get("clip")  # the public range the model clips to (log1p units), when the export has one
            missing = e.get("missing")
            for r, row in enumerate(rows):
                # with the public range, +-inf clips to its ends like the Transform graph; without it, missing
                x = _to_float(row.get(name), infinite=clip is not None)
                if x is not None and log1p:
                    x = math.log1p(max(x, 0.0)) if clip is not None else (math.log1p(x) if x > -1.0 else None)
                if x is None:
                    if missing is None:
                        continue  # missing -> z = 0
                    x = float(missing)
                elif clip is not None:
                    x = min(max(x, float(clip[0])), float(clip[1]))
                out[r, col] = (x - mean) / std if std > 0 else (x - mean)
            col += 1
        else:
            vocab = {v: j for j, v in enumerate(e["vocabulary"])}
            oov = len(vocab)
            for r, row in enumerate(rows):
                v = row.get(name)
                j = vocab.get(v.strip(), oov) if isinstance(v, str) else oov
                out[r, col + j] = 1.0
            col += oov + 1
    return out


def _to_float(v, infinite: bool = False) -> Optional[float]:
    """A raw value as a number; None when missing, unparsable, NaN, or infinite (unless ``infinite``)."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        x = float(v)
    else:
        try:
            x = float(str(v).strip())
        except ValueError:
            return None
    return x if math.isfinite(x) or (infinite and not math.isnan(x)) else None


# ---------------------------------------------------------------------------------------------- raw rows

def load_dataset_description(path_or_dir: str) -> dict:
    path = path_or_dir
    if os.path.isdir(path):
        path = os.path.join(path, "dataset.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise PreprocessingError("cannot read data-set description %s: %s" % (path, e)) from e


def read_raw_rows(path: str, dataset: dict, limit: Optional[int] = None
                  ) -> Tuple[List[Dict[str, Optional[str]]], List[Optional[int]]]:
    """Read raw rows (the data set's own format) into dicts; returns (rows, labels).

    A row may hold all columns (label included) or only the feature columns. labels[i] is 1/0 when the
    row has a recognisable label, else None. Blank lines are skipped; a header line is not supported
    unless dataset.json says ``"header": true``.
    """
    delim = dataset.get("delimiter", ",")
    missing = dataset.get("missing_value", "?")
    columns = dataset["columns"]
    all_names = [c["name"] for c in columns]
    feature_names = [c["name"] for c in columns if c.get("type", c.get("kind")) != "label"]
    label_col = next((c for c in columns if c.get("type", c.get("kind")) == "label"), None)
    rows, labels = [], []
    try:
        f = open(path)
    except OSError as e:
        raise PreprocessingError("cannot read input file %s: %s" % (path, e)) from e
    with f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and dataset.get("header"):
                continue
            line = line.strip()
            if not line or line.startswith("|"):
                continue
            if limit is not None and len(rows) >= limit:
                break
            values = [v.strip() for v in line.split(delim)]
            if len(values) == len(all_names):
                names = all_names
            elif len(values) == len(feature_names):
                names = feature_names
            else:
                raise PreprocessingError("%s:%d: %d values, expected %d (all columns) or %d (features only)"
                                         % (path, lineno, len(values), len(all_names), len(feature_names)))
            row = {n: (None if v == missing or v == "" else v) for n, v in zip(names, values)}
            label = None
            if label_col is not None and row.get(label_col["name"]) is not None:
                raw = row[label_col["name"]]
                suffix = label_col.get("strip_suffix", "")
                if suffix and raw.endswith(suffix):
                    raw = raw[: -len(suffix)]
                if raw == label_col.get("positive"):
                    label = 1
                elif raw == label_col.get("negative"):
                    label = 0
            rows.append(row)
            labels.append(label)
    return rows, labels


def fit_spec(rows: Sequence[Dict[str, Optional[str]]], dataset: dict, max_vocab: int = 100) -> list:
    """Compute a preprocessing spec from raw rows (used for tests / stand-alone models, not the pipeline)."""
    spec = []
    for c in dataset["columns"]:
        kind = c.get("type", c.get("kind"))
        if kind == "numeric":
            log1p = bool(c.get("log1p", False))
            xs = [_to_float(r.get(c["name"])) for r in rows]
            xs = np.array([math.log1p(x) if log1p else x for x in xs if x is not None], dtype=np.float64)
            mean = float(xs.mean()) if xs.size else 0.0
            std = float(xs.std()) if xs.size else 0.0
            spec.append({"name": c["name"], "kind": "numeric", "mean": mean, "std": std, "log1p": log1p})
        elif kind == "categorical":
            counts: Dict[str, int] = {}
            for r in rows:
                v = r.get(c["name"])
                if v is not None:
                    counts[v] = counts.get(v, 0) + 1
            vocab = [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:max_vocab]
            spec.append({"name": c["name"], "kind": "categorical", "vocabulary": vocab, "num_oov_buckets": 1})
    return spec
