"""The whole pipeline on a small Adult sample: every component runs, the model is blessed and pushed, and the
pushed SavedModel predicts on raw rows by itself."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from core.pushed import PushedVersion
from tests.conftest import ADULT_DIR, run_cli

COMPONENTS = {"ExampleGen", "StatisticsGen", "SchemaGen", "ReferenceSchema", "StrictExampleValidator", "Transform",
              "Trainer", "LatestBlessedModelResolver", "Evaluator", "Pusher"}


def _raw_rows(n):
    spec = json.load(open(os.path.join(ADULT_DIR, "dataset.json")))
    names = [c["name"] for c in spec["columns"]]
    rows = []
    with open(os.path.join(ADULT_DIR, "adult.test")) as f:
        for line in f:
            if len(rows) == n:
                break
            rows.append(dict(zip(names, line.rstrip("\n").split(", "))))
    return spec, rows


def test_every_component_runs_and_the_model_is_blessed_and_pushed(standard_run):
    workdir, summary, result = standard_run
    states = {c["component"]: c["state"] for c in summary["components"]}
    assert set(states) == COMPONENTS
    assert all(s == "COMPLETE" for s in states.values()), states
    overall = summary["metrics"]["Overall"]
    assert overall["auc"] > 0.80 and overall["binary_accuracy"] > 0.78
    assert any(s.startswith("sex=") for s in summary["metrics"]) and any(s.startswith("race=") for s in summary["metrics"])
    assert summary["blessed"] is True
    pushed = summary["pushed_path"]
    assert pushed.startswith(os.path.join(workdir, "serving", "adult") + os.sep)
    assert os.path.isfile(os.path.join(pushed, "saved_model.pb"))
    assert os.path.basename(pushed).isdigit()  # TF Serving's <name>/<version>/ layout
    # progress lines were shown while it ran
    assert "Trainer started" in result.stderr and "Trainer finished in" in result.stderr
    # the first run in a workdir has no ETA yet, and remembers its components' durations for the next one (0600)
    assert "started (no ETA yet: the first run in this workdir)" in result.stderr
    durations = os.path.join(workdir, "runs", "durations.json")
    assert "Trainer" in json.load(open(durations)) and os.stat(durations).st_mode & 0o077 == 0


def test_pushed_model_predicts_on_raw_rows_by_itself(standard_run):
    _, summary, _ = standard_run
    model = tf.saved_model.load(summary["pushed_path"])
    assert {"serving_default", "predict_raw", "classify"} <= set(model.signatures)
    spec, rows = _raw_rows(300)
    numeric = {c["name"] for c in spec["columns"] if c["type"] == "numeric"}
    features = {}
    for c in spec["columns"]:
        if c["type"] == "label":
            continue
        values = [r[c["name"]] for r in rows]
        if c["name"] in numeric:
            features[c["name"]] = tf.constant([float(v) for v in values], tf.float32)
        else:
            features[c["name"]] = tf.constant(["" if v == "?" else v for v in values])
    raw = model.signatures["predict_raw"](**features)["probabilities"].numpy()
    labels = np.array([r["income"].startswith(">50K") for r in rows])
    assert raw.shape == (300,) and np.all((raw >= 0) & (raw <= 1))
    assert np.mean((raw > 0.5) == labels) > 0.75

    def example(r):
        feature = {}
        for c in spec["columns"]:
            v = r[c["name"]]
            if c["type"] == "label" or v == "?":
                continue
            if c["name"] in numeric:
                feature[c["name"]] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))
            else:
                feature[c["name"]] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    examples = tf.constant([example(r) for r in rows])
    by_example = model.signatures["serving_default"](examples=examples)["probabilities"].numpy()
    np.testing.assert_allclose(by_example, raw, atol=1e-5)
    scores = model.signatures["classify"](inputs=examples)["scores"].numpy()
    np.testing.assert_allclose(scores[:, 1], raw, atol=1e-5)


def test_preprocessing_description_reproduces_the_transform_graph(standard_run):
    """The numbers written for clients that preprocess themselves (TF-Encrypted) match the Transform graph."""
    _, summary, _ = standard_run
    description = PushedVersion(summary["pushed_path"]).preprocessing()
    model = tf.keras.models.load_model(summary["pushed_path"])
    spec, rows = _raw_rows(50)
    columns = []
    for item in description:
        values = [r[item["name"]] for r in rows]
        if item["kind"] == "numeric":
            x = np.array([float(v) for v in values])
            x = np.log1p(x) if item["log1p"] else x
            x = np.clip(x, *item["clip"])  # the public range, then the DP normalisation
            columns.append(((x - item["mean"]) / item["std"])[:, None])
        else:
            vocab = {v: i for i, v in enumerate(item["vocabulary"])}
            ids = [vocab.get(v, len(vocab)) for v in values]
            columns.append(np.eye(len(vocab) + item["num_oov_buckets"])[ids])
    dense = np.concatenate(columns, axis=1).astype(np.float32)
    x = dense
    dense_layers = [l for l in model.layers if isinstance(l, tf.keras.layers.Dense)]
    for layer in dense_layers:
        kernel, bias = layer.get_weights()
        x = x @ kernel + bias
        if layer.activation is tf.keras.activations.relu:
            x = np.maximum(x, 0)
    expected_logits = x[:, 0]
    loaded = tf.saved_model.load(summary["pushed_path"])
    numeric = {c["name"] for c in spec["columns"] if c["type"] == "numeric"}
    features = {c["name"]: tf.constant([float(r[c["name"]]) for r in rows]) if c["name"] in numeric
                else tf.constant(["" if r[c["name"]] == "?" else r[c["name"]] for r in rows])
                for c in spec["columns"] if c["type"] != "label"}
    logits = loaded.signatures["predict_raw"](**features)["logits"].numpy()
    np.testing.assert_allclose(expected_logits, logits, atol=1e-4)


def test_identical_rerun_replays_and_a_changed_one_reuses_cached_components(standard_run, adult_sample):
    from pipeline import run_memo

    workdir, first, _ = standard_run
    serving = os.path.join(workdir, "serving")
    versions = lambda: sorted(p for _, dirs, _ in os.walk(serving) for p in dirs if p.isdigit())  # noqa: E731
    head, pushed = run_memo.store_head(os.path.join(workdir, "metadata.sqlite")), versions()
    args = ("run", "--trainer", "standard", "--data", adult_sample, "--workdir", workdir, "--allow-non-private")
    # Identical: the recorded summary, nothing started, written or pushed (pipeline/run_memo.py).
    again = run_cli(*args, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "identical to the run that finished" in again.stderr
    assert json.loads(again.stdout) == first
    assert run_memo.store_head(os.path.join(workdir, "metadata.sqlite")) == head and versions() == pushed
    text = run_cli(*args)   # the text form of the same record
    assert text.returncode == 0 and "identical to the run" in text.stderr and "blessed: yes" in text.stdout
    # A changed gate re-runs the Evaluator and the Pusher only: everything upstream comes from TFX's cache.
    changed = run_cli(*args, "--json", "--min-auc", "0.79")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "identical to the run" not in changed.stderr
    states = {c["component"]: c["state"] for c in json.loads(changed.stdout)["components"]}
    for component in ("ExampleGen", "StatisticsGen", "SchemaGen", "Transform", "Trainer"):
        assert states[component] == "CACHED", states
    assert run_memo.store_head(os.path.join(workdir, "metadata.sqlite")) != head
