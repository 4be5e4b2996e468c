"""A tiny exporter producing SavedModels shaped like the Pusher's (for tests and the benchmark).

Signatures (as the pipeline's Keras export):
  serving_default(examples: string[None])            -> probabilities, logits (float32[None])
  predict_raw(age: float32[None], hours: float32[None], workclass: string[None]) -> same outputs
  classify(inputs: string[None])                      -> classes string[None,2], scores float32[None,2]
``bias`` is added to the logit, so versions exported with different biases are distinguishable.
"""
from __future__ import annotations

import json
import os

import numpy as np

WORKCLASSES = ["Private", "Self-emp", "Gov", "Other"]


def export_demo_model(path: str, bias: float = 0.0, hidden: int = 8, seed: int = 0) -> str:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    n_in = 2 + len(WORKCLASSES)
    model = tf.keras.Sequential([tf.keras.layers.Input((n_in,)),
                                 tf.keras.layers.Dense(hidden, activation="relu"),
                                 tf.keras.layers.Dense(1)])
    model.layers[-1].bias.assign([bias])
    lookup = tf.keras.layers.StringLookup(vocabulary=WORKCLASSES, num_oov_indices=0,
                                          output_mode="one_hot")
    spec = {"age": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
            "hours": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
            "workclass": tf.io.FixedLenFeature([], tf.string, default_value="Other")}

    def logits(age, hours, workclass):
        x = tf.concat([tf.stack([age / 100.0, hours / 100.0], axis=1),
                       tf.cast(lookup(workclass), tf.float32)], axis=1)
        return tf.squeeze(model(x), axis=1)

    def outputs(f):
        lg = logits(f["age"], f["hours"], f["workclass"])
        return {"probabilities": tf.sigmoid(lg), "logits": lg}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(examples):
        return outputs(tf.io.parse_example(examples, spec))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="age"),
                                  tf.TensorSpec([None], tf.float32, name="hours"),
                                  tf.TensorSpec([None], tf.string, name="workclass")])
    def predict_raw(age, hours, workclass):
        return outputs({"age": age, "hours": hours, "workclass": workclass})

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(inputs):
        p = outputs(tf.io.parse_example(inputs, spec))["probabilities"]
        scores = tf.stack([1.0 - p, p], axis=1)
        classes = tf.tile(tf.constant([[b"<=50K", b">50K"]]), [tf.shape(p)[0], 1])
        return {"classes": classes, "scores": scores}

    module = tf.Module()
    module.model, module.lookup = model, lookup
    module.serve_examples, module.predict_raw, module.classify = serve_examples, predict_raw, classify
    tf.saved_model.save(module, path, signatures={"serving_default": serve_examples,
                                                  "predict_raw": predict_raw, "classify": classify})
    from core.pushed import PushedVersion

    version = PushedVersion(path)
    os.makedirs(version.assets_extra, exist_ok=True)
    version.write_privacy(json.dumps({"epsilon": 3.0, "delta": 1e-5}))
    return path


def make_example(age: float, hours: float, workclass: str) -> bytes:
    from tensorflow.core.example import example_pb2

    ex = example_pb2.Example()
    ex.features.feature["age"].float_list.value.append(age)
    ex.features.feature["hours"].float_list.value.append(hours)
    ex.features.feature["workclass"].bytes_list.value.append(workclass.encode())
    return ex.SerializeToString()


def random_rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(float(rng.integers(17, 90)), float(rng.integers(1, 80)),
             WORKCLASSES[int(rng.integers(0, len(WORKCLASSES)))]) for _ in range(n)]
