"""A model version directory, every file privtrain publishes in it, and the one rule for the newest version.

The Trainer exports a version (its ``Format-Serving`` directory); the Pusher copies it to
``<serving dir>/<model name>/<version>/``, where the runner adds the audit report. Everything in it leaves the
trust boundary, so :data:`PUBLISHED_FILES` declares each file, what it holds and what makes it safe to publish
(``docs/privacy_model.md``, "What leaves the trust boundary"); a test walks a pushed version and fails on a
file this list does not declare. Every writer and reader of these files goes through :class:`PushedVersion`.

Which versions exist, and which is the newest (``privtrain predict``, ``privtrain report``, the serving
repository, ``privtrain serve --encrypted``): a version is a directory whose name is ASCII digits (the Pusher's
timestamp) and that holds ``saved_model.pb`` (or ``saved_model.pbtxt``); a version still being copied has
neither yet and is skipped; the newest is the largest number. A model is a directory of the serving directory
(not hidden) holding at least one version.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from typing import Any, Dict, List, Optional

PRIVACY_FILE = "privacy.json"
TRAINING_FILE = "training.json"
ASSETS_EXTRA = "assets.extra"
PREPROCESSING_FILE = "preprocessing.json"
DATASET_FILE = "dataset.json"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")

_VERSION_NAME = re.compile(r"[0-9]+")


@dataclasses.dataclass(frozen=True)
class PublishedFile:
    """One file of a pushed version. ``pattern``: its path in the version (a glob for TensorFlow's sharded
    variables); ``covered``: why publishing it is safe; ``required``: every version of every model kind holds
    it; ``after_push``: written beside the pushed copy only (not in the Trainer's export)."""

    pattern: str
    what: str
    covered: str
    required: bool = True
    after_push: bool = False


PUBLISHED_FILES = (
    PublishedFile("saved_model.pb", "the SavedModel's graph and signatures, with the public transform "
                  "(vocabularies and clip ranges of the reference schema)", "public by declaration (code and "
                  "reference schema)"),
    PublishedFile("fingerprint.pb", "TensorFlow's hashes of the SavedModel's graph and variables",
                  "a function of the files it hashes"),
    PublishedFile("keras_metadata.pb", "Keras's description of the layers (tabular models only)",
                  "public by declaration (the architecture)", required=False),
    PublishedFile("variables/variables.index", "the index of the variables' shards",
                  "the guarantee (names and shapes are public by declaration)"),
    PublishedFile("variables/variables.data-?????-of-?????", "the trained weights and the DP normalisation",
                  "the guarantee"),
    PublishedFile(f"{ASSETS_EXTRA}/{PREPROCESSING_FILE}", "what the model computes from raw features: public "
                  "domains and the DP normalisation, for clients that preprocess themselves",
                  "the guarantee (normalisation); public by declaration (domains)"),
    PublishedFile(f"{ASSETS_EXTRA}/{DATASET_FILE}", "the data set's description in the schema of "
                  "data/*/dataset.json (columns, splits' file patterns, privacy declaration)",
                  "public by declaration"),
    PublishedFile(PRIVACY_FILE, "the guarantee (epsilon, delta, accountant, relation, unit, DP events, ledger "
                  "receipt, what it does not cover)", "a function of the public DP events"),
    PublishedFile(TRAINING_FILE, "the trainer kind and its public run parameters", "public by declaration"),
    PublishedFile(REPORT_JSON, "the audit report (docs/reports.md)", "the guarantee or public by declaration, "
                  "item by item", after_push=True),
    PublishedFile(REPORT_HTML, "the same audit report as a page", "as report.json", after_push=True),
)


class PushedVersionError(ValueError):
    """No such model or version; the message says what to pass or run."""


def _remote(path: str) -> bool:
    return "://" in path   # gs://, s3://, hdfs://: an exported pipeline's storage, through TensorFlow's file API


def _open(path: str, mode: str = "r"):
    if _remote(path):
        import tensorflow as tf

        return tf.io.gfile.GFile(path, mode)
    return open(path, mode, encoding="utf-8")


def _makedirs(path: str) -> None:
    if _remote(path):
        import tensorflow as tf

        tf.io.gfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


_RAISE = object()   # a reader's default: a missing file raises


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):   # numpy scalars
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


class PushedVersion:
    """A model version directory (the Trainer's export or its pushed copy) and its published files."""

    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        return f"PushedVersion({self.path!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, PushedVersion) and os.path.abspath(self.path) == os.path.abspath(other.path)

    def __hash__(self) -> int:
        return hash(os.path.abspath(self.path))

    # -- layout ---------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def number(self) -> Optional[int]:
        """The version number (None for a directory not named as a version, e.g. the Trainer's export)."""
        return int(self.name) if _VERSION_NAME.fullmatch(self.name) else None

    @property
    def model_name(self) -> str:
        return os.path.basename(os.path.dirname(os.path.normpath(self.path)))

    def file(self, relative: str) -> str:
        return os.path.join(self.path, *relative.split("/"))

    privacy_path = property(lambda self: self.file(PRIVACY_FILE))
    training_path = property(lambda self: self.file(TRAINING_FILE))
    assets_extra = property(lambda self: self.file(ASSETS_EXTRA))
    preprocessing_path = property(lambda self: self.file(f"{ASSETS_EXTRA}/{PREPROCESSING_FILE}"))
    dataset_path = property(lambda self: self.file(f"{ASSETS_EXTRA}/{DATASET_FILE}"))
    report_json_path = property(lambda self: self.file(REPORT_JSON))
    report_html_path = property(lambda self: self.file(REPORT_HTML))

    def is_complete(self) -> bool:
        """Holds a SavedModel (a version still being copied does not yet)."""
        return any(os.path.isfile(os.path.join(self.path, f)) for f in SAVED_MODEL_FILES)

    # -- what is in it ----------------------------------------------------------------------------------------
    def files(self) -> List[str]:
        """Every file present, as ``/``-separated paths relative to the version directory."""
        out = []
        for root, dirs, names in os.walk(self.path):
            dirs.sort()
            for n in names:
                out.append(os.path.relpath(os.path.join(root, n), self.path).replace(os.sep, "/"))
        return sorted(out)

    @staticmethod
    def declaration(relative: str) -> Optional[PublishedFile]:
        return next((d for d in PUBLISHED_FILES if fnmatch.fnmatchcase(relative, d.pattern)), None)

    def undeclared(self) -> List[str]:
        """Files present that :data:`PUBLISHED_FILES` does not declare (nothing else may leave)."""
        return [f for f in self.files() if self.declaration(f) is None]

    def missing(self, pushed: bool = True) -> List[str]:
        """Required files absent (``pushed``: also those written after the push)."""
        present = self.files()
        return [d.pattern for d in PUBLISHED_FILES if d.required and (pushed or not d.after_push)
                and not any(fnmatch.fnmatchcase(f, d.pattern) for f in present)]

    # -- writers ----------------------------------------------------------------------------------------------
    def _write_json(self, path: str, value: Any, **kw) -> str:
        _makedirs(os.path.dirname(path))
        with _open(path, "w") as f:
            json.dump(value, f, indent=1, default=_plain, **kw)
        return path

    def write_privacy(self, guarantee_text: str) -> str:
        """The guarantee, serialised as ML Metadata holds it (``Guarantee.dumps()``)."""
        with _open(self.privacy_path, "w") as f:
            f.write(guarantee_text)
        return self.privacy_path

    def write_training(self, trainer: str, parameters: Dict[str, Any]) -> str:
        return self._write_json(self.training_path, {"trainer": trainer, "parameters": parameters},
                                sort_keys=True)

    def write_preprocessing(self, description: Any) -> str:
        return self._write_json(self.preprocessing_path, description)

    def write_dataset(self, spec) -> str:
        """``spec`` (a ``core.dataset.DatasetSpec``) as the user's ``dataset.json`` schema."""
        return self._write_json(self.dataset_path, spec.to_description())

    def write_report(self, report: Dict[str, Any], html: str) -> List[str]:
        self._write_json(self.report_json_path, report, sort_keys=True)
        with _open(self.report_html_path, "w") as f:
            f.write(html)
        return [self.report_json_path, self.report_html_path]

    # -- readers ----------------------------------------------------------------------------------------------
    def _read_json(self, path: str, missing: Any = _RAISE) -> Any:
        if missing is not _RAISE and not (_remote(path) or os.path.isfile(path)):
            return missing
        with _open(path) as f:
            return json.load(f)

    def privacy_text(self) -> str:
        with _open(self.privacy_path) as f:
            return f.read()

    def privacy(self, missing: Any = None) -> Optional[Dict[str, Any]]:
        """privacy.json as a dict; ``missing`` when there is none."""
        return self._read_json(self.privacy_path, missing)

    def training(self) -> Dict[str, Any]:
        return self._read_json(self.training_path)

    def preprocessing(self) -> Any:
        return self._read_json(self.preprocessing_path)

    def dataset_description(self) -> Dict[str, Any]:
        """assets.extra/dataset.json as published (the schema of data/*/dataset.json)."""
        return self._read_json(self.dataset_path)

    def dataset_spec(self):
        """assets.extra/dataset.json read by ``core.dataset``'s parser (a ``DatasetSpec`` whose directory is
        assets.extra; the raw files are not there). Raises ``core.dataset.DatasetError`` naming the problem."""
        from core.dataset import DatasetSpec, load_description_file

        raw = self._read_json(self.dataset_path)
        columns = raw.get("columns") if isinstance(raw, dict) else None
        if columns and all(isinstance(c, dict) and "kind" in c and "type" not in c for c in columns):
            # a version pushed before the copy used dataset.json's schema (DatasetSpec.to_json_dict's fields)
            return DatasetSpec.from_json_dict({**raw, "directory": self.assets_extra})
        return load_description_file(self.dataset_path)

    def report(self) -> Dict[str, Any]:
        return self._read_json(self.report_json_path)


# -- the one rule for which versions exist and which is newest -------------------------------------------------
def versions(model_dir: str) -> List[PushedVersion]:
    """The complete versions of one model, oldest first (see the module docstring)."""
    try:
        names = os.listdir(model_dir)
    except OSError:
        return []
    found = [PushedVersion(os.path.join(model_dir, n)) for n in names if _VERSION_NAME.fullmatch(n)]
    return sorted((v for v in found if v.is_complete()), key=lambda v: v.number)


def newest(model_dir: str) -> Optional[PushedVersion]:
    found = versions(model_dir)
    return found[-1] if found else None


def models(serving_dir: str) -> Dict[str, List[PushedVersion]]:
    """``{model name: versions, oldest first}`` for every model directory holding at least one version."""
    try:
        names = sorted(os.listdir(serving_dir))
    except OSError:
        return {}
    out = {}
    for name in names:
        path = os.path.join(serving_dir, name)
        if not name.startswith(".") and os.path.isdir(path):
            found = versions(path)
            if found:
                out[name] = found
    return out


def select_version(serving_dir: str, model_name: Optional[str] = None, version: Optional[str] = None) -> PushedVersion:
    """The pushed version to use: ``version`` of ``model_name`` (default: the newest; the only model when no
    name is given). Raises :class:`PushedVersionError` with one line saying what to pass or run."""
    found = models(serving_dir)
    if not found:
        raise PushedVersionError(f"no pushed model under {serving_dir}; run 'privtrain run' first (a model is "
                                 "pushed only when the Evaluator blesses it) or pass the --workdir of an earlier run")
    if model_name is None:
        if len(found) != 1:
            raise PushedVersionError(f"{serving_dir} holds several models ({', '.join(found)}); choose one with "
                                     "--model-name NAME")
        model_name = next(iter(found))
    elif model_name not in found:
        raise PushedVersionError(f"no pushed model named {model_name!r} under {serving_dir}; pushed: "
                                 f"{', '.join(found)}")
    candidates = found[model_name]
    if version is None:
        return candidates[-1]
    match = [v for v in candidates if v.name == str(version)]
    if not match:
        raise PushedVersionError(f"model {model_name!r} has no version {version}; pushed versions: "
                                 f"{', '.join(v.name for v in candidates)}")
    return match[0]


__all__ = ["PushedVersion", "PushedVersionError", "PublishedFile", "PUBLISHED_FILES", "versions", "newest", "models",
           "select_version", "PRIVACY_FILE", "TRAINING_FILE", "PREPROCESSING_FILE", "DATASET_FILE", "REPORT_JSON",
           "REPORT_HTML", "ASSETS_EXTRA"]
