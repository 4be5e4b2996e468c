"""Export a pushed Keras model to the ``encrypted_model/`` exchange format (platform env, TF 2.15).

    python -m encrypted_serving.export PUSHED_VERSION_DIR OUT_DIR

The pushed model (see docs/encrypted_serving.md) is a Keras SavedModel: transformed-feature inputs ->
CategoryEncoding one-hot + Concatenate -> Dense(relu)... -> Dense(1) logit, with the client-side
preprocessing at ``<version_dir>/assets.extra/preprocessing.json``. We load it with
``tf.keras.models.load_model``, take its Dense layers in order (kernel, bias, activation), check they
form a chain ending in a 1-unit linear logit, and write model.json, weights.npz and preprocessing.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import numpy as np

from encrypted_serving import model_format as mf
from encrypted_serving import preprocessing as pp

PREPROCESSING_REL = os.path.join("assets.extra", mf.PREPROCESSING_JSON)


class ExportError(mf.ModelFormatError):
    pass


def _activation_name(layer) -> str:
    act = layer.get_config().get("activation")
    if isinstance(act, dict):   # serialized activation object
        act = act.get("config", {}).get("name", act.get("class_name"))
    act = act or "linear"
    if act not in mf.ACTIVATIONS:
        raise ExportError("Dense layer %r has activation %r; only %s are supported in encrypted serving"
                          % (layer.name, act, mf.ACTIVATIONS))
    return act


def keras_dense_stack(model):
    """[(kernel, bias, activation)] of the model's Dense layers in order, validated as a chain."""
    import tensorflow as tf
    dense = []

    def walk(layer):
        if isinstance(layer, tf.keras.layers.Dense):
            dense.append(layer)
        elif hasattr(layer, "layers") and layer is not model:   # nested Model / Sequential
            for sub in layer.layers:
                walk(sub)

    for layer in model.layers:
        walk(layer)
    if not dense:
        raise ExportError("the model has no Dense layers")
    stack = []
    for layer in dense:
        if not layer.use_bias:
            raise ExportError("Dense layer %r has no bias; the export expects bias vectors" % layer.name)
        kernel, bias = (np.asarray(v, dtype=np.float32) for v in layer.get_weights())
        stack.append((kernel, bias, _activation_name(layer)))
    for (k0, _, _), (k1, _, _) in zip(stack, stack[1:]):
        if k0.shape[1] != k1.shape[0]:
            raise ExportError("Dense layers do not form a chain: %s then %s" % (k0.shape, k1.shape))
    return stack


def export_keras_model(model, out_dir: str, preprocessing: Optional[list] = None) -> str:
    stack = keras_dense_stack(model)
    layers = [{"units": int(k.shape[1]), "activation": a} for k, _, a in stack]
    config = mf.make_config(int(stack[0][0].shape[0]), layers)
    weights = {}
    for i, (k, b, _) in enumerate(stack):
        weights[mf.kernel_key(i)] = k
        weights[mf.bias_key(i)] = b
    if preprocessing is not None:
        pp.validate_spec(preprocessing, expected_dim=config["input_dim"])
    return mf.save_model(out_dir, config, weights, preprocessing)


def export_pushed_model(version_dir: str, out_dir: str) -> str:
    """Pushed SavedModel version dir -> encrypted_model dir (returned)."""
    if not os.path.isfile(os.path.join(version_dir, "saved_model.pb")):
        raise ExportError("%s is not a SavedModel directory (no saved_model.pb)" % version_dir)
    pre_path = os.path.join(version_dir, PREPROCESSING_REL)
    if not os.path.isfile(pre_path):
        raise ExportError("%s has no %s: the pipeline must write the client-side preprocessing there"
                          % (version_dir, PREPROCESSING_REL))
    preprocessing = pp.load_spec(pre_path)
    import tensorflow as tf
    try:
        model = tf.keras.models.load_model(version_dir, compile=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError("cannot load %s as a Keras model: %s" % (version_dir, e)) from e
    if not isinstance(model, tf.keras.Model):
        raise ExportError("%s did not load as a Keras model (got %s)" % (version_dir, type(model).__name__))
    return export_keras_model(model, out_dir, preprocessing)


def find_pushed_model(workdir: str) -> Optional[str]:
    """Newest pushed SavedModel version dir under workdir: one holding assets.extra/preprocessing.json."""
    found = []
    for root, dirs, files in os.walk(workdir):
        if os.path.basename(root) == "assets.extra" and mf.PREPROCESSING_JSON in files:
            vdir = os.path.dirname(root)
            if os.path.isfile(os.path.join(vdir, "saved_model.pb")):
                base = os.path.basename(vdir)
                found.append((int(base) if base.isdigit() else -1, os.path.getmtime(vdir), vdir))
    return max(found)[2] if found else None


def prepare_model(model: str, out_dir: str) -> str:
    """An encrypted_model dir for `model`: used as is if it holds model.json, else exported from a pushed
    SavedModel version dir (or the newest one under a workdir) into out_dir."""
    if os.path.isfile(os.path.join(model, mf.MODEL_JSON)):
        return model
    version_dir = model
    if not os.path.isfile(os.path.join(model, "saved_model.pb")):
        version_dir = find_pushed_model(model)
        if version_dir is None:
            raise ExportError("%s is neither an encrypted_model dir (model.json), a pushed SavedModel "
                              "version dir, nor a workdir holding one" % model)
    return export_pushed_model(version_dir, out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="export a pushed Keras model to privtrain's encrypted_model format")
    ap.add_argument("version_dir")
    ap.add_argument("out_dir")
    args = ap.parse_args(argv)
    try:
        out = export_pushed_model(args.version_dir, args.out_dir)
    except (mf.ModelFormatError, pp.PreprocessingError) as e:
        sys.stderr.write("error: %s\n" % e)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
