"""Names shared by Transform, the model and the client-side preprocessing export."""
from __future__ import annotations

import re

NUM_OOV_BUCKETS = 1


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def numeric_key(name: str) -> str:
    """Transformed (z-scored) numeric feature."""
    return f"{_safe(name)}_z"


def categorical_key(name: str) -> str:
    """Transformed categorical feature: vocabulary id, with unseen and missing values in the last bucket."""
    return f"{_safe(name)}_id"



# -- the public transform in numpy (the pipeline's Transform graph computes the same in TensorFlow) ----------
def scale_numeric_np(values, low: float, high: float, log1p: bool):
    """(clip(log1p?(x), low, high) - low) / (high - low) in [0, 1]; NaN -> 0.5 (see pipeline/transform.py)."""
    import numpy as np

    x = np.asarray(values, np.float64)
    if log1p:
        x = np.log1p(np.maximum(x, 0.0))
    scaled = (np.clip(x, low, high) - low) / (high - low)
    return np.where(np.isnan(scaled), 0.5, scaled).astype(np.float32)


def domain_ids_np(values, domain_values):
    """Position of each string in the public domain; len(domain) (the out-of-vocabulary id) otherwise."""
    import numpy as np

    index = {v: i for i, v in enumerate(domain_values)}
    oov = len(domain_values)
    return np.asarray([index.get(v, oov) for v in values], np.int64)


def transform_columns(spec, columns):
    """Raw columns ``{name: sequence}`` (numerics as floats with NaN for missing, categoricals as strings with
    "" for missing) -> model inputs ``{key: [n, 1]}``: the same public transform as pipeline/transform.py."""
    domains = spec.public_domains()
    out = {}
    for column in spec.feature_columns:
        d = domains[column.name]
        if column.kind == "numeric":
            out[numeric_key(column.name)] = scale_numeric_np(columns[column.name], d.low, d.high,
                                                             column.log1p).reshape(-1, 1)
        else:
            out[categorical_key(column.name)] = domain_ids_np(columns[column.name], d.values).reshape(-1, 1)
    return out
