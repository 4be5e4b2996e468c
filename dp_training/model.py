"""The platform's one model builder (every trainer kind gets it through ``TrainerContext.build_model``).

Scaled numerics (``core.features``: public ranges -> [0, 1]) standardised with the DP normalisation
(fixed Normalization layers, no trainable weights) + one-hot categoricals over the public domains ->
Concatenate -> Dense(ReLU)... -> one logit. Only Dense layers carry trainable weights, which is what DP-SGD's
fast gradient clipping, TFF and TF-Encrypted need.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import tensorflow as tf

from core.dataset import DatasetSpec
from core.features import NUM_OOV_BUCKETS, categorical_key, numeric_key
from dp_training.preprocessing import NormalizationStats


def bucket_sizes(spec: DatasetSpec) -> Dict[str, int]:
    """Number of one-hot buckets (public domain + one out-of-vocabulary bucket) per categorical column."""
    domains = spec.public_domains()
    return {c: len(domains[c].values) + NUM_OOV_BUCKETS for c in spec.categorical_features}


def build_model(spec: DatasetSpec, buckets: Mapping[str, int], normalization: Optional[NormalizationStats] = None,
                hidden_units: Sequence[int] = (64, 64), seed: int = 0) -> tf.keras.Model:
    """Scaled numerics standardised with the DP ``normalization`` (None: identity, e.g. before it is released)
    + one-hot categoricals -> Dense(ReLU)... -> one logit. Only Dense layers carry trainable weights."""
    inputs, parts = {}, []
    for column in spec.feature_columns:
        if column.kind == "numeric":
            key = numeric_key(column.name)
            inputs[key] = tf.keras.Input(shape=(1,), name=key, dtype=tf.float32)
            mean = normalization.mean[key] if normalization else 0.0
            std = normalization.std[key] if normalization else 1.0
            parts.append(tf.keras.layers.Normalization(mean=[mean], variance=[std * std],
                                                       name=f"{key}_dp_norm")(inputs[key]))
        else:
            key = categorical_key(column.name)
            inputs[key] = tf.keras.Input(shape=(1,), name=key, dtype=tf.int64)
            parts.append(tf.keras.layers.CategoryEncoding(
                num_tokens=buckets[column.name], output_mode="one_hot", name=f"{key}_one_hot")(inputs[key]))
    x = tf.keras.layers.Concatenate(name="features")(parts)
    init = tf.keras.initializers.GlorotUniform
    for i, units in enumerate(hidden_units):
        x = tf.keras.layers.Dense(units, activation="relu", kernel_initializer=init(seed + i), name=f"dense_{i}")(x)
    logit = tf.keras.layers.Dense(1, kernel_initializer=init(seed + 99), name="logit")(x)
    return tf.keras.Model(inputs=inputs, outputs=logit, name=f"{spec.name}_mlp")
