"""Pure (numpy) tests of the exchange format and client-side preprocessing: run in either env."""
import json
import math
import os

import numpy as np
import pytest

from encrypted_serving import model_format as mf
from encrypted_serving import preprocessing as pp

from conftest import ADULT, random_mlp

SPEC = [
    {"name": "age", "kind": "numeric", "mean": 40.0, "std": 10.0, "log1p": False},
    {"name": "gain", "kind": "numeric", "mean": 1.0, "std": 2.0, "log1p": True},
    {"name": "flat", "kind": "numeric", "mean": 3.0, "std": 0.0, "log1p": False},
    {"name": "sex", "kind": "categorical", "vocabulary": ["Male", "Female"], "num_oov_buckets": 1},
]


def test_transform_numeric_categorical_missing_and_oov():
    rows = [{"age": "50", "gain": "0", "flat": "4", "sex": "Female"},
            {"age": None, "gain": "?x", "sex": "Other"},
            {"age": " 30 ", "gain": str(math.e - 1), "flat": "3", "sex": None}]
    x = pp.transform(rows, SPEC)
    assert x.shape == (3, 3 + 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], [1.0, -0.5, 1.0, 0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(x[1], [0.0, 0.0, 0.0, 0, 0, 1], atol=1e-6)   # missing -> 0 / OOV slot
    np.testing.assert_allclose(x[2], [-1.0, 0.0, 0.0, 0, 0, 1], atol=1e-6)


def test_spec_validation_errors():
    with pytest.raises(pp.PreprocessingError, match="num_oov_buckets"):
        pp.validate_spec([{"name": "a", "kind": "categorical", "vocabulary": ["x"], "num_oov_buckets": 2}])
    with pytest.raises(pp.PreprocessingError, match="input_dim=7"):
        pp.validate_spec(SPEC, expected_dim=7)
    assert pp.validate_spec({"features": SPEC}) == SPEC


def test_read_adult_rows_with_and_without_label(tmp_path, adult_desc):
    rows, labels = pp.read_raw_rows(os.path.join(ADULT, "adult.test"), adult_desc, limit=5)
    assert len(rows) == 5 and labels[:3] == [0, 0, 1]      # test labels carry a trailing '.'
    f = tmp_path / "features.txt"
    f.write_text("39, ?, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, "
                 "United-States\n\n")
    rows, labels = pp.read_raw_rows(str(f), adult_desc)
    assert labels == [None] and rows[0]["workclass"] is None and rows[0]["age"] == "39"
    f.write_text("1, 2, 3\n")
    with pytest.raises(pp.PreprocessingError, match="3 values"):
        pp.read_raw_rows(str(f), adult_desc)


def test_model_dir_round_trip_and_validation(tmp_path, adult_spec):
    config, weights = random_mlp(pp.input_dim(adult_spec))
    d = mf.save_model(str(tmp_path / "m"), config, weights, adult_spec)
    loaded_config = mf.load_config(d)
    assert {k: v for k, v in loaded_config.items() if k not in ("input_box", "certificate")} == config
    assert loaded_config["certificate"]["weights_sha256"]      # the export certifies the model (bounds.py)
    loaded = mf.load_weights(d)
    assert set(loaded) == set(weights) and all(np.array_equal(loaded[k], weights[k]) for k in weights)
    assert mf.load_preprocessing(d) == adult_spec
    bad = dict(weights)
    bad[mf.kernel_key(1)] = bad[mf.kernel_key(1)][:3]
    with pytest.raises(mf.ModelFormatError, match="dense_1/kernel"):
        mf.save_model(str(tmp_path / "bad"), config, bad)
    cfg = json.loads(json.dumps(config))
    cfg["layers"][-1]["activation"] = "relu"
    with pytest.raises(mf.ModelFormatError, match="logit"):
        mf.validate_config(cfg)


def test_forward_and_sigmoid():
    config, weights = random_mlp(4, hidden=(3,))
    x = np.random.default_rng(1).normal(size=(5, 4))
    h = np.maximum(x @ weights["dense_0/kernel"] + weights["dense_0/bias"], 0)
    np.testing.assert_allclose(mf.forward_logits(config, weights, x),
                               (h @ weights["dense_1/kernel"] + weights["dense_1/bias"])[:, 0], rtol=1e-6)
    np.testing.assert_allclose(mf.sigmoid(np.array([-800.0, 0.0, 800.0])), [0.0, 0.5, 1.0])
