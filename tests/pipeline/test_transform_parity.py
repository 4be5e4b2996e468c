"""The public transform has three copies that must agree on every raw row (table-driven, Adult's public domains):

* the TF Transform graph (``pipeline/transform.py``'s ``preprocessing_fn``, traced in a ``tf.function`` on the
  SparseTensors TFX feeds it: a missing value is an absent entry) — the reference, embedded in the pushed model;
* the numpy transform in ``core/features.py`` (``transform_columns``: platform-side clients and benchmarks);
* the encrypted client's copy in ``encrypted_serving/preprocessing.py`` (``transform`` over the pushed model's
  ``preprocessing.json``): it runs in the TF-Encrypted environment too, which imports nothing of the platform's
  packages (core/ included), so it keeps its own copy and is checked here against the same graph, including
  the DP normalisation the description folds in.

Edge cases: missing values, out-of-vocabulary categories, values outside the public range on both sides,
log1p features (negative, zero, huge), non-finite numbers."""
import math
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from core.dataset import load_dataset  # noqa: E402
from core.features import categorical_key, numeric_key, transform_columns  # noqa: E402
from encrypted_serving import preprocessing as pp  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-6

BASE = {"age": "39", "workclass": "State-gov", "fnlwgt": "77516", "education": "Bachelors", "education-num": "13",
        "marital-status": "Never-married", "occupation": "Adm-clerical", "relationship": "Not-in-family",
        "race": "White", "sex": "Male", "capital-gain": "2174", "capital-loss": "0", "hours-per-week": "40",
        "native-country": "United-States"}

# (what the row tests, the fields that differ from BASE); None = missing (the data set's "?").
CASES = [
    ("an ordinary row", {}),
    ("every value missing", {k: None for k in BASE}),
    ("out-of-vocabulary categories", {"workclass": "Astronaut", "education": "bachelors", "native-country": "Mars",
                                      "sex": "Unknown"}),
    ("numerics below the public range", {"age": "3", "fnlwgt": "-10", "education-num": "0", "hours-per-week": "0"}),
    ("numerics above the public range", {"age": "500", "fnlwgt": "99999999", "education-num": "17",
                                         "hours-per-week": "168"}),
    ("numerics on the range's edges", {"age": "17", "fnlwgt": "1500000", "education-num": "16", "hours-per-week": "1"}),
    ("log1p of zero and of a negative value", {"capital-gain": "0", "capital-loss": "-5"}),
    ("log1p above the public range", {"capital-gain": "99999999", "capital-loss": "1e12"}),
    ("log1p inside the range", {"capital-gain": "99999", "capital-loss": "1902"}),
    ("fractional values", {"age": "38.5", "capital-gain": "0.5", "hours-per-week": "40.25"}),
    ("infinities clip to the range", {"age": "inf", "fnlwgt": "-inf", "capital-gain": "inf", "capital-loss": "-inf"}),
    ("not-a-number is missing", {"age": "nan", "capital-gain": "nan"}),
    ("missing categoricals only", {"workclass": None, "occupation": None, "native-country": None}),
    ("missing numerics only", {"age": None, "capital-gain": None, "hours-per-week": None}),
]
ROWS = [dict(BASE, **diff) for _, diff in CASES]
IDS = [name for name, _ in CASES]


@pytest.fixture(scope="module")
def spec():
    return load_dataset(os.path.join(REPO, "data", "adult"))


@pytest.fixture(scope="module")
def graph(spec):
    return tf_transform(spec, ROWS)


def _number(v):
    """A raw field as the Transform graph sees it: absent when missing or not a number (NaN)."""
    if v is None:
        return None
    x = float(v)
    return None if math.isnan(x) else x


def tf_transform(spec, rows):
    """The TF Transform graph on these rows: VarLen (sparse) raw features, missing = absent entry."""
    from pipeline.transform import preprocessing_fn

    def sparse(values, dtype):
        present = [(i, v) for i, v in enumerate(values) if v is not None]
        return tf.SparseTensor(indices=tf.constant([[i, 0] for i, _ in present] or np.zeros((0, 2)), tf.int64),
                               values=tf.constant([v for _, v in present], dtype),
                               dense_shape=[len(values), 1])

    inputs = {}
    for c in spec.feature_columns:
        if c.kind == "numeric":
            inputs[c.name] = sparse([_number(r[c.name]) for r in rows], tf.float32)
        else:
            inputs[c.name] = sparse([r[c.name] for r in rows], tf.string)
    inputs[spec.label_feature] = sparse([0] * len(rows), tf.int64)
    config = {"dataset": {k: v for k, v in spec.to_json_dict().items()}}
    out = tf.function(lambda x: preprocessing_fn(x, config))(inputs)
    return {k: v.numpy() for k, v in out.items()}


def core_transform(spec, rows):
    columns = {}
    for c in spec.feature_columns:
        if c.kind == "numeric":
            columns[c.name] = [float("nan") if r[c.name] is None else float(r[c.name]) for r in rows]
        else:
            columns[c.name] = ["" if r[c.name] is None else r[c.name] for r in rows]
    return transform_columns(spec, columns)


def test_the_table_covers_its_edge_cases(spec):
    domains = spec.public_domains()
    numerics = [c for c in spec.feature_columns if c.kind == "numeric"]
    assert any(c.log1p for c in numerics) and any(not c.log1p for c in numerics)
    for c in numerics:   # below, above and missing for every numeric feature
        d = domains[c.name]
        xs = [_number(r[c.name]) for r in ROWS]
        scale = (lambda x: math.log1p(max(x, 0.0))) if c.log1p else (lambda x: x)
        assert None in xs
        assert any(x is not None and scale(x) > d.high for x in xs), c.name
        assert any(x is not None and scale(x) <= d.low for x in xs), c.name
    for name in ("workclass", "native-country", "sex"):   # missing and out-of-vocabulary categories
        values = [r[name] for r in ROWS]
        assert None in values and any(v is not None and v not in domains[name].values for v in values), name


@pytest.mark.parametrize("row", range(len(ROWS)), ids=IDS)
def test_core_numpy_transform_matches_the_tf_transform_graph(spec, graph, row):
    mine = core_transform(spec, [ROWS[row]])
    for c in spec.feature_columns:
        key = numeric_key(c.name) if c.kind == "numeric" else categorical_key(c.name)
        got, want = mine[key].reshape(-1), graph[key].reshape(-1)[row:row + 1]
        if c.kind == "numeric":
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"{IDS[row]}: {c.name}")
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{IDS[row]}: {c.name}")


@pytest.mark.parametrize("normalised", [False, True], ids=["public-scaling", "with-dp-normalisation"])
def test_encrypted_client_copy_matches_the_tf_transform_graph(spec, graph, normalised):
    # The pushed model's preprocessing.json (pipeline/model.py) folds the DP normalisation (z = (scaled - m) / s)
    # into mean/std in clipped units; the encrypted client applies it to raw strings and one-hots categoricals.
    from dp_training.preprocessing import NormalizationStats
    from pipeline.model import preprocessing_description

    numerics = [c for c in spec.feature_columns if c.kind == "numeric"]
    mean = {numeric_key(c.name): (0.1 + 0.05 * i if normalised else 0.0) for i, c in enumerate(numerics)}
    std = {numeric_key(c.name): (0.25 + 0.05 * i if normalised else 1.0) for i, c in enumerate(numerics)}
    description = preprocessing_description(spec, NormalizationStats(mean, std))
    x = pp.transform(ROWS, description)
    col = 0
    for c, entry in zip(spec.feature_columns, description):
        assert entry["name"] == c.name
        if c.kind == "numeric":
            key = numeric_key(c.name)
            want = (graph[key].astype(np.float64) - mean[key]) / std[key]
            for r in range(len(ROWS)):
                assert abs(x[r, col] - want[r]) <= TOL * max(1.0, 1.0 / std[key]), (IDS[r], c.name, x[r, col], want[r])
            col += 1
        else:
            width = len(entry["vocabulary"]) + 1
            block = x[:, col:col + width]
            assert (block.sum(axis=1) == 1).all() and set(np.unique(block)) <= {0.0, 1.0}, c.name
            for r in range(len(ROWS)):
                assert block[r].argmax() == graph[categorical_key(c.name)][r], (IDS[r], c.name)
            col += width
    assert col == x.shape[1]
