"""Transform's ``preprocessing_fn``: public functions only, nothing estimated from the private rows.

Numeric features: the declared ``log1p``, clipping to the reference schema's public range, and scaling that
range to [0, 1] (a missing value becomes the range's midpoint, 0.5). The model standardises these scaled
values with means and standard deviations released by the privacy layer (``dp_training.preprocessing``),
inside the run's guarantee.

Categorical features: ids in the reference schema's public domain (in its order); values outside it and
missing values map to one out-of-vocabulary id (= the domain's size). No vocabulary is computed from the
data, so removing a row never changes the model's vocabulary or its shape.

The graph has no analyzers: it is saved with the model, so serving takes raw features.
"""
from __future__ import annotations

import tensorflow as tf

from core.dataset import CategoricalDomain, DatasetSpec
from core.features import categorical_key, numeric_key


def _squeeze_dense(x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(x, [-1])


def _sparse_to_vector(x: tf.SparseTensor, default) -> tf.Tensor:
    """[batch, 1] SparseTensor (at most one value per row) -> dense [batch] with ``default`` where absent."""
    dense = tf.sparse.to_dense(
        tf.SparseTensor(x.indices, x.values, [x.dense_shape[0], 1]), default_value=default)
    return tf.reshape(dense, [-1])


def scale_numeric(values: tf.Tensor, low: float, high: float, log1p: bool) -> tf.Tensor:
    """Public scaling: (clip(log1p?(x), low, high) - low) / (high - low), in [0, 1]; NaN -> 0.5."""
    values = tf.cast(values, tf.float32)
    if log1p:
        values = tf.math.log1p(tf.maximum(values, 0.0))
    scaled = (tf.clip_by_value(values, low, high) - low) / (high - low)
    return tf.where(tf.math.is_nan(scaled), tf.constant(0.5, tf.float32), scaled)


def domain_ids(values: tf.Tensor, domain: CategoricalDomain) -> tf.Tensor:
    """Position of each string in the public domain; the domain's size for anything else."""
    keys = tf.constant(list(domain.values), tf.string)
    eq = tf.equal(tf.reshape(values, [-1, 1]), tf.reshape(keys, [1, -1]))
    found = tf.reduce_any(eq, axis=1)
    ids = tf.argmax(tf.cast(eq, tf.int32), axis=1, output_type=tf.int64)
    return tf.where(found, ids, tf.constant(len(domain.values), tf.int64))


def preprocessing_fn(inputs, custom_config):
    spec = DatasetSpec.from_json_dict(custom_config["dataset"])
    if spec.is_image:  # pixels scaled by the declared public range (pipeline/image_pipeline.py)
        from pipeline.image_pipeline import image_preprocessing_fn
        return image_preprocessing_fn(inputs, spec)
    domains = spec.public_domains()
    outputs = {}
    for column in spec.feature_columns:
        x = inputs[column.name]
        domain = domains[column.name]
        if column.kind == "numeric":
            if isinstance(x, tf.SparseTensor):
                values = _sparse_to_vector(tf.SparseTensor(x.indices, tf.cast(x.values, tf.float32),
                                                           x.dense_shape), float("nan"))
            else:
                values = tf.cast(_squeeze_dense(x), tf.float32)
            outputs[numeric_key(column.name)] = scale_numeric(values, domain.low, domain.high, column.log1p)
        else:
            if isinstance(x, tf.SparseTensor):
                if x.dtype != tf.string:  # a categorical column that happens to hold numbers
                    x = tf.SparseTensor(x.indices, tf.strings.as_string(x.values), x.dense_shape)
                values = _sparse_to_vector(x, tf.constant("", tf.string))
            else:
                values = _squeeze_dense(x)
                if values.dtype != tf.string:
                    values = tf.strings.as_string(values)
            outputs[categorical_key(column.name)] = domain_ids(values, domain)
    label = inputs[spec.label_feature]
    outputs[spec.label_feature] = (_sparse_to_vector(label, tf.constant(0, tf.int64))
                                   if isinstance(label, tf.SparseTensor) else _squeeze_dense(label))
    return outputs
