"""Export round trip (platform env: TF 2.15 Keras): pushed-style Keras SavedModel -> encrypted_model/."""
import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
if not tf.__version__.startswith("2.15"):
    pytest.skip("export runs in the platform env (tensorflow 2.15), found %s" % tf.__version__,
                allow_module_level=True)

from encrypted_serving import export  # noqa: E402
from encrypted_serving import model_format as mf  # noqa: E402
from encrypted_serving import preprocessing as pp  # noqa: E402

from conftest import ADULT  # noqa: E402


def pipeline_style_model(spec, hidden=(8, 8), seed=0):
    """Like the pipeline's pushed model: transformed inputs -> one-hot + Concatenate -> Dense(relu)... -> Dense(1)."""
    tf.keras.utils.set_random_seed(seed)
    inputs, blocks = {}, []
    for e in spec:
        if e["kind"] == "numeric":
            inp = tf.keras.Input(shape=(1,), name=e["name"], dtype=tf.float32)
            blocks.append(inp)
        else:
            inp = tf.keras.Input(shape=(1,), name=e["name"], dtype=tf.int64)
            blocks.append(tf.keras.layers.CategoryEncoding(num_tokens=len(e["vocabulary"]) + 1,
                                                           output_mode="one_hot")(inp))
        inputs[e["name"]] = inp
    h = tf.keras.layers.Concatenate()(blocks)
    for units in hidden:
        h = tf.keras.layers.Dense(units, activation="relu")(h)
    out = tf.keras.layers.Dense(1, name="logit")(h)
    return tf.keras.Model(inputs, out)


def transformed_features(rows, spec):
    """The pipeline's Transform output for rows: z-scores and vocabulary indices (OOV = len(vocab))."""
    x = pp.transform(rows, spec)
    feats, col = {}, 0
    for e in spec:
        w = pp.block_width(e)
        block = x[:, col:col + w]
        feats[e["name"]] = block if e["kind"] == "numeric" else np.argmax(block, axis=1)[:, None].astype(np.int64)
        col += w
    return feats, x


def test_export_round_trip(tmp_path, adult_spec, adult_desc):
    model = pipeline_style_model(adult_spec)
    version_dir = tmp_path / "serving_model" / "1700000000"
    model.save(str(version_dir), save_format="tf")
    (version_dir / "assets.extra").mkdir()
    (version_dir / "assets.extra" / "preprocessing.json").write_text(json.dumps(adult_spec))

    out = export.export_pushed_model(str(version_dir), str(tmp_path / "encrypted_model"))
    config = mf.load_config(out)
    weights = mf.load_weights(out, config)
    assert config["input_dim"] == pp.input_dim(adult_spec)
    assert [l["units"] for l in config["layers"]] == [8, 8, 1]
    assert [l["activation"] for l in config["layers"]] == ["relu", "relu", "linear"]
    assert mf.load_preprocessing(out) == adult_spec

    rows, _ = pp.read_raw_rows(os.path.join(ADULT, "adult.test"), adult_desc, limit=200)
    feats, x = transformed_features(rows, adult_spec)
    keras_logits = model.predict(feats, verbose=0)[:, 0]
    np.testing.assert_allclose(mf.forward_logits(config, weights, x), keras_logits, atol=1e-4)

    # Found from a workdir too (newest version dir holding assets.extra/preprocessing.json).
    from encrypted_serving.export import find_pushed_model, prepare_model
    assert find_pushed_model(str(tmp_path)) == str(version_dir)
    assert prepare_model(out, str(tmp_path / "unused")) == out


def test_export_rejects_unsupported_models(tmp_path, adult_spec):
    inp = tf.keras.Input(shape=(pp.input_dim(adult_spec),))
    model = tf.keras.Model(inp, tf.keras.layers.Dense(1, activation="sigmoid")(
        tf.keras.layers.Dense(4, activation="tanh")(inp)))
    with pytest.raises(mf.ModelFormatError, match="tanh"):
        export.export_keras_model(model, str(tmp_path / "x"), adult_spec)
    d = tmp_path / "nopre"
    model.save(str(d), save_format="tf")
    with pytest.raises(export.ExportError, match="preprocessing.json"):
        export.export_pushed_model(str(d), str(tmp_path / "y"))
