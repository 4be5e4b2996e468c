"""The public input box and the model owner's truncation certificate (issue 19, item 2; pure numpy).

The MPC attack itself (huge inputs, outputs vs the clamped plaintext) is
test_gateway_service.py::test_attack_huge_inputs_are_clamped_inside_the_mpc.
"""
import json

import numpy as np
import pytest

from encrypted_serving import bounds
from encrypted_serving import model_format as mf
from encrypted_serving import preprocessing as pp

from conftest import random_mlp


def test_input_box_from_public_clip_ranges_and_one_hot(adult_spec):
    spec = [{"name": "a", "kind": "numeric", "mean": 10.0, "std": 2.0, "log1p": False, "clip": [4.0, 30.0]},
            {"name": "b", "kind": "numeric", "mean": 0.0, "std": 1.0, "log1p": False},
            {"name": "c", "kind": "categorical", "vocabulary": ["x", "y"], "num_oov_buckets": 1}]
    low, high = bounds.input_box(spec)
    np.testing.assert_allclose(low, [-3.0, -bounds.DEFAULT_Z_BOUND, 0, 0, 0])
    np.testing.assert_allclose(high, [10.0, bounds.DEFAULT_Z_BOUND, 1, 1, 1])
    # every legitimate client input (the preprocessing clips to the same public range) lies inside the box
    x = pp.transform([{"a": "1000", "b": "3", "c": "y"}, {"a": "-5", "b": None, "c": "zzz"}], spec)
    np.testing.assert_array_equal(bounds.clamp(x, low, high), x)


def test_the_export_refuses_a_model_that_can_overflow_the_truncation(tmp_path, adult_spec):
    config, weights = random_mlp(pp.input_dim(adult_spec))
    d = mf.save_model(str(tmp_path / "ok"), config, weights, adult_spec)
    cfg = mf.load_config(d)
    bounds.check(cfg)
    bounds.verify(cfg, weights)
    assert max(cfg["certificate"]["max_abs_pre_activation"]) < bounds.TRUNCATION_BOUND
    big = dict(weights)
    big[mf.kernel_key(0)] = big[mf.kernel_key(0)] * 1e8     # reaches 2**30 somewhere on the box
    with pytest.raises(bounds.BoundsError, match="refusing to export: layer 0"):
        mf.save_model(str(tmp_path / "big"), config, big, adult_spec)
    # the interval bound is sound: no point of the box (corners included) exceeds it
    low, high = bounds.box_of(cfg)
    rng = np.random.default_rng(0)
    pts = np.where(rng.random((2000, len(low))) < 0.5, low, high)
    h = pts
    for i, layer in enumerate(config["layers"]):
        pre = h @ weights[mf.kernel_key(i)].astype(np.float64)
        assert np.abs(pre).max() <= cfg["certificate"]["max_abs_pre_activation"][i] + 1e-9
        h = pre + weights[mf.bias_key(i)]
        h = np.maximum(h, 0) if layer["activation"] == "relu" else h


def test_the_service_refuses_an_uncertified_or_mismatched_model(tmp_path, adult_spec):
    config, weights = random_mlp(pp.input_dim(adult_spec))
    d = mf.save_model(str(tmp_path / "m"), config, weights, adult_spec)
    cfg = mf.load_config(d)
    with pytest.raises(bounds.BoundsError, match="no input_box"):
        bounds.check(config)                                   # an old export: no box, no certificate
    forged = json.loads(json.dumps(cfg))
    forged["certificate"]["max_abs_pre_activation"][0] = 2.0 ** 31
    with pytest.raises(bounds.BoundsError, match="below the truncation bound"):
        bounds.check(forged)
    other = {k: v * 2 for k, v in weights.items()}
    with pytest.raises(bounds.BoundsError, match="other weights"):
        bounds.verify(cfg, other)


def test_attack_a_widened_input_box_is_refused_at_load(tmp_path, adult_spec):
    """Review 2 B5: the certificate did not bind the input box: widening input_box in public/model.json after the
    export (the MPC then clamps to the wider box, where the certified bounds no longer hold) went unnoticed."""
    config, weights = random_mlp(pp.input_dim(adult_spec))
    cfg = mf.load_config(mf.save_model(str(tmp_path / "m"), config, weights, adult_spec))
    bounds.check(cfg)                                          # control: the exported model loads
    wide = json.loads(json.dumps(cfg))
    wide["input_box"]["high"] = [v * 1000.0 + 1.0 for v in wide["input_box"]["high"]]
    low, high = bounds.box_of(wide)
    assert max(bounds.layer_bounds(config, weights, low, high)) > max(cfg["certificate"]["max_abs_pre_activation"])
    with pytest.raises(bounds.BoundsError, match="another input_box"):
        bounds.check(wide)
    with pytest.raises(bounds.BoundsError, match="another input_box"):
        bounds.verify(wide, weights)                           # the owner's side refuses it too
