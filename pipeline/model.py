"""The Keras model over transformed features, and its export with TF Serving signatures.

Model: scaled numerics standardised with DP statistics (fixed Normalization layers) + one-hot (CategoryEncoding)
categoricals over the public domains -> Concatenate -> Dense(ReLU)... -> 1 logit. Only Dense layers carry
trainable weights, which is what DP-SGD's fast gradient clipping, TFF and TF-Encrypted need.

Exported signatures (on a SavedModel that embeds the Transform graph, so callers send raw features):
- ``serving_default``: ``examples`` (serialized tf.Example) -> ``probabilities``, ``logits``;
- ``predict_raw``: one tensor per raw feature (numerics float32, NaN = missing; categoricals string,
  "" = missing) -> ``probabilities``, ``logits``;
- ``classify``: ``inputs`` (serialized tf.Example) -> ``classes`` ["0","1"], ``scores`` [1-p, p].
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from core.dataset import DatasetSpec
from core.pushed import PushedVersion
from dp_training.preprocessing import NormalizationStats
from core.features import NUM_OOV_BUCKETS, categorical_key, numeric_key
from dp_training.model import bucket_sizes, build_model  # noqa: F401  (re-exported for the pipeline)


def _model_inputs(model: tf.keras.Model, transformed: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    return {name: tf.reshape(transformed[name], [-1, 1]) for name in model.input_names}


def _raw_input_signature(spec: DatasetSpec) -> Dict[str, tf.TensorSpec]:
    return {c.name: tf.TensorSpec([None], tf.float32 if c.kind == "numeric" else tf.string, name=c.name)
            for c in spec.feature_columns}


def _dense_to_raw_features(spec: DatasetSpec, raw_feature_spec, tensors: Mapping[str, tf.Tensor]):
    """predict_raw's dense tensors -> what the Transform graph expects (SparseTensors for VarLen features)."""
    features = {}
    for column in spec.feature_columns:
        x = tensors[column.name]
        feature_spec = raw_feature_spec[column.name]
        present = tf.logical_not(tf.math.is_nan(x)) if column.kind == "numeric" else tf.not_equal(x, "")
        if column.kind == "numeric" and feature_spec.dtype == tf.int64:
            x = tf.cast(tf.round(tf.where(present, x, 0.0)), tf.int64)
        elif column.kind == "numeric":
            x = tf.cast(x, feature_spec.dtype)
        if isinstance(feature_spec, tf.io.VarLenFeature):
            rows = tf.where(present)[:, 0]
            indices = tf.stack([rows, tf.zeros_like(rows)], axis=1)
            features[column.name] = tf.SparseTensor(indices, tf.boolean_mask(x, present),
                                                    tf.stack([tf.shape(x, out_type=tf.int64)[0], 1]))
        else:
            features[column.name] = tf.reshape(x, [-1, 1])
    return features


def export_serving_model(model: tf.keras.Model, spec: DatasetSpec, tf_transform_output: tft.TFTransformOutput,
                         serving_model_dir: str, normalization: Optional[NormalizationStats] = None) -> None:
    model.tft_layer = tf_transform_output.transform_features_layer()
    raw_feature_spec = tf_transform_output.raw_feature_spec()
    raw_feature_spec.pop(spec.label_feature, None)

    def predict(raw_features):
        transformed = model.tft_layer(raw_features)
        logits = tf.reshape(model(_model_inputs(model, transformed), training=False), [-1])
        return {"probabilities": tf.sigmoid(logits), "logits": logits}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(examples):
        return predict(tf.io.parse_example(examples, raw_feature_spec))

    @tf.function(input_signature=[_raw_input_signature(spec)])
    def serve_raw(features):
        return predict(_dense_to_raw_features(spec, raw_feature_spec, features))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(inputs):
        p = predict(tf.io.parse_example(inputs, raw_feature_spec))["probabilities"]
        n = tf.shape(p)[0]
        classes = tf.tile(tf.constant([["0", "1"]]), [n, 1])
        return {"classes": classes, "scores": tf.stack([1.0 - p, p], axis=1)}

    # A tf.function with a dict input_signature takes the dict as its single argument; expose each raw
    # feature as a named keyword input of the signature instead.
    raw_concrete = serve_raw.get_concrete_function()

    @tf.function(input_signature=list(_raw_input_signature(spec).values()))
    def serve_raw_flat(*tensors):
        return raw_concrete(dict(zip([c.name for c in spec.feature_columns], tensors)))

    model.save(serving_model_dir, save_format="tf", signatures={
        "serving_default": serve_examples.get_concrete_function(),
        "predict_raw": serve_raw_flat.get_concrete_function(),
        "classify": classify.get_concrete_function(),
    })
    version = PushedVersion(serving_model_dir)
    version.write_preprocessing(preprocessing_description(spec, normalization))
    version.write_dataset(spec)   # how to read raw rows for this model


def preprocessing_description(spec: DatasetSpec, normalization: Optional[NormalizationStats]) -> list:
    """What the model computes from raw features, as plain numbers in model-input order (for clients that
    preprocess themselves, such as TF-Encrypted's): public vocabularies, and per numeric feature
    ``z = (clip(log1p?(x), clip[0], clip[1]) - mean) / std`` where ``clip`` is the public range and mean/std are
    the DP normalisation (covered by the guarantee), expressed in the clipped feature's units."""
    domains = spec.public_domains()
    description = []
    for column in spec.feature_columns:
        domain = domains[column.name]
        if column.kind == "numeric":
            key = numeric_key(column.name)
            width = domain.high - domain.low
            m = normalization.mean[key] if normalization else 0.0
            s = normalization.std[key] if normalization else 1.0
            description.append({"name": column.name, "kind": "numeric", "log1p": column.log1p,
                                "clip": [domain.low, domain.high], "missing": domain.low + 0.5 * width,
                                "mean": domain.low + m * width, "std": s * width})
        else:
            description.append({"name": column.name, "kind": "categorical", "vocabulary": list(domain.values),
                                "num_oov_buckets": NUM_OOV_BUCKETS})
    return description
