"""Data-set descriptions: a data directory holds its raw files plus a ``dataset.json`` that says how to read them.

The description is the single source of truth for ingestion (column names and kinds, missing-value token,
label mapping), Transform (which columns are numeric / categorical) and evaluation (slices).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

DESCRIPTION_FILE = "dataset.json"
KINDS = ("numeric", "categorical", "label")


class DatasetError(ValueError):
    """A data directory or its description is unusable; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    kind: str  # numeric | categorical | label
    log1p: bool = False
    positive: Optional[str] = None
    negative: Optional[str] = None
    strip_suffix: str = ""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    directory: str
    columns: Tuple[Column, ...]
    splits: Dict[str, str]
    label_feature: str
    delimiter: str = ","
    missing_value: str = "?"
    slice_features: Tuple[str, ...] = ()
    schema_file: Optional[str] = None
    description: str = ""

    @property
    def label_column(self) -> Column:
        return next(c for c in self.columns if c.kind == "label")

    @property
    def numeric_features(self) -> List[str]:
        return [c.name for c in self.columns if c.kind == "numeric"]

    @property
    def categorical_features(self) -> List[str]:
        return [c.name for c in self.columns if c.kind == "categorical"]

    @property
    def feature_columns(self) -> List[Column]:
        return [c for c in self.columns if c.kind != "label"]

    @property
    def schema_path(self) -> Optional[str]:
        return os.path.join(self.directory, self.schema_file) if self.schema_file else None

    def split_files(self, split: str) -> List[str]:
        return sorted(glob.glob(os.path.join(self.directory, self.splits[split])))

    def to_json_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["columns"] = [dataclasses.asdict(c) for c in self.columns]
        return json.loads(json.dumps(d))  # tuples -> lists: plain JSON for TFX exec properties

    @classmethod
    def from_json_dict(cls, d: dict) -> "DatasetSpec":
        d = dict(d)
        d["columns"] = tuple(Column(**c) for c in d["columns"])
        d["slice_features"] = tuple(d.get("slice_features", ()))
        return cls(**d)

    def fingerprint(self, split: str = "train") -> str:
        """SHA-256 over the split's file contents (the privacy ledger's key for "this data set")."""
        h = hashlib.sha256()
        for path in self.split_files(split):
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()


def load_dataset(directory: str) -> DatasetSpec:
    """Reads ``<directory>/dataset.json`` and checks it, raising :class:`DatasetError` with a fix."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise DatasetError(f"data directory {directory} does not exist; pass --data with a directory that "
                           f"holds the raw files and a {DESCRIPTION_FILE} (see data/adult/ for an example)")
    path = os.path.join(directory, DESCRIPTION_FILE)
    if not os.path.isfile(path):
        raise DatasetError(f"{directory} has no {DESCRIPTION_FILE} describing its columns; copy "
                           f"data/adult/{DESCRIPTION_FILE} and adapt it")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from e
    for key in ("name", "splits", "columns", "label_feature"):
        if key not in raw:
            raise DatasetError(f"{path} lacks the required key '{key}'")
    columns = []
    for i, c in enumerate(raw["columns"]):
        kind = c.get("type")
        if kind not in KINDS:
            raise DatasetError(f"{path}: column {i} ({c.get('name')!r}) has type {kind!r}; use one of {KINDS}")
        columns.append(Column(name=c["name"], kind=kind, log1p=bool(c.get("log1p", False)),
                              positive=c.get("positive"), negative=c.get("negative"),
                              strip_suffix=c.get("strip_suffix", "")))
    labels = [c for c in columns if c.kind == "label"]
    if len(labels) != 1 or labels[0].positive is None or labels[0].negative is None:
        raise DatasetError(f"{path}: exactly one column must have type 'label' with 'positive' and 'negative' values")
    spec = DatasetSpec(
        name=raw["name"], directory=directory, columns=tuple(columns), splits=dict(raw["splits"]),
        label_feature=raw["label_feature"], delimiter=raw.get("delimiter", ","),
        missing_value=raw.get("missing_value", "?"), slice_features=tuple(raw.get("slice_features", ())),
        schema_file=raw.get("schema"), description=raw.get("description", ""))
    if set(spec.splits) != {"train", "eval"}:
        raise DatasetError(f"{path}: 'splits' must map exactly 'train' and 'eval' to file patterns, got {sorted(spec.splits)}")
    for split, pattern in spec.splits.items():
        if not spec.split_files(split):
            raise DatasetError(f"no file matches the {split} split's pattern {pattern!r} in {directory}")
    names = {c.name for c in columns}
    for s in spec.slice_features:
        if s not in names:
            raise DatasetError(f"{path}: slice feature {s!r} is not a column")
    if spec.schema_path and not os.path.isfile(spec.schema_path):
        raise DatasetError(f"{path} names the reference schema {spec.schema_file!r}, which is missing from {directory}")
    return spec
