"""Gaussian noise for the DP mechanisms (DP-SGD steps, DP-FedAvg rounds), keyed from OS entropy.

TensorFlow's ``tf.random.normal`` (and TF Privacy / TFF, which call it) draws from the process's Philox
streams, whose seeds come from one ``std::mt19937_64`` seeded with 32 bits of ``std::random_device`` (or,
after ``tf.random.set_seed``, from the public seed): 32 bits of secret at most. The noise here comes from
generators keyed with ``secrets`` (the OS CSPRNG) only, as in Opacus' ``secure_mode``:

``GaussianNoise`` (DP-SGD: a training loop in one process)
    **AES-256 in counter mode** (the ``cryptography`` package, i.e. OpenSSL): a 256-bit key and a 128-bit
    initial counter block from ``secrets.token_bytes``; the keystream is the random bits. A designed CSPRNG, as
    Opacus' ``secure_mode`` (AES-CTR through torchcsprng): without the key, the bits of one step say nothing
    about those of another. ``words(n)`` draws the bits for ``n`` noise values on the host (every call advances
    the counter, so no bits are ever used twice); they enter the traced step as one ``uint32`` input, where
    ``like(tensors, stddev, words)`` turns them into noise.
``stateless_gaussian_like`` (DP-FedAvg: inside a TFF computation, which cannot take host bits per call)
    a **key block** of ``N_STREAMS = 4`` independent TensorFlow Philox-4x32-10 states (each a 64-bit key and a
    128-bit counter start), all 768 bits from ``secrets.randbits``, passed in with every call
    (``fresh_key_block()``) and never reused. Philox is TensorFlow's counter-based generator, not a designed
    CSPRNG: predicting a value needs the four streams' four independent 64-bit keys (256 bits).

Both: one noise value is ``(z_1 + z_2 + z_3 + z_4) / 2`` times the std, ``z_j`` standard normals from
``N_STREAMS = 4`` independent draws (``normals_from_bits``: Box-Muller on 32-bit words): N(0, std^2). Summing
four draws is Opacus' mitigation of the floating-point attack on a single Gaussian draw (Holohan & Braghin
2021) — a mitigation, not a proof.

Keys live only in process memory: never logged, returned in results, written to checkpoints, ``privacy.json``,
private details or ML Metadata. A run's ``seed`` (tests, benchmarks) never reaches them: two runs with the same
seed draw different noise.
"""
from __future__ import annotations

import secrets
from typing import Callable, List, Sequence, Tuple

import numpy as np

N_STREAMS = 4           # independent draws summed per value (Opacus secure_mode sums 4 and halves)
STATE_WORDS = 3         # Philox: 128-bit counter + 64-bit key, as int64 words
PHILOX = 1              # TensorFlow's RNG_ALG_PHILOX
KEY_BLOCK_SHAPE = (N_STREAMS, STATE_WORDS)
SECRET_BITS = N_STREAMS * STATE_WORDS * 64       # a Philox key block (DP-FedAvg)
AES_KEY_BYTES, AES_COUNTER_BYTES = 32, 16         # AES-256-CTR (DP-SGD): 256-bit key, 128-bit initial counter


def _as_int64(u: int) -> int:
    return u - (1 << 64) if u >= (1 << 63) else u


def fresh_key_block() -> np.ndarray:
    """``int64[4, 3]`` from ``secrets``: per stream a Philox counter (2 words) and key (1 word). Never all zero."""
    while True:
        block = np.array([[_as_int64(secrets.randbits(64)) for _ in range(STATE_WORDS)] for _ in range(N_STREAMS)],
                         np.int64)
        if np.all(block.any(axis=1)):
            return block


def normals_from_bits(bits):
    """Standard normals from uniform random bits, by Box-Muller on whole tensors (``uint32[..., 2, m]`` ->
    ``float32[..., 2m]``): each pair of 32-bit words gives two uniforms on the 2^23-point grid of midpoints
    ``(k + 1/2) 2^-23`` from each word's top 23 bits (exact in float32, whose significand has 24 bits; with 24 bits
    half the midpoints would round, some to 1.0), never 0 or 1, so the radius is finite (at most 5.77), then
    ``r cos(t)`` and ``r sin(t)``.
    TensorFlow's own normal sampler is the same Box-Muller per pair of words (with its smallest uniform clamped at
    1e-7: radius at most 5.7) in a scalar loop; here it runs as a few vectorised kernels over all streams at once."""
    import tensorflow as tf

    u = (tf.cast(tf.bitwise.right_shift(bits, tf.constant(9, bits.dtype)), tf.float32) + 0.5) * (2.0 ** -23)
    r = tf.sqrt(-2.0 * tf.math.log(u[..., 0, :]))
    t = (2.0 * np.pi) * u[..., 1, :]
    return tf.concat([r * tf.cos(t), r * tf.sin(t)], axis=-1)


def _combine(tensors: Sequence, stddev, draw_bits: Callable[[int, object], object]) -> List:
    """Noise shaped like ``tensors``: ``draw_bits(j, m)`` gives stream j's ``uint32[2, m]`` words; all streams'
    normals in one Box-Muller pass, summed over the streams and halved (scaled by ``stddev`` once, before the
    flat draw is split; static shapes where the tensors have them, fewer ops per step)."""
    import tensorflow as tf

    tensors = list(tensors)
    if not tensors:
        return []
    static = all(t.shape.is_fully_defined() for t in tensors)
    sizes = [t.shape.num_elements() for t in tensors] if static else [tf.size(t) for t in tensors]
    total = sum(sizes) if static else tf.add_n(sizes)
    pairs = (total + 1) // 2
    z = normals_from_bits(tf.stack([draw_bits(j, pairs) for j in range(N_STREAMS)]))   # [streams, 2 * pairs]
    z = tf.reduce_sum(z[:, :total], axis=0) * (tf.cast(stddev, tf.float32) * (1.0 / np.sqrt(N_STREAMS)))
    parts = tf.split(z, sizes if static else tf.stack(sizes), num=len(tensors))
    return [tf.cast(tf.reshape(p, t.shape if static else tf.shape(t)), t.dtype) for p, t in zip(parts, tensors)]


def fresh_aes_key() -> Tuple[bytes, bytes]:
    """``(key, initial counter block)`` for AES-256-CTR, from ``secrets``."""
    return secrets.token_bytes(AES_KEY_BYTES), secrets.token_bytes(AES_COUNTER_BYTES)


def words_shape(total: int) -> Tuple[int, int, int]:
    """The ``uint32`` words behind ``total`` noise values: ``[N_STREAMS, 2, ceil(total / 2)]`` (Box-Muller: two
    words per pair of normals, one pair of normals per two values of each stream)."""
    return (N_STREAMS, 2, (int(total) + 1) // 2)


class GaussianNoise:
    """The noise of one training run. ``words(total)`` draws (on the host, outside any ``tf.function``) the random
    words for ``total`` noise values; ``like(tensors, stddev, words)`` (inside or outside a ``tf.function``) turns
    them into N(0, stddev^2) tensors shaped like ``tensors`` (``total`` = their number of elements). Keep it off
    Keras models and ``tf.train.Checkpoint``s: its cipher state is the secret."""

    def __init__(self):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        key, counter = fresh_aes_key()
        self._keystream = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        del key, counter
        self._zeros = b""

    def words(self, total: int) -> np.ndarray:
        shape = words_shape(total)
        size = 4 * int(np.prod(shape))
        if len(self._zeros) != size:
            self._zeros = bytes(size)
        return np.frombuffer(self._keystream.update(self._zeros), np.uint32).reshape(shape)

    def like(self, tensors: Sequence, stddev, words) -> List:  # pylint: disable=no-self-use
        """``words`` must be ``words(total)`` for exactly the tensors' ``total`` values: every word drawn is used
        once, and a mismatch (bits wasted, or too few) is an error, never a silent slice."""
        total = sum(int(t.shape.num_elements()) for t in tensors)
        if tuple(words.shape) != words_shape(total):
            raise ValueError(f"noise words of shape {tuple(words.shape)} for {total} values, which need "
                             f"{words_shape(total)}: draw them with words({total})")
        return _combine(tensors, stddev, lambda j, m: words[j])

    def __repr__(self) -> str:  # never the state
        return "GaussianNoise(AES-256-CTR keyed from secrets)"

    def __reduce__(self):
        raise TypeError("GaussianNoise holds secret cipher state and cannot be pickled")


def stateless_gaussian_like(tensors: Sequence, stddev, key_block) -> List:
    """N(0, stddev^2) tensors shaped like ``tensors`` from the ``int64[4, 3]`` ``key_block`` (a tensor; use each
    block for one call only)."""
    import tensorflow as tf

    block = tf.bitcast(tf.convert_to_tensor(key_block, tf.int64), tf.uint64)

    def draw_bits(j, m):
        return tf.raw_ops.StatelessRandomUniformFullIntV2(
            shape=tf.stack([2, m]) if tf.is_tensor(m) else [2, m], key=block[j, 2:3], counter=block[j, 0:2],
            alg=tf.constant(PHILOX, tf.int32), dtype=tf.uint32)

    return _combine(tensors, stddev, draw_bits)


__all__ = ["GaussianNoise", "stateless_gaussian_like", "normals_from_bits", "fresh_key_block", "fresh_aes_key",
           "words_shape", "N_STREAMS", "SECRET_BITS", "KEY_BLOCK_SHAPE"]
