"""The image feature's encoding in ``tf.Example`` (image data sets, docs/image_data.md): one PNG per image.

ExampleGen writes each image as ONE encoded ``bytes`` value (``tf.io.encode_png``: lossless, 8-bit, 1, 3 or 4
channels) beside the int64 label, the usual TFX form for images: TFDV and Beam then handle one value per image,
not ``height x width x channels`` int64 values. Transform's ``preprocessing_fn``, the Trainer (through the
transform graph) and the exported model's ``serving_default`` decode it with :func:`decode_images`.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np
import tensorflow as tf

ENCODING = "png"
# The examples' form, named in ExampleGen's config (its cache key): change it when the form changes.
IMAGE_EXAMPLE_FORMAT = "image:png+label:int64"


def _encoder(shape: Tuple[int, int, int]):
    @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.uint8)])
    def encode(images):
        return tf.map_fn(tf.io.encode_png, images, fn_output_signature=tf.TensorSpec([], tf.string))

    return encode


def encode_images(images: np.ndarray, chunk: int = 4096) -> Iterator[bytes]:
    """uint8 images ``[n, h, w, c]`` -> one PNG (``bytes``) per image, in order."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"PNG encoding takes 8-bit pixels, got {images.dtype}")
    encode = _encoder(tuple(int(d) for d in images.shape[1:]))
    for start in range(0, len(images), chunk):
        yield from encode(images[start:start + chunk]).numpy().tolist()


def decode_images(encoded: tf.Tensor, shape: Tuple[int, int, int]) -> tf.Tensor:
    """Encoded images (a string tensor of any shape, one image per element) -> uint8 ``[n, h, w, c]``.
    An image of another size than ``shape`` is an error (InvalidArgument), never silently resized."""
    h, w, c = (int(d) for d in shape)
    flat = tf.reshape(encoded, [-1])
    return tf.map_fn(lambda b: tf.ensure_shape(tf.io.decode_png(b, channels=c), [h, w, c]), flat,
                     fn_output_signature=tf.TensorSpec([h, w, c], tf.uint8))
