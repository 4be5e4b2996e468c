"""Transform's ``preprocessing_fn``: numeric z-scores (optionally of log1p) and categorical vocabularies.

Missing numeric values become 0 after scaling (the mean); missing and unseen categorical values map to the
out-of-vocabulary bucket, the last id (= vocabulary size). The graph is saved with the model, so serving
takes raw features.
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_transform as tft

from dp_training.dataset import DatasetSpec
from pipeline.features import NUM_OOV_BUCKETS, categorical_key, numeric_key, vocabulary_name


def _squeeze_dense(x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(x, [-1])


def _sparse_to_vector(x: tf.SparseTensor, default) -> tf.Tensor:
    """[batch, 1] SparseTensor (at most one value per row) -> dense [batch] with ``default`` where absent."""
    dense = tf.sparse.to_dense(
        tf.SparseTensor(x.indices, x.values, [x.dense_shape[0], 1]), default_value=default)
    return tf.reshape(dense, [-1])


def preprocessing_fn(inputs, custom_config):
    spec = DatasetSpec.from_json_dict(custom_config["dataset"])
    outputs = {}
    for column in spec.feature_columns:
        x = inputs[column.name]
        if column.kind == "numeric":
            if isinstance(x, tf.SparseTensor):
                values = tf.cast(x.values, tf.float32)
                if column.log1p:
                    values = tf.math.log1p(values)
                z = tft.scale_to_z_score(tf.SparseTensor(x.indices, values, x.dense_shape))
                outputs[numeric_key(column.name)] = _sparse_to_vector(z, 0.0)
            else:
                values = tf.cast(_squeeze_dense(x), tf.float32)
                if column.log1p:
                    values = tf.math.log1p(values)
                outputs[numeric_key(column.name)] = tft.scale_to_z_score(values)
        else:
            if not isinstance(x, tf.SparseTensor):  # always present: every row has a value
                x = tf.sparse.from_dense(tf.reshape(x, [-1, 1]))
            if x.dtype != tf.string:  # a categorical column that happens to hold numbers
                x = tf.SparseTensor(x.indices, tf.strings.as_string(x.values), x.dense_shape)
            name = vocabulary_name(column.name)
            ids = tft.compute_and_apply_vocabulary(x, num_oov_buckets=NUM_OOV_BUCKETS, vocab_filename=name)
            oov_id = tft.experimental.get_vocabulary_size_by_name(name)
            ids = _sparse_to_vector(ids, tf.constant(-1, tf.int64))
            outputs[categorical_key(column.name)] = tf.where(ids < 0, oov_id, ids)
    label = inputs[spec.label_feature]
    outputs[spec.label_feature] = (_sparse_to_vector(label, tf.constant(0, tf.int64))
                                   if isinstance(label, tf.SparseTensor) else _squeeze_dense(label))
    return outputs
