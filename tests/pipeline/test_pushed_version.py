"""A pushed model version (``core.pushed``): one rule for the newest version that every consumer applies, the
declared list of published files (what the trust-boundary test walks), and the published dataset.json in the
schema users write (it loads with ``core.dataset``'s loader). No pipeline run: version directories are built
by hand (a SavedModel's presence is what makes a version complete)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from core import pushed
from core.dataset import load_dataset, load_description_file, parse_description
from core.pushed import PUBLISHED_FILES, PushedVersion
from tests.conftest import PROJECT_ROOT

ADULT = os.path.join(PROJECT_ROOT, "data", "adult")
FASHION = os.path.join(PROJECT_ROOT, "data", "fashion_mnist")


def _version(model_dir, name, complete=True, files=()):
    path = os.path.join(model_dir, name)
    os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
    with open(os.path.join(path, "privacy.json"), "w") as f:
        json.dump({"epsilon": 1.0, "delta": 1e-5, "version": name}, f)
    if complete:
        open(os.path.join(path, "saved_model.pb"), "wb").close()
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        open(os.path.join(path, rel), "w").close()
    return path


@pytest.fixture
def serving_dir(tmp_path):
    """adult: versions 9 and 10, 11 half-written (no saved_model.pb yet), a non-numeric "latest" and a
    non-ASCII digit name holding SavedModels; a hidden model directory and a model without any version."""
    serving = tmp_path / "work" / "serving"
    model = str(serving / "adult")
    for name in ("9", "10"):
        _version(model, name)
    _version(model, "11", complete=False)
    _version(model, "latest")
    _version(model, "\u00b2")           # SUPERSCRIPT TWO: str.isdigit() says yes, int() says no
    _version(str(serving / ".tmp-copy"), "12")
    os.makedirs(serving / "empty")
    return str(serving)


def test_every_consumer_picks_the_same_newest_version(serving_dir):
    from pipeline.audit_report import serving_versions
    from pipeline.predict import latest_pushed_model
    from serving.repository import discover_models

    model = os.path.join(serving_dir, "adult")
    expected = os.path.join(model, "10")
    assert [v.name for v in pushed.versions(model)] == ["9", "10"]      # numeric order: 9 before 10
    assert pushed.newest(model).path == expected
    assert pushed.select_version(serving_dir).path == expected                    # the only model with a version
    assert latest_pushed_model(serving_dir) == expected                   # privtrain predict
    assert serving_versions(serving_dir, None) == ("adult", ["9", "10"])  # privtrain report
    assert discover_models(serving_dir) == {"adult": {9: os.path.join(model, "9"), 10: expected}}  # serving
    assert PushedVersion(expected).privacy()["version"] == "10"


def test_a_version_and_a_model_that_do_not_exist_are_one_line(serving_dir, tmp_path):
    from pipeline.audit_report import ReportError, collect
    from pipeline.predict import PredictError, latest_pushed_model

    with pytest.raises(pushed.PushedVersionError, match="has no version 11; pushed versions: 9, 10"):
        pushed.select_version(serving_dir, "adult", "11")                          # half-written: not a version
    with pytest.raises(pushed.PushedVersionError, match="no pushed model named 'empty'"):
        pushed.select_version(serving_dir, "empty")
    with pytest.raises(PredictError, match="no pushed model under .*run 'privtrain run' first"):
        latest_pushed_model(str(tmp_path / "nowhere"))
    with pytest.raises(ReportError, match="has no version 11"):
        collect(os.path.dirname(serving_dir), "adult", "11")


def test_serve_encrypted_uses_the_same_rule(tmp_path):
    """``privtrain serve --encrypted`` picks the version with core.pushed's rule, before anything starts: a
    workdir whose only version is half-written is one line naming the serving directory."""
    workdir = tmp_path / "work"
    _version(str(workdir / "serving" / "adult"), "11", complete=False)
    for d in (workdir, workdir / "serving", workdir / "serving" / "adult"):
        os.chmod(d, stat.S_IRWXU)
    env = dict(os.environ, PYTHONPATH=PROJECT_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", "privtrain_cli", "serve", "--workdir", str(workdir), "--encrypted",
                        "--rest-port", "0", "--grpc-port", "0"], capture_output=True, text=True, env=env,
                       timeout=300, cwd=str(tmp_path))
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("privtrain serve: no pushed model under "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_files_outside_the_declared_list_are_reported(tmp_path):
    path = _version(str(tmp_path / "adult"), "1", files=(
        "fingerprint.pb", "variables/variables.index", "variables/variables.data-00000-of-00001",
        "assets.extra/preprocessing.json", "assets.extra/dataset.json", "training.json"))
    version = PushedVersion(path)
    assert version.undeclared() == []
    assert version.missing(pushed=False) == []                      # the Trainer's export: complete
    assert version.missing() == ["report.json", "report.html"]     # pushed: the report is still to come
    for stray in ("private_details.json", "assets/vocabulary.txt", "assets.extra/notes.txt", "variables/x.tmp"):
        os.makedirs(os.path.dirname(os.path.join(path, stray)), exist_ok=True)
        open(os.path.join(path, stray), "w").close()
    assert version.undeclared() == ["assets.extra/notes.txt", "assets/vocabulary.txt", "private_details.json",
                                    "variables/x.tmp"]


def test_the_privacy_model_names_every_published_file():
    with open(os.path.join(PROJECT_ROOT, "docs", "privacy_model.md")) as f:
        doc = f.read()
    assert [d.pattern for d in PUBLISHED_FILES if f"`{d.pattern}`" not in doc] == []


@pytest.mark.parametrize("data", [ADULT, FASHION])
def test_the_published_dataset_json_is_the_users_schema_and_loads(data, tmp_path):
    path = os.path.join(data, "dataset.json")
    with open(path) as f:
        users = json.load(f)
    spec = parse_description(users, data, path, check_files=False)
    version = PushedVersion(str(tmp_path / "1"))
    version.write_dataset(spec)
    published = version.dataset_description()
    # the keys a user writes (a user's own "format" / "header" notes are not part of the description)
    expected = {k: v for k, v in users.items() if k not in ("format", "header")}
    if "image" in expected:   # the image feature's name, which a user may leave to its default
        expected["image"] = {"feature": "image", **expected["image"]}
    assert published == expected
    assert all("type" in c and "kind" not in c for c in published.get("columns", []))
    reread = version.dataset_spec()                          # core.dataset's parser, not a second reader
    assert reread == load_description_file(version.dataset_path)
    assert reread.to_json_dict() | {"directory": spec.directory} == spec.to_json_dict()
    assert "directory" not in json.dumps(published) and data not in json.dumps(published)  # no private path


def test_the_published_dataset_json_reads_the_raw_files_like_the_original(tmp_path):
    """Beside the raw files, the published copy IS a data directory's dataset.json: load_dataset reads it."""
    original = load_dataset(ADULT)
    version = PushedVersion(str(tmp_path / "1"))
    version.write_dataset(original)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("adult.data", "adult.test", "schema.pbtxt"):
        os.symlink(os.path.join(ADULT, name), data / name)
    shutil.copy(version.dataset_path, data / "dataset.json")
    assert load_dataset(str(data)).to_json_dict() == {**original.to_json_dict(), "directory": str(data)}


def test_a_version_pushed_with_the_old_dataset_copy_still_reads(tmp_path):
    """Versions pushed before the fix hold DatasetSpec.to_json_dict's fields ("kind" per column)."""
    spec = load_dataset(ADULT)
    version = PushedVersion(str(tmp_path / "1"))
    os.makedirs(version.assets_extra)
    with open(version.dataset_path, "w") as f:
        json.dump({k: v for k, v in spec.to_json_dict().items() if k != "directory"}, f)
    assert version.dataset_spec().to_json_dict() | {"directory": spec.directory} == spec.to_json_dict()
