"""DP-FedAvg's noise keyed from OS entropy: TFF's DP aggregator with TF Privacy queries whose Gaussian comes from
``dp_training.secure_noise`` instead of TensorFlow's process RNG.

TF Privacy's ``GaussianSumQuery`` (inside TFF's ``DifferentiallyPrivateFactory.gaussian_fixed/_adaptive``) draws
with ``tf.random_normal_initializer``: the TFF worker's process RNG (32-bit seeded). ``SecureGaussianSumQuery``
draws with stateless Philox from a key block held in its global state (field ``noise_key``, ``int64[4, 3]``):

* the round loop puts a fresh block (``secrets``) into every ``noise_key`` leaf of the server state right
  before each round (``with_fresh_noise_keys``) and keeps no copy;
* ``get_noised_result`` returns the state with the block zeroed, so the state TFF hands back (kept between
  rounds, checkpointed) never holds a key;
* a round whose block is zero (none injected) yields NaN, never noise anyone could predict.

The adaptive-clipping variant swaps both Gaussians of TF Privacy's ``QuantileAdaptiveClipSumQuery`` (the sum and
the below-estimate count of the quantile estimator) for secure ones; the accounting is unchanged.
"""
from __future__ import annotations

import collections
import functools
import numpy as np

from dp_training.secure_noise import KEY_BLOCK_SHAPE, fresh_key_block, stateless_gaussian_like

KEY_FIELD = "noise_key"


@functools.lru_cache(maxsize=None)
def _queries():
    """The query classes (built lazily: importing TF Privacy costs seconds)."""
    import tensorflow as tf
    from tensorflow_privacy.privacy.dp_query import (gaussian_query, normalized_query,
                                                     quantile_adaptive_clip_sum_query as qac,
                                                     quantile_estimator_query as qeq)

    class SecureGaussianSumQuery(gaussian_query.GaussianSumQuery):
        """``GaussianSumQuery`` whose noise comes from the key block in its global state (used once)."""

        _GlobalState = collections.namedtuple("_GlobalState", ["l2_norm_clip", "stddev", KEY_FIELD])

        def make_global_state(self, l2_norm_clip, stddev):
            return self._GlobalState(tf.cast(l2_norm_clip, tf.float32), tf.cast(stddev, tf.float32),
                                     tf.zeros(KEY_BLOCK_SHAPE, tf.int64))

        def get_noised_result(self, sample_state, global_state):
            import dp_accounting

            key = global_state.noise_key
            keyed = tf.reduce_all(tf.reduce_any(tf.not_equal(key, 0), axis=1))
            poison = tf.where(keyed, 0.0, float("nan"))   # no key injected: NaN, never predictable noise
            flat = tf.nest.flatten(sample_state)
            noise = stateless_gaussian_like(flat, global_state.stddev, key)
            noised = [v + tf.cast(z + poison, v.dtype) for v, z in zip(flat, noise)]
            result = tf.nest.pack_sequence_as(sample_state, noised)
            event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
            return result, global_state._replace(noise_key=tf.zeros_like(key)), event

    class SecureQuantileEstimatorQuery(qeq.QuantileEstimatorQuery):
        def _construct_below_estimate_query(self, below_estimate_stddev, expected_num_records):
            return normalized_query.NormalizedQuery(
                SecureGaussianSumQuery(l2_norm_clip=0.5, stddev=below_estimate_stddev),
                denominator=expected_num_records)

    class SecureQuantileAdaptiveClipSumQuery(qac.QuantileAdaptiveClipSumQuery):
        def __init__(self, initial_l2_norm_clip, noise_multiplier, target_unclipped_quantile, learning_rate,
                     clipped_count_stddev, expected_num_records, geometric_update=True):
            super().__init__(initial_l2_norm_clip, noise_multiplier, target_unclipped_quantile, learning_rate,
                             clipped_count_stddev, expected_num_records, geometric_update)
            self._quantile_estimator_query = SecureQuantileEstimatorQuery(
                initial_l2_norm_clip, target_unclipped_quantile, learning_rate, clipped_count_stddev,
                expected_num_records, geometric_update)
            self._sum_query = SecureGaussianSumQuery(initial_l2_norm_clip, noise_multiplier * initial_l2_norm_clip)

    return SecureGaussianSumQuery, SecureQuantileAdaptiveClipSumQuery


def gaussian_fixed(noise_multiplier: float, clients_per_round: float, clip: float):
    """``DifferentiallyPrivateFactory.gaussian_fixed`` with the secure Gaussian (same query otherwise)."""
    import tensorflow_federated as tff
    from tensorflow_privacy.privacy.dp_query import normalized_query

    sum_query, _ = _queries()
    query = normalized_query.NormalizedQuery(sum_query(l2_norm_clip=float(clip), stddev=float(clip * noise_multiplier)),
                                             denominator=float(clients_per_round))
    return tff.aggregators.DifferentiallyPrivateFactory(query)


def gaussian_adaptive(noise_multiplier: float, clients_per_round: float, initial_l2_norm_clip: float):
    """``DifferentiallyPrivateFactory.gaussian_adaptive`` (its defaults: target quantile 0.5, learning rate 0.2,
    geometric update) with both Gaussians secure."""
    import tensorflow_federated as tff
    from tensorflow_federated.python.aggregators import differential_privacy
    from tensorflow_privacy.privacy.dp_query import normalized_query

    _, adaptive = _queries()
    value_noise, count_stddev = differential_privacy.adaptive_clip_noise_params(
        float(noise_multiplier), float(clients_per_round), None)
    query = adaptive(initial_l2_norm_clip=float(initial_l2_norm_clip), noise_multiplier=value_noise,
                     target_unclipped_quantile=0.5, learning_rate=0.2, clipped_count_stddev=count_stddev,
                     expected_num_records=float(clients_per_round), geometric_update=True)
    return tff.aggregators.DifferentiallyPrivateFactory(
        normalized_query.NormalizedQuery(query, denominator=float(clients_per_round)))


def _replace_keys(obj, make, found: list, name=None):
    """``obj`` (TFF's server state: attrs classes, namedtuples, dicts, lists) with every leaf named ``noise_key``
    replaced by ``make()`` (appended to ``found``)."""
    import attr

    if name == KEY_FIELD:
        found.append(1)
        return make(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*[_replace_keys(getattr(obj, f), make, found, f) for f in obj._fields])
    if attr.has(type(obj)):
        return attr.evolve(obj, **{f.name.lstrip("_"): _replace_keys(getattr(obj, f.name), make, found, f.name)
                                   for f in attr.fields(type(obj)) if f.init})
    if isinstance(obj, dict):
        return type(obj)((k, _replace_keys(v, make, found, k)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_keys(v, make, found) for v in obj)
    return obj


def count_noise_keys(state) -> int:
    """How many ``noise_key`` leaves the server state has (0: the aggregator is not the secure one)."""
    found: list = []
    _replace_keys(state, lambda leaf: leaf, found)
    return len(found)


def with_fresh_noise_keys(state):
    """``state`` with a fresh key block from ``secrets`` in every ``noise_key`` leaf (pass it straight to
    ``process.next``; keep no reference)."""
    return _replace_keys(state, lambda _: fresh_key_block(), [])


def without_noise_keys(state):
    """``state`` with every ``noise_key`` leaf zeroed (what a checkpoint stores)."""
    return _replace_keys(state, lambda _: np.zeros(KEY_BLOCK_SHAPE, np.int64), [])


__all__ = ["gaussian_fixed", "gaussian_adaptive", "count_noise_keys", "with_fresh_noise_keys", "without_noise_keys",
           "KEY_FIELD"]
