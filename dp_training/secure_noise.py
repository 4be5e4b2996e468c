"""Gaussian noise for the DP mechanisms (DP-SGD steps, DP-FedAvg rounds), keyed from OS entropy.

TensorFlow's ``tf.random.normal`` (and TF Privacy / TFF, which call it) draws from the process's Philox
streams, whose seeds come from one ``std::mt19937_64`` seeded with 32 bits of ``std::random_device`` (or,
after ``tf.random.set_seed``, from the public seed): 32 bits of secret at most. The noise here instead comes
from generators keyed with ``secrets`` (the OS CSPRNG), as in Opacus' ``secure_mode``:

* a **key block** is ``N_STREAMS = 4`` independent Philox-4x32-10 states, each a 64-bit key and a 128-bit
  counter start, all 192 bits drawn with ``secrets.randbits``: 768 secret bits per block (256 of them keys);
* one noise value is ``(z_1 + z_2 + z_3 + z_4) / 2``, ``z_j`` a standard normal from stream j (TensorFlow's
  Philox normal sampler), times the std: exactly N(0, std^2). Predicting it needs all four streams, i.e. four
  independent 64-bit keys (256 bits), not one; summing four draws is also Opacus' mitigation of the
  floating-point attack on a single Gaussian draw (Holohan & Braghin 2021) — a mitigation, not a proof.

Philox is TensorFlow's counter-based generator, not a designed CSPRNG (Opacus uses AES-CTR via torchcsprng):
what this module guarantees is that the secret is 768 bits from the OS CSPRNG, in memory only, and that
neither TensorFlow's process sampler nor any seed a run is given enters the noise.

The key block lives only in process memory: it is never logged, returned in results, written to checkpoints,
``privacy.json``, private details or ML Metadata. A run's ``seed`` (tests, benchmarks) never reaches it: two
runs with the same seed draw different noise.

Two forms:

``GaussianNoise``
    stateful, for a training loop in one process (DP-SGD): four ``tf.random.Generator`` (Philox) objects built
    from one key block; each call advances their counters, so no value is ever drawn twice.
``stateless_gaussian_like``
    stateless, for computations that cannot hold variables (a TFF aggregator): a fresh key block is passed in
    with every call (``fresh_key_block()``), and the caller never reuses one.
"""
from __future__ import annotations

import secrets
from typing import Callable, List, Sequence

import numpy as np

N_STREAMS = 4           # independent Philox streams summed per value (Opacus secure_mode sums 4 and halves)
STATE_WORDS = 3         # Philox: 128-bit counter + 64-bit key, as int64 words
PHILOX = 1              # TensorFlow's RNG_ALG_PHILOX
KEY_BLOCK_SHAPE = (N_STREAMS, STATE_WORDS)
SECRET_BITS = N_STREAMS * STATE_WORDS * 64


def _as_int64(u: int) -> int:
    return u - (1 << 64) if u >= (1 << 63) else u


def fresh_key_block() -> np.ndarray:
    """``int64[4, 3]`` from ``secrets``: per stream a Philox counter (2 words) and key (1 word). Never all zero."""
    while True:
        block = np.array([[_as_int64(secrets.randbits(64)) for _ in range(STATE_WORDS)] for _ in range(N_STREAMS)],
                         np.int64)
        if np.all(block.any(axis=1)):
            return block


def _combine(tensors: Sequence, stddev, draw: Callable[[int, object], object]) -> List:
    """Noise shaped like ``tensors``: one flat draw of all their elements per stream, summed and halved (scaled by
    ``stddev`` once, before it is split; static shapes where the tensors have them, fewer ops per step)."""
    import tensorflow as tf

    tensors = list(tensors)
    if not tensors:
        return []
    static = all(t.shape.is_fully_defined() for t in tensors)
    sizes = [t.shape.num_elements() for t in tensors] if static else [tf.size(t) for t in tensors]
    total = sum(sizes) if static else tf.add_n(sizes)
    z = tf.add_n([draw(j, total) for j in range(N_STREAMS)])
    z = z * (tf.cast(stddev, tf.float32) * (1.0 / np.sqrt(N_STREAMS)))
    parts = tf.split(z, sizes if static else tf.stack(sizes), num=len(tensors))
    return [tf.cast(tf.reshape(p, t.shape if static else tf.shape(t)), t.dtype) for p, t in zip(parts, tensors)]


class GaussianNoise:
    """The noise of one training run: ``like(tensors, stddev)`` returns fresh N(0, stddev^2) tensors shaped like
    ``tensors`` (inside or outside a ``tf.function``). Keep it off Keras models and ``tf.train.Checkpoint``s:
    its generators' state is the secret."""

    def __init__(self):
        import tensorflow as tf

        block = fresh_key_block()
        self._generators = [tf.random.Generator.from_state(row, alg="philox") for row in block]
        del block

    def like(self, tensors: Sequence, stddev) -> List:
        return _combine(tensors, stddev, lambda j, n: self._generators[j].normal([n], dtype="float32"))

    def __repr__(self) -> str:  # never the state
        return f"GaussianNoise({N_STREAMS} Philox streams keyed from secrets)"

    def __reduce__(self):
        raise TypeError("GaussianNoise holds secret generator state and cannot be pickled")


def stateless_gaussian_like(tensors: Sequence, stddev, key_block) -> List:
    """N(0, stddev^2) tensors shaped like ``tensors`` from the ``int64[4, 3]`` ``key_block`` (a tensor; use each
    block for one call only)."""
    import tensorflow as tf

    block = tf.bitcast(tf.convert_to_tensor(key_block, tf.int64), tf.uint64)

    def draw(j, n):
        return tf.raw_ops.StatelessRandomNormalV2(shape=tf.reshape(n, [1]), key=block[j, 2:3], counter=block[j, 0:2],
                                                  alg=tf.constant(PHILOX, tf.int32), dtype=tf.float32)

    return _combine(tensors, stddev, draw)


__all__ = ["GaussianNoise", "stateless_gaussian_like", "fresh_key_block", "N_STREAMS", "SECRET_BITS",
           "KEY_BLOCK_SHAPE"]
