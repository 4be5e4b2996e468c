"""Image data through the pipeline (issue 12) on a 2,000 / 500 image slice of Fashion-MNIST written into tmp:
ingest (IDX ExampleGen), statistics, validation against the reference schema (shape, pixel range, label domain),
the public Transform, DP-SGD on cached ScatterNet features with the per-example GroupNorm (no release before DP-SGD),
the Evaluator per class, the push; the pushed model alone predicts raw pixels; damaged IDX files stop with one
clear line and nothing trained."""
from __future__ import annotations

import functools
import gzip
import json
import os
import shutil

import numpy as np
import pytest

from core.pushed import PushedVersion
from tests.conftest import PROJECT_ROOT, run_cli

FMNIST = os.path.join(PROJECT_ROOT, "data", "fashion_mnist")
PACKAGE_DIR = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(not os.path.isdir(PACKAGE_DIR),
                                reason="Debian's dataset-fashion-mnist is not installed (scripts/setup_system.sh)")
TRAIN, EVAL = 2000, 500


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


@functools.lru_cache(maxsize=None)
def _package_split(prefix: str):
    from core.dataset import read_idx

    return (read_idx(os.path.join(PACKAGE_DIR, f"{prefix}-images-idx3-ubyte.gz")),
            read_idx(os.path.join(PACKAGE_DIR, f"{prefix}-labels-idx1-ubyte.gz")))


def make_image_sample(directory: str, train: int = TRAIN, eval_: int = EVAL, files=None) -> str:
    """Fashion-MNIST's description and schema, with the first images of each split as gzip'd IDX files in
    ``directory`` (``files``: {file name: bytes} replaces files, to damage them)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(FMNIST, "dataset.json")) as f:
        description = json.load(f)
    del description["image"]["files"]   # the IDX files are beside dataset.json
    description["privacy"].update({"source_id": f"fmnist-sample-{os.path.basename(directory)}",
                                   "public_row_estimate": train})
    with open(os.path.join(directory, "dataset.json"), "w") as f:
        json.dump(description, f, indent=1)
    shutil.copy(os.path.join(FMNIST, "schema.pbtxt"), directory)
    for prefix, n in (("train", train), ("t10k", eval_)):
        images, labels = _package_split(prefix)
        for kind, array in (("images-idx3", images[:n]), ("labels-idx1", labels[:n])):
            with open(os.path.join(directory, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
                f.write(_gz(idx_bytes(array)))
    for name, data in (files or {}).items():
        path = os.path.join(directory, name)
        if data is None:
            os.remove(path)
        else:
            with open(path, "wb") as f:
                f.write(data)
    return directory


# -- the data gate on damaged IDX files: one line naming the file, nothing trained ------------------------------
def _train_images():
    images, labels = _package_split("train")
    return images[:TRAIN], labels[:TRAIN]


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1)


@functools.lru_cache(maxsize=None)
def _damaged():
    images, labels = _train_images()
    good = idx_bytes(images)
    wrong_magic = bytearray(good)
    wrong_magic[2] = 0x0D   # float, not unsigned byte
    gz = _gz(good)
    return {
        "wrong magic number": ("train-images-idx3-ubyte.gz", _gz(bytes(wrong_magic)),
                               "not an IDX file of unsigned bytes"),
        "truncated images": ("train-images-idx3-ubyte.gz", _gz(good[:-100]), "truncated"),
        "truncated gzip stream": ("train-images-idx3-ubyte.gz", gz[: len(gz) // 2], "gzip stream is damaged"),
        "count mismatch": ("train-labels-idx1-ubyte.gz", _gz(idx_bytes(labels[:-1])), "1999 labels"),
        "wrong shape": ("train-images-idx3-ubyte.gz", _gz(idx_bytes(images[:, :, :27])),
                        "images are 28x27x1"),
        "labels file missing": ("train-labels-idx1-ubyte.gz", None, "exactly one IDX images file and one IDX labels"),
    }


DAMAGED = list(_damaged()) if os.path.isdir(PACKAGE_DIR) else []


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_idx_file_stops_the_gate_naming_the_file(tmp_path, case):
    from core.dataset import load_dataset
    from pipeline.data_gate import IngestionError, check_raw_data

    name, data, expected = _damaged()[case]
    directory = make_image_sample(str(tmp_path / "data"), train=TRAIN, eval_=50, files={name: data})
    with pytest.raises(IngestionError) as e:
        check_raw_data(load_dataset(directory))
    message = str(e.value)
    assert expected in message and "Nothing was trained or pushed" in message
    assert ("train-" in message) and "\n" not in message


def test_a_label_outside_the_classes_is_row_local_on_the_private_split_and_stops_on_the_public_one(tmp_path):
    """Issue 17.2: one private example never flips the gate (it is dropped, counted privately); the public eval
    split is still checked strictly."""
    from core.dataset import load_dataset
    from pipeline.data_gate import IngestionError, check_raw_data

    images, labels = _train_images()
    clean = check_raw_data(load_dataset(make_image_sample(str(tmp_path / "clean"), train=TRAIN, eval_=50)))
    neighbour = make_image_sample(str(tmp_path / "neighbour"), train=TRAIN, eval_=50, files={
        "train-images-idx3-ubyte.gz": _gz(idx_bytes(np.concatenate([images, images[:1]]))),
        "train-labels-idx1-ubyte.gz": _gz(idx_bytes(np.concatenate([labels, [10]])))})
    tally = check_raw_data(load_dataset(neighbour))
    assert tally["train"]["rows"] == clean["train"]["rows"] == TRAIN
    assert tally["train"]["dropped"] == {"label outside the classes": 1}
    eval_images, eval_labels = _package_split("t10k")
    bad = eval_labels[:50].copy()
    bad[7] = 10
    public = make_image_sample(str(tmp_path / "public"), train=TRAIN, eval_=50,
                               files={"t10k-labels-idx1-ubyte.gz": _gz(idx_bytes(bad))})
    with pytest.raises(IngestionError) as e:
        check_raw_data(load_dataset(public))
    assert "example 7 has label 10" in str(e.value) and "t10k-" in str(e.value)


def test_the_cli_refuses_a_damaged_idx_file_in_one_line_and_trains_nothing(tmp_path):
    name, data, _ = _damaged()["truncated images"]
    directory = make_image_sample(str(tmp_path / "data"), train=TRAIN, eval_=50, files={name: data})
    workdir = str(tmp_path / "work")
    result = run_cli("run", "--data", directory, "--workdir", workdir)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("privtrain: train-images-idx3-ubyte.gz: truncated"), \
        result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(os.path.join(workdir, "serving"))


def test_a_missing_package_directory_says_how_to_install_it(tmp_path):
    from core.dataset import DatasetError, load_dataset

    directory = str(tmp_path / "data")
    os.makedirs(directory)
    with open(os.path.join(FMNIST, "dataset.json")) as f:
        description = json.load(f)
    description["image"]["files"] = str(tmp_path / "not-installed")
    with open(os.path.join(directory, "dataset.json"), "w") as f:
        json.dump(description, f)
    shutil.copy(os.path.join(FMNIST, "schema.pbtxt"), directory)
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(directory)


def test_the_vendored_description_reads_the_packaged_files():
    from core.dataset import load_dataset, read_images

    spec = load_dataset(FMNIST)
    assert spec.is_image and spec.num_classes == 10 and spec.raw_directory == PACKAGE_DIR
    assert spec.privacy.public_row_estimate == 60000 and spec.privacy.public_splits == ("eval",)
    rows = read_images(spec, "eval")
    assert rows.images.shape == (10000, 28, 28, 1) and rows.labels.max() == 9
    assert np.bincount(rows.labels).tolist() == [1000] * 10


@pytest.mark.parametrize("model_name", ["scatternet_linear", "scatternet_linear_dpnorm"])
def test_the_exported_model_answers_as_the_trained_model_on_the_same_pixels(tmp_path, model_name):
    """The SavedModel (raw pixels -> public scaling -> ScatterNet -> the model, GroupNorm or DP statistics
    included) gives the training model's logits on the features the Trainer trained on."""
    import tensorflow as tf

    from core.dataset import load_dataset
    from dp_training.images import build_image_model, scaled_pixels, scattering_features
    from dp_training.preprocessing import ChannelStats
    from pipeline.image_pipeline import export_image_model

    spec = load_dataset(FMNIST)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(12, 28, 28, 1)).astype(np.uint8)
    raw[:4] = (raw[:4] // 8)                                   # some dark images: another scale per group
    stats = ChannelStats(tuple(rng.uniform(0, 0.2, 81)), tuple(rng.uniform(0.01, 0.1, 81)))
    model = build_image_model(model_name, (81, 7, 7), 10, stats, seed=4)
    for v in model.trainable_variables:                        # trained-looking weights, not the initial ones
        v.assign(rng.normal(size=v.shape).astype(np.float32))
    features = scattering_features(scaled_pixels(raw, 0, 255), None)
    trained = model(tf.constant(np.asarray(features)), training=False).numpy()
    out = str(tmp_path / "export")
    export_image_model(model, spec, model_name, out, stats if model_name.endswith("dpnorm") else None)
    loaded = tf.saved_model.load(out)
    served = loaded.signatures["predict_raw"](image=tf.constant(raw[..., 0].astype(np.float32)))["logits"].numpy()
    np.testing.assert_allclose(served, trained, rtol=1e-4, atol=1e-3)
    assert np.abs(trained).max() > 1.0                        # the comparison is not between near-zero logits
    pre = PushedVersion(out).preprocessing()
    assert ("group_normalisation" in pre) == (model_name == "scatternet_linear")
    assert ("channel_normalisation" in pre) == (model_name == "scatternet_linear_dpnorm")


# -- the whole pipeline on the slice, once (module fixture) -------------------------------------------------------
@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    directory = make_image_sample(str(tmp_path_factory.mktemp("fmnist_sample")))
    workdir = str(tmp_path_factory.mktemp("fmnist_run"))
    result = run_cli("run", "--data", directory, "--workdir", workdir, "--json", "--batch-size", "500",
                     "--epochs", "20", "--learning-rate", "4", "--min-accuracy", "0.5", "--delta", "1e-5")
    assert result.returncode == 0, f"pipeline failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return directory, workdir, json.loads(result.stdout), result


def test_the_image_pipeline_runs_every_component_and_pushes(image_run):
    _, workdir, summary, _ = image_run
    states = {c["component"]: c["state"] for c in summary["components"]}
    assert {"ExampleGen", "StatisticsGen", "StrictExampleValidator", "Transform", "Trainer", "Evaluator",
            "Pusher"} <= set(states)
    assert all(s == "COMPLETE" for s in states.values()), states
    overall = summary["metrics"]["Overall"]
    assert overall["example_count"] == EVAL and overall["sparse_categorical_accuracy"] > 0.6
    per_class = {k for k in summary["metrics"] if k.startswith("label=")}
    assert len(per_class) == 10      # the Evaluator's slices: one per class
    assert summary["blessed"] is True and summary["pushed_path"]


def test_the_guarantee_covers_the_weights_and_no_normalisation_release(image_run):
    """The default model standardises each image by its own statistics (GroupNorm): nothing is released before
    DP-SGD, so the guarantee's one mechanism is DP-SGD and it spends the whole epsilon."""
    _, _, summary, _ = image_run
    g = PushedVersion(summary["pushed_path"]).privacy()
    assert g["private"] and abs(g["epsilon"] - 3.0) < 0.01 and g["delta"] == 1e-5
    assert g["neighbouring_relation"] == "add_or_remove_one" and g["accountant"] == "pld"
    covers = [m["covers"] for m in g["mechanisms"]]
    assert covers == ["the model's trained weights"]
    assert abs(g["mechanisms"][0]["epsilon_alone"] - g["epsilon"]) < 1e-9
    assert "preprocessing_noise_multiplier" not in g["parameters"]
    assert g["parameters"]["dp_path"] == "fused_dense" and g["parameters"]["model"] == "scatternet_linear"
    assert g["parameters"]["planning_rows"] == TRAIN   # the public figure, never the exact count


def test_what_leaves_with_the_pushed_model(image_run):
    """Everything beside the SavedModel is enumerated: public description (the GroupNorm's), the guarantee."""
    _, workdir, summary, _ = image_run
    pushed = summary["pushed_path"]
    version = PushedVersion(pushed)
    assert version.undeclared() == [] and version.missing() == []   # core.pushed's declared list, nothing else
    extra = sorted(os.listdir(version.assets_extra))
    assert extra == ["dataset.json", "preprocessing.json"]
    assert version.dataset_spec().image.shape == (28, 28, 1)        # the user's schema, read by core.dataset
    pre = version.preprocessing()
    assert set(pre) == {"kind", "shape", "pixel_range", "model", "classes", "scattering", "group_normalisation"}
    assert pre["group_normalisation"] == {"groups": 27, "per_example": True}   # public: no statistics of rows
    top = sorted(n for n in os.listdir(pushed) if os.path.isfile(os.path.join(pushed, n)))
    assert top == ["fingerprint.pb", "privacy.json", "report.html", "report.json", "saved_model.pb", "training.json"]
    slices = {s["slice"] for s in version.report()["evaluation"]["slices"]}
    assert "Overall" in slices and any(s.startswith("label=") for s in slices)   # per class, small ones suppressed
    # the ScatterNet cache is private: in the workdir, never beside the pushed model
    cache = os.path.join(workdir, "cache")
    assert any(n.startswith("scattering-J2-") for n in os.listdir(cache))
    assert not any("scattering" in n for n in os.listdir(pushed))


def test_the_pushed_model_alone_predicts_raw_pixels(image_run):
    import tensorflow as tf

    directory, _, summary, _ = image_run
    model = tf.saved_model.load(summary["pushed_path"])
    assert {"serving_default", "predict_raw", "classify"} <= set(model.signatures)
    images, labels = _package_split("t10k")
    raw = images[:EVAL].astype(np.float32)                     # [n, 28, 28] raw pixels 0..255
    out = model.signatures["predict_raw"](image=tf.constant(raw))
    p = out["probabilities"].numpy()
    assert p.shape == (EVAL, 10) and np.allclose(p.sum(axis=1), 1.0, atol=1e-4)
    accuracy = float((p.argmax(axis=1) == labels[:EVAL]).mean())
    assert accuracy > 0.6
    # serialized examples (the image encoded as one PNG, as ExampleGen writes it) give the same answer as raw pixels
    examples = [tf.train.Example(features=tf.train.Features(feature={"image": tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[tf.io.encode_png(img[..., None]).numpy()]))})).SerializeToString()
        for img in images[:20]]
    via_examples = model.signatures["serving_default"](examples=tf.constant(examples))["probabilities"].numpy()
    np.testing.assert_allclose(via_examples, p[:20], atol=1e-5)
    classes = model.signatures["classify"](inputs=tf.constant(examples[:2]))["classes"].numpy()
    assert classes[0].tolist()[0] == b"T-shirt/top" and len(classes[0]) == 10


def test_privtrain_predict_reads_an_idx_file(image_run, tmp_path):
    directory, workdir, _, _ = image_run
    result = run_cli("predict", "--workdir", workdir, "--input",
                     os.path.join(directory, "t10k-images-idx3-ubyte.gz"), "--limit", "5", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert len(out["predicted"]) == 5 and set(out["predicted"]) <= set(out["classes"])
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 20)
    result = run_cli("predict", "--workdir", workdir, "--input", str(bad))
    assert result.returncode == 2 and "not an IDX file" in result.stderr and "Traceback" not in result.stderr


def test_the_served_model_answers_raw_pixels_and_png_examples(image_run):
    """``privtrain serve``'s server on the pushed version: ``predict_raw`` on raw pixels, ``classify`` on serialized
    examples in ExampleGen's form (the image as one PNG, sent base64 like TF Serving's REST API) give the same
    probabilities; the server is stopped whatever happens."""
    import base64
    import urllib.request

    import tensorflow as tf

    from serving import serve

    _, workdir, _, _ = image_run
    images, labels = _package_split("t10k")
    n = 8

    def post(port, verb, body):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{os.path.basename(FMNIST)}:{verb}",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    with serve(os.path.join(workdir, "serving"), rest_port=0, grpc_port=0, backend="builtin",
               log=lambda m: None) as server:
        raw = post(server.rest_port, "predict", {"signature_name": "predict_raw",
                                                 "instances": images[:n].astype(float).tolist()})
        pngs = [base64.b64encode(tf.io.encode_png(img[..., None]).numpy()).decode() for img in images[:n]]
        classified = post(server.rest_port, "classify", {"signature_name": "classify",
                                                         "examples": [{"image": {"b64": b}} for b in pngs]})
    p_raw = np.array([row["probabilities"] for row in raw["predictions"]])
    p_examples = np.array([[score for _, score in row] for row in classified["results"]])
    assert p_raw.shape == (n, 10)
    np.testing.assert_allclose(p_examples, p_raw, atol=1e-5)
    assert classified["results"][0][0][0] == "T-shirt/top"
    assert (p_raw.argmax(axis=1) == labels[:n]).mean() >= 0.5
