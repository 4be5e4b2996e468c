"""Data-set descriptions: a data directory holds its raw files plus a ``dataset.json`` that says how to read them.

The description is the single source of truth for ingestion (column names and kinds, missing-value token,
label mapping), Transform (which columns are numeric / categorical), evaluation (slices) and the privacy layer:
its ``privacy`` section declares the data source (``source_id``: the ledger's key), the privacy unit
(``row``, or ``column:NAME`` for a person/client column), the neighbouring relation every mechanism on it is
accounted under, a public planning figure for its size, and which splits are public. The reference schema's
domains (categorical values, numeric ``int_domain``/``float_domain`` ranges) are public by declaration: the
transform uses them instead of anything estimated from the private rows (``public_domains``).

This module is the platform's one reader of ``dataset.json`` and of raw rows outside the pipeline
(``parse_row`` is the pipeline ingestion's row rule; ``read_rows`` reads a whole split with it); it imports
nothing of the pipeline or TFX.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import glob
import math
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

DESCRIPTION_FILE = "dataset.json"
KINDS = ("numeric", "categorical", "label")
IMAGE_KIND = "image"   # dataset.json "kind": fixed-size image tensors in IDX files (docs/image_data.md)
RELATIONS = ("add_or_remove_one", "replace_one")
UNIT_HELP = "use \"row\" (one row is one person) or \"column:NAME\" (NAME identifies the person or client)"


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
    classes: Tuple[str, ...] = ()   # a multi-class label's class names (image data sets): label i is classes[i]


@dataclasses.dataclass(frozen=True)
class ImageFormat:
    """An image data set's tensors (``dataset.json``'s ``image`` section, public by declaration): every example
    is a ``height x width x channels`` array of integer pixels in ``[pixel_min, pixel_max]``; the public
    transform scales that range to [0, 1]. ``files``: the directory the IDX files are in (may be outside the data
    directory, e.g. a Debian data package's), ``package``: the Debian package that installs them."""

    height: int
    width: int
    channels: int = 1
    pixel_min: int = 0
    pixel_max: int = 255
    files: Optional[str] = None
    package: Optional[str] = None

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def num_pixels(self) -> int:
        return self.height * self.width * self.channels


@dataclasses.dataclass(frozen=True)
class PrivacyDeclaration:
    """The ``privacy`` section of ``dataset.json`` (everything in it is public by declaration).

    Attributes:
      source_id: the data source's stable name, the budget ledger's key (never a content hash).
      unit: ``"row"`` or ``"column:NAME"`` (the person or client the guarantee protects).
      relation: the neighbouring relation every mechanism on this source is accounted under:
        ``add_or_remove_one`` (the number of rows stays private: the platform plans sampling rates, steps and
        delta from ``public_row_estimate`` and never publishes the exact count) or ``replace_one`` (the count
        is public; plans use it).
      public_row_estimate: a public planning figure for the training split's size, declared by the data
        owner (not computed from the data); required under ``add_or_remove_one``.
      public_splits: splits whose rows are public by declaration (e.g. a published test set); evaluation
        metrics on a private split are not covered by the guarantee and are labelled so.
      public_benchmark: the whole data set is public (no budget is enforced; runs are still recorded).
    """

    source_id: str
    unit: str = "row"
    relation: str = "add_or_remove_one"
    public_row_estimate: Optional[int] = None
    public_splits: Tuple[str, ...] = ()
    public_benchmark: bool = False

    @property
    def unit_column(self) -> Optional[str]:
        return self.unit.split(":", 1)[1] if self.unit.startswith("column:") else None

    @property
    def unit_name(self) -> str:
        return self.unit_column or "row"

    def is_public_split(self, split: str) -> bool:
        return self.public_benchmark or split in self.public_splits


@dataclasses.dataclass(frozen=True)
class NumericDomain:
    """A numeric feature's public range, after the declared log1p (the transform clips to it)."""

    name: str
    low: float
    high: float
    log1p: bool = False


@dataclasses.dataclass(frozen=True)
class CategoricalDomain:
    """A categorical feature's public vocabulary (values outside it map to one out-of-vocabulary id)."""

    name: str
    values: Tuple[str, ...]


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
    privacy: Optional[PrivacyDeclaration] = None
    image: Optional[ImageFormat] = None   # set for image data sets ("kind": "image")

    @property
    def is_image(self) -> bool:
        return self.image is not None

    @property
    def raw_directory(self) -> str:
        """Where the split files are: the data directory, or an image data set's declared ``files`` directory."""
        if self.image is not None and self.image.files:
            return os.path.join(self.directory, self.image.files)
        return self.directory

    @property
    def classes(self) -> Tuple[str, ...]:
        """Class names of a multi-class label (image data sets); () for the binary tabular label."""
        return self.label_column.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 2

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
        return sorted(glob.glob(os.path.join(self.raw_directory, self.splits[split])))

    def to_description(self) -> dict:
        """The ``dataset.json`` a user would write for this data set (the schema :func:`load_dataset` reads, not
        :meth:`to_json_dict`'s internal one). The pushed model publishes it as ``assets.extra/dataset.json``."""
        d: Dict[str, object] = {"name": self.name}
        if self.image is not None:
            d["kind"] = IMAGE_KIND
        if self.description:
            d["description"] = self.description
        if self.image is not None:
            img = self.image
            d["image"] = {"feature": self.columns[0].name, "height": img.height, "width": img.width,
                          "channels": img.channels, "pixel_range": [img.pixel_min, img.pixel_max],
                          **({"files": img.files} if img.files else {}),
                          **({"package": img.package} if img.package else {})}
            d["splits"] = dict(self.splits)
            d["label"] = {"name": self.label_feature, "classes": list(self.classes)}
        else:
            d.update(delimiter=self.delimiter, missing_value=self.missing_value, splits=dict(self.splits))
            columns = []
            for c in self.columns:
                entry: Dict[str, object] = {"name": c.name, "type": c.kind}
                if c.log1p:
                    entry["log1p"] = True
                for key in ("positive", "negative"):
                    if getattr(c, key) is not None:
                        entry[key] = getattr(c, key)
                if c.strip_suffix:
                    entry["strip_suffix"] = c.strip_suffix
                columns.append(entry)
            d["columns"] = columns
            d["label_feature"] = self.label_feature
        if self.slice_features:
            d["slice_features"] = list(self.slice_features)
        if self.schema_file:
            d["schema"] = self.schema_file
        if self.privacy is not None:
            p = self.privacy
            d["privacy"] = {"source_id": p.source_id, "unit": p.unit, "relation": p.relation,
                            **({"public_row_estimate": p.public_row_estimate}
                               if p.public_row_estimate is not None else {}),
                            **({"public_splits": list(p.public_splits)} if p.public_splits else {}),
                            **({"public_benchmark": True} if p.public_benchmark else {})}
        return d

    def to_json_dict(self) -> dict:
        """Every field, in this class's own names (the pipeline's TFX exec properties; not a ``dataset.json``)."""
        d = dataclasses.asdict(self)
        d["columns"] = [dataclasses.asdict(c) for c in self.columns]
        return json.loads(json.dumps(d))  # tuples -> lists: plain JSON for TFX exec properties

    @classmethod
    def from_json_dict(cls, d: dict) -> "DatasetSpec":
        d = dict(d)
        d["columns"] = tuple(Column(**{**c, "classes": tuple(c.get("classes", ()))}) for c in d["columns"])
        if d.get("image") is not None:
            d["image"] = ImageFormat(**d["image"])
        d["slice_features"] = tuple(d.get("slice_features", ()))
        if d.get("privacy") is not None:
            p = dict(d["privacy"])
            p["public_splits"] = tuple(p.get("public_splits", ()))
            d["privacy"] = PrivacyDeclaration(**p)
        return cls(**d)

    def require_privacy(self) -> PrivacyDeclaration:
        if self.privacy is None:
            raise DatasetError(
                f"{os.path.join(self.directory, DESCRIPTION_FILE)} has no \"privacy\" section; declare the data "
                "source, e.g. \"privacy\": {\"source_id\": \"my-source\", \"unit\": \"row\", \"relation\": "
                "\"add_or_remove_one\", \"public_row_estimate\": 30000} (see docs/privacy_model.md)")
        return self.privacy

    def public_domains(self) -> Dict[str, object]:
        """{feature: NumericDomain | CategoricalDomain} from the reference schema (public by declaration).

        Raises DatasetError naming the feature when a feature has no declared domain (the privacy layer
        must then not derive one from the private rows)."""
        if not self.schema_path:
            raise DatasetError(f"{self.name}: no reference schema; the public feature domains (categorical "
                               "values, numeric ranges) come from it: add \"schema\" to dataset.json")
        from google.protobuf import text_format
        from tensorflow_metadata.proto.v0 import schema_pb2
        with open(self.schema_path) as f:
            schema = text_format.Parse(f.read(), schema_pb2.Schema())
        string_domains = {d.name: tuple(d.value) for d in schema.string_domain}
        features = {f.name: f for f in schema.feature}
        out: Dict[str, object] = {}
        for column in self.feature_columns:
            if column.kind == IMAGE_KIND:   # its public range is the image section's pixel range
                continue
            feature = features.get(column.name)
            if feature is None:
                raise DatasetError(f"{self.schema_path}: feature {column.name!r} is missing from the reference schema")
            if column.kind == "numeric":
                if feature.HasField("int_domain") and feature.int_domain.HasField("min") \
                        and feature.int_domain.HasField("max"):
                    low, high = float(feature.int_domain.min), float(feature.int_domain.max)
                elif feature.HasField("float_domain") and feature.float_domain.HasField("min") \
                        and feature.float_domain.HasField("max"):
                    low, high = float(feature.float_domain.min), float(feature.float_domain.max)
                else:
                    raise DatasetError(
                        f"{self.schema_path}: numeric feature {column.name!r} has no declared range; add "
                        "int_domain { min: LOW max: HIGH } (public bounds, e.g. from the data's documentation, "
                        "never from the private rows)")
                if column.log1p:
                    if low < 0:
                        raise DatasetError(f"{self.schema_path}: feature {column.name!r} is log1p but its range "
                                           f"starts below 0 ({low:g})")
                    low, high = float(math.log1p(low)), float(math.log1p(high))
                if not high > low:
                    raise DatasetError(f"{self.schema_path}: feature {column.name!r} has an empty range "
                                       f"[{low:g}, {high:g}]")
                out[column.name] = NumericDomain(column.name, low, high, column.log1p)
            else:
                if feature.HasField("domain") and feature.domain in string_domains:
                    values = string_domains[feature.domain]
                elif feature.HasField("string_domain"):
                    values = tuple(feature.string_domain.value)
                else:
                    raise DatasetError(
                        f"{self.schema_path}: categorical feature {column.name!r} has no declared domain; list its "
                        "values in a string_domain (public, e.g. from the data's documentation)")
                if not values:
                    raise DatasetError(f"{self.schema_path}: categorical feature {column.name!r} has an empty domain")
                out[column.name] = CategoricalDomain(column.name, tuple(values))
        return out



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
    return parse_description(raw, directory, path)


def load_description_file(path: str) -> DatasetSpec:
    """A ``dataset.json`` outside its data directory (e.g. the copy a pushed model publishes): checked as
    :func:`load_dataset` checks it, except that the raw files and the reference schema need not be beside it."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise DatasetError(f"cannot read the data-set description {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from e
    return parse_description(raw, os.path.dirname(os.path.abspath(path)), path, check_files=False)


def parse_description(raw, directory: str, path: str, check_files: bool = True) -> DatasetSpec:
    """The one parser of ``dataset.json``'s content; ``check_files``: also check that the split files and the
    reference schema exist in ``directory``."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{path} must hold a JSON object (see data/adult/{DESCRIPTION_FILE})")
    if raw.get("kind") == IMAGE_KIND:
        return _load_image_dataset(directory, path, raw, check_files)
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
    privacy = _privacy_declaration(raw.get("privacy"), path, columns, raw.get("splits", {}))
    spec = DatasetSpec(
        privacy=privacy,
        name=raw["name"], directory=directory, columns=tuple(columns), splits=dict(raw["splits"]),
        label_feature=raw["label_feature"], delimiter=raw.get("delimiter", ","),
        missing_value=raw.get("missing_value", "?"), slice_features=tuple(raw.get("slice_features", ())),
        schema_file=raw.get("schema"), description=raw.get("description", ""))
    if set(spec.splits) != {"train", "eval"}:
        raise DatasetError(f"{path}: 'splits' must map exactly 'train' and 'eval' to file patterns, got {sorted(spec.splits)}")
    for split, pattern in spec.splits.items():
        if check_files and not spec.split_files(split):
            raise DatasetError(f"no file matches the {split} split's pattern {pattern!r} in {directory}")
    names = {c.name for c in columns}
    for s in spec.slice_features:
        if s not in names:
            raise DatasetError(f"{path}: slice feature {s!r} is not a column")
    if check_files and spec.schema_path and not os.path.isfile(spec.schema_path):
        raise DatasetError(f"{path} names the reference schema {spec.schema_file!r}, which is missing from {directory}")
    return spec


def _privacy_declaration(raw, path: str, columns, splits) -> Optional[PrivacyDeclaration]:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: \"privacy\" must be an object with source_id, unit, relation")
    known = {f.name for f in dataclasses.fields(PrivacyDeclaration)}
    unknown = set(raw) - known
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {sorted(unknown)} in \"privacy\"; known: {sorted(known)}")
    source_id = raw.get("source_id")
    if not isinstance(source_id, str) or not source_id.strip() or len(source_id) > 200:
        raise DatasetError(f"{path}: privacy.source_id must be a non-empty name of the data source (the budget "
                           "ledger's key), e.g. \"hospital-a-admissions-2024\"")
    unit = raw.get("unit", "row")
    names = {c.name for c in columns}
    if not isinstance(unit, str) or not (unit == "row" or (unit.startswith("column:") and unit[7:])):
        raise DatasetError(f"{path}: unknown privacy unit {unit!r}; {UNIT_HELP}")
    if unit.startswith("column:") and unit[7:] not in names:
        raise DatasetError(f"{path}: privacy unit {unit!r} names no column; {UNIT_HELP}")
    relation = raw.get("relation", "add_or_remove_one")
    if relation not in RELATIONS:
        raise DatasetError(f"{path}: unknown neighbouring relation {relation!r}; use one of {', '.join(RELATIONS)}")
    estimate = raw.get("public_row_estimate")
    if estimate is not None and (isinstance(estimate, bool) or not isinstance(estimate, int) or estimate < 1):
        raise DatasetError(f"{path}: privacy.public_row_estimate must be a positive whole number (a public "
                           f"planning figure), got {estimate!r}")
    public_splits = raw.get("public_splits", [])
    if not isinstance(public_splits, list) or any(s not in splits for s in public_splits):
        raise DatasetError(f"{path}: privacy.public_splits must list split names from \"splits\", got {public_splits!r}")
    if "train" in public_splits:
        raise DatasetError(f"{path}: the train split cannot be declared public in privacy.public_splits; set "
                           "privacy.public_benchmark to true if the whole data set is public")
    return PrivacyDeclaration(source_id=source_id.strip(), unit=unit, relation=relation,
                              public_row_estimate=estimate, public_splits=tuple(public_splits),
                              public_benchmark=bool(raw.get("public_benchmark", False)))


# ------------------------------------------------------------------------------------------------------------
# Raw rows: the one parser (the pipeline's ingestion applies the same ``parse_row``)
# ------------------------------------------------------------------------------------------------------------
class RowError(DatasetError):
    """A raw row cannot be read as the data set's description says (the message names file and line)."""


def parse_row(spec: DatasetSpec, cells: Sequence[str], where: str) -> List[str]:
    """One row's cells as the description says: stripped, the missing token -> "", the label (after stripping
    its suffix) -> "1"/"0". A wrong number of fields or an unknown label raises :class:`RowError` naming
    ``where`` (file and line)."""
    if len(cells) != len(spec.columns):
        names = ", ".join(c.name for c in spec.columns)
        raise RowError(
            f"{where}: expected {len(spec.columns)} fields ({names}) separated by {spec.delimiter!r}, "
            f"found {len(cells)}; fix the file or the column list in {spec.directory}/dataset.json")
    out = []
    for column, cell in zip(spec.columns, cells):
        cell = cell.strip()
        if cell == spec.missing_value:
            cell = ""
        if column.kind == "label":
            if column.strip_suffix and cell.endswith(column.strip_suffix):
                cell = cell[: -len(column.strip_suffix)]
            if cell == column.positive:
                cell = "1"
            elif cell == column.negative:
                cell = "0"
            else:
                raise RowError(f"{where}: label column {column.name!r} has {cell!r}; expected "
                               f"{column.positive!r} or {column.negative!r}")
        out.append(cell)
    return out


def iter_file_rows(spec: DatasetSpec, path: str, opener=open):
    """Yields ``(where, parsed cells)`` for every non-blank line of one raw file (blank lines are skipped, as
    the pipeline's ingestion does; every other line is parsed or raises). A UTF-8 byte-order mark and CRLF or
    CR line endings read like the plain file (as the pipeline's data gate accepts them)."""
    if opener is open:
        def opener(p, mode):  # noqa: E306
            return open(p, mode, encoding="utf-8-sig", newline="")
    with opener(path, "r") as f:
        for lineno, cells in enumerate(csv.reader(f, delimiter=spec.delimiter), start=1):
            if not cells or all(not c.strip() for c in cells):
                continue
            where = f"{os.path.basename(path)} line {lineno}"
            yield where, parse_row(spec, cells, where)


# ------------------------------------------------------------------------------------------------------------
# The row-local rule (the data gate's one reading rule, docs/privacy_model.md "Which checks can stop a run"):
# a public split is read strictly; a private split row by row, a damaged line dropped (under replace_one
# replaced by the public placeholder row) and counted privately, never a reason to stop.
# ------------------------------------------------------------------------------------------------------------
def is_private_split(spec: DatasetSpec, split: str) -> bool:
    """A split whose rows are private: every split unless the data set declares it public."""
    return spec.privacy is None or not spec.privacy.is_public_split(split)


# What a private split's line can be dropped for (the keys of the private tallies)
DROP_REASONS = ("NUL byte", "not UTF-8", "cannot be split into fields", "header-like line",
                "wrong number of fields or unknown label")


class _DamagedLine(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _looks_like_header(spec: DatasetSpec, cells: List[str]) -> bool:
    """Most cells are column names (or the label feature's name): a header line, not a data row."""
    names = {c.name.lower() for c in spec.columns} | {spec.label_feature.lower()}
    hits = sum(1 for cell in cells if cell.strip().strip('"').lower() in names)
    return hits >= max(2, len(spec.columns) // 2)


def _read_line(spec: DatasetSpec, raw: bytes, where: str) -> Optional[List[str]]:
    """One line's cleaned cells, None for a blank line; raises :class:`_DamagedLine`."""
    if b"\x00" in raw:
        raise _DamagedLine(DROP_REASONS[0], f"{where}: contains a NUL byte (a binary or UTF-16 file?); save it "
                                            "as UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _DamagedLine(DROP_REASONS[1], f"{where}: byte {e.start + 1} (0x{raw[e.start]:02x}) is not UTF-8 "
                                            "text; save the file as UTF-8") from None
    if not text.strip():
        return None
    try:
        cells = next(csv.reader([text], delimiter=spec.delimiter))
    except csv.Error as e:
        raise _DamagedLine(DROP_REASONS[2], f"{where}: cannot be split into fields ({e})") from None
    if _looks_like_header(spec, cells):
        raise _DamagedLine(DROP_REASONS[3], f"{where}: is a header line (column names) inside the data; "
                                            "dataset.json describes files without a header: delete the line")
    try:
        return parse_row(spec, cells, where)
    except RowError as e:
        raise _DamagedLine(DROP_REASONS[4], str(e)) from None


def keeps_row_count(spec: DatasetSpec) -> bool:
    """Under ``replace_one`` the number of rows is public: a damaged row is replaced, never dropped."""
    return spec.privacy is not None and spec.privacy.relation == "replace_one"


def placeholder_row(spec: DatasetSpec) -> List[str]:
    """The public row that stands for a damaged one under ``replace_one``: every feature missing, label 0."""
    return ["0" if c.kind == "label" else "" for c in spec.columns]


def iter_raw_lines(spec: DatasetSpec, path: str, data: bytes, private: bool = False,
                   dropped: Optional[Dict[str, int]] = None, first: Optional[List[str]] = None):
    """Yields ``(where, cleaned cells)`` for every row of one raw file's bytes, by the row-local rule.

    ``private=False`` (a public split): a damaged line raises :class:`RowError` naming file and line.
    ``private=True``: a damaged line never stops the read (row-local) and is counted in ``dropped`` by reason
    (:data:`DROP_REASONS`), a private tally; ``first`` receives the first such line's message. Under
    ``add_or_remove_one`` the line is dropped (a removal); under ``replace_one``, where the row count is public,
    it becomes :func:`placeholder_row`, so the count never depends on a row's content."""
    name = os.path.basename(path)
    dropped = {} if dropped is None else dropped
    if data.startswith(codecs.BOM_UTF8):  # a UTF-8 byte-order mark (Windows editors write one): harmless
        data = data[len(codecs.BOM_UTF8):]
    for lineno, raw in enumerate(data.splitlines(), start=1):  # \n, \r\n and \r all end a line
        where = f"{name} line {lineno}"
        try:
            row = _read_line(spec, raw, where)
        except _DamagedLine as e:
            if not private:
                raise RowError(e.message) from None
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
            if first is not None and not first:
                first.append(e.message)
            if keeps_row_count(spec):
                yield where, placeholder_row(spec)
            continue
        if row is not None:
            yield where, row


def iter_raw_rows(spec: DatasetSpec, path: str, data: bytes, private: bool = False,
                  dropped: Optional[Dict[str, int]] = None, first: Optional[List[str]] = None):
    """The cleaned rows of one raw file's bytes (:func:`iter_raw_lines` without the line names)."""
    for _, row in iter_raw_lines(spec, path, data, private=private, dropped=dropped, first=first):
        yield row


def _iter_split_lines(spec: DatasetSpec, split: str):
    private = is_private_split(spec, split)
    for path in spec.split_files(split):
        with open(path, "rb") as f:
            data = f.read()
        yield from iter_raw_lines(spec, path, data, private=private)


def readable_rows(spec: DatasetSpec, split: str) -> int:
    """The number of rows of ``split`` as ingestion reads them (a private split row by row), e.g. the public
    exact count under ``replace_one`` (damaged rows are placeholders there, so it counts every data line)."""
    if spec.is_image:
        return int(len(read_images(spec, split, row_local={} if is_private_split(spec, split) else None).labels))
    return sum(1 for _ in _iter_split_lines(spec, split))


@dataclasses.dataclass
class RawRows:
    """A split's rows by column: numerics as float64 with NaN for missing, categoricals as strings with "" for
    missing (what ``core.features.transform_columns`` takes), labels as float32 0/1."""

    columns: Dict[str, object]
    labels: object
    files: Tuple[str, ...]

    @property
    def num_rows(self) -> int:
        return int(len(self.labels))


def read_rows(spec: DatasetSpec, split: str) -> RawRows:
    """Reads every file of ``split`` by the data gate's rule (:func:`iter_raw_lines`). A public split is read
    strictly: a damaged line, or a numeric cell that is not a number, raises :class:`RowError` naming file, line
    and column. A private split is read row by row, as ingestion reads it: a damaged line is dropped (under
    ``replace_one`` replaced by the placeholder row) and a numeric cell that is not a number is missing, so one
    private row never stops a read (docs/privacy_model.md)."""
    import numpy as np

    if split not in spec.splits:
        raise DatasetError(f"{spec.name}: no split {split!r}; dataset.json names {sorted(spec.splits)}")
    files = spec.split_files(split)
    if not files:
        raise DatasetError(f"no file matches the {split} split's pattern {spec.splits[split]!r} in {spec.directory}")
    cols: Dict[str, list] = {c.name: [] for c in spec.columns}
    private = is_private_split(spec, split)
    for where, cells in _iter_split_lines(spec, split):
        for column, cell in zip(spec.columns, cells):
            if column.kind == "numeric":
                if cell == "":
                    value = math.nan
                else:
                    try:
                        value = float(cell)
                    except ValueError:
                        if private:   # the gate's rule: missing, never a reason to stop
                            cols[column.name].append(math.nan)
                            continue
                        raise RowError(f"{where}: numeric column {column.name!r} has {cell!r}; fix the file "
                                       f"or declare the column categorical in {spec.directory}/dataset.json"
                                       ) from None
                cols[column.name].append(value)
            else:
                cols[column.name].append(cell)
    label = spec.label_column.name
    labels = np.asarray([float(v) for v in cols.pop(label)], np.float32)
    out: Dict[str, object] = {}
    for column in spec.feature_columns:
        values = cols[column.name]
        out[column.name] = (np.asarray(values, np.float64) if column.kind == "numeric"
                            else np.asarray(values, dtype=object))
    return RawRows(out, labels, tuple(files))


# ------------------------------------------------------------------------------------------------------------
# Image data sets: dataset.json "kind": "image", split files in the IDX format (the one reader of them)
# ------------------------------------------------------------------------------------------------------------
IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(DatasetError):
    """An IDX file cannot be read as the data set's description says (the message names the file)."""


def _load_image_dataset(directory: str, path: str, raw: dict, check_files: bool = True) -> DatasetSpec:
    for key in ("name", "splits", "image", "label"):
        if key not in raw:
            raise DatasetError(f"{path} lacks the required key '{key}' of an image data set (see "
                               "data/fashion_mnist/dataset.json)")
    img, label = raw["image"], raw["label"]
    try:
        height, width, channels = int(img["height"]), int(img["width"]), int(img.get("channels", 1))
        low, high = (int(v) for v in img.get("pixel_range", (0, 255)))
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{path}: \"image\" must hold whole numbers height, width, channels and a pixel_range "
                           "[low, high], e.g. {\"height\": 28, \"width\": 28, \"channels\": 1, \"pixel_range\": "
                           "[0, 255]}") from None
    if min(height, width, channels) < 1 or not 0 <= low < high <= 255:
        raise DatasetError(f"{path}: image shape {height}x{width}x{channels} or pixel range [{low}, {high}] is "
                           "invalid; IDX unsigned-byte pixels need 0 <= low < high <= 255")
    classes = label.get("classes") if isinstance(label, dict) else None
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) != len(classes):
        raise DatasetError(f"{path}: \"label\" must name the label feature and list its distinct class names, e.g. "
                           "{\"name\": \"label\", \"classes\": [\"T-shirt/top\", \"Trouser\", ...]} (label i is "
                           "classes[i])")
    label_name = str(label.get("name", "label"))
    image = ImageFormat(height=height, width=width, channels=channels, pixel_min=low, pixel_max=high,
                        files=img.get("files"), package=img.get("package"))
    columns = (Column(name=str(img.get("feature", "image")), kind=IMAGE_KIND),
               Column(name=label_name, kind="label", classes=tuple(classes)))
    privacy = _privacy_declaration(raw.get("privacy"), path, columns, raw.get("splits", {}))
    spec = DatasetSpec(
        name=raw["name"], directory=directory, columns=columns, splits=dict(raw["splits"]),
        label_feature=label_name, slice_features=tuple(raw.get("slice_features", ())),
        schema_file=raw.get("schema"), description=raw.get("description", ""), privacy=privacy, image=image)
    if set(spec.splits) != {"train", "eval"}:
        raise DatasetError(f"{path}: 'splits' must map exactly 'train' and 'eval' to file patterns, got "
                           f"{sorted(spec.splits)}")
    if check_files and not os.path.isdir(spec.raw_directory):
        how = (f"install Debian's {image.package} package (apt-get install {image.package}, which "
               "scripts/setup_system.sh does as root)" if image.package else "put the IDX files there")
        raise DatasetError(f"the image files directory {spec.raw_directory} named in {path} does not exist; {how}")
    for split, pattern in spec.splits.items():
        if check_files and not spec.split_files(split):
            raise DatasetError(f"no file matches the {split} split's pattern {pattern!r} in {spec.raw_directory}")
    for s in spec.slice_features:
        if s != label_name:
            raise DatasetError(f"{path}: an image data set can be sliced by its label {label_name!r} only, not {s!r}")
    if check_files and spec.schema_path and not os.path.isfile(spec.schema_path):
        raise DatasetError(f"{path} names the reference schema {spec.schema_file!r}, which is missing from {directory}")
    return spec


def read_idx(path: str, data: Optional[bytes] = None):
    """One IDX file (gzip'd or not) -> numpy uint8 array of its declared dimensions. Checks the magic number
    (two zero bytes, type 0x08 = unsigned byte, the number of dimensions), that the length is exactly the header
    plus the product of the dimensions, and raises :class:`IdxError` naming the file and the fix otherwise."""
    import gzip
    import zlib

    import numpy as np

    name = os.path.basename(path)
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise IdxError(f"{name}: the gzip stream is damaged or truncated ({e}); download or reinstall the file"
                           ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE or not 1 <= data[3] <= 4:
        magic = data[:4].hex() if data else "(empty file)"
        raise IdxError(f"{name}: not an IDX file of unsigned bytes (magic number {magic}, expected 0000080N with "
                       "N the number of dimensions, e.g. 00000803 for images, 00000801 for labels)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{name}: truncated inside its header ({len(data)} bytes, the header alone has {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise IdxError(f"{name}: {what}: the header declares dimensions {'x'.join(map(str, dims))} "
                       f"({expected} bytes) but the file has {len(data)} bytes; download or reinstall the file")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


@dataclasses.dataclass
class ImageRows:
    """A split of an image data set: uint8 images ``[n, height, width, channels]`` and int64 labels ``[n]``."""

    images: object
    labels: object
    files: Tuple[str, ...]

    @property
    def num_rows(self) -> int:
        return int(len(self.labels))


def split_idx_files(spec: DatasetSpec, split: str, files: Optional[Sequence[str]] = None) -> Tuple[str, str]:
    """``(images file, labels file)`` of a split: its pattern matches one IDX file of each, told apart by their
    magic number's number of dimensions (1: labels; 3, or 4 with channels: images)."""
    files = list(files if files is not None else spec.split_files(split))
    by_rank: Dict[str, List[str]] = {"images": [], "labels": []}
    for path in files:
        import gzip
        import zlib
        try:
            with (gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")) as f:
                head = f.read(4)
        except (EOFError, OSError, zlib.error) as e:
            raise IdxError(f"{os.path.basename(path)}: the gzip stream is damaged ({e}); download or reinstall "
                           "the file") from None
        rank = head[3] if len(head) == 4 else 0
        by_rank["labels" if rank == 1 else "images"].append(path)
    if len(by_rank["images"]) != 1 or len(by_rank["labels"]) != 1:
        names = ", ".join(os.path.basename(p) for p in files) or "no file"
        raise IdxError(f"the {split} split's pattern {spec.splits[split]!r} must match exactly one IDX images file "
                       f"and one IDX labels file in {spec.raw_directory}; it matches {names}")
    return by_rank["images"][0], by_rank["labels"][0]


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def read_images(spec: DatasetSpec, split: str, files: Optional[Sequence[str]] = None,
                row_local: Optional[Dict[str, int]] = None) -> ImageRows:
    """Reads and checks one split of an image data set (``files``: the split's files, default its pattern's
    matches): both files' IDX headers, the images' shape against the declared one, the two counts, and every
    label against the declared classes. Raises :class:`IdxError` naming the file.

    ``row_local`` (a private split; a dict that counts, e.g. a Counter): per-example problems never raise, so one
    example never stops a run: an example whose label is outside the classes is dropped, pixels outside the
    declared range are clipped to it; the counts go to ``row_local`` (private). File-level problems still
    raise."""
    import numpy as np

    if spec.image is None:
        raise DatasetError(f"{spec.name} is not an image data set (dataset.json has no \"kind\": \"image\")")
    images_path, labels_path = split_idx_files(spec, split, files)
    images, labels = read_idx(images_path), read_idx(labels_path)
    h, w, c = spec.image.shape
    iname, lname = os.path.basename(images_path), os.path.basename(labels_path)
    if images.ndim == 3 and c == 1:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != (h, w, c):
        raise IdxError(f"{iname}: images are {'x'.join(map(str, images.shape[1:]))}, but dataset.json declares "
                       f"{h}x{w}x{c} (height x width x channels); fix the file or the \"image\" section")
    if labels.ndim != 1:
        raise IdxError(f"{lname}: a labels file must have one dimension, it has {labels.ndim}")
    if len(images) != len(labels):
        raise IdxError(f"{lname}: {len(labels)} labels for the {len(images)} images of {iname}; the two files of "
                       f"the {split} split must hold the same number of examples")
    if len(labels) == 0:
        raise IdxError(f"{iname}: the {split} split has no images")
    k = len(spec.classes)
    bad = np.flatnonzero(labels >= k)
    if bad.size and row_local is not None:
        row_local["label outside the classes"] = row_local.get("label outside the classes", 0) + int(bad.size)
        if spec.privacy is not None and spec.privacy.relation == "replace_one":  # the count is public: replace
            images, labels = images.copy(), labels.copy()
            images[bad], labels[bad] = 0, 0     # the public placeholder example: a blank image of class 0
        else:
            keep = labels < k
            images, labels = images[keep], labels[keep]
    elif bad.size:
        raise IdxError(f"{lname}: example {int(bad[0])} has label {int(labels[bad[0]])}, outside the {k} classes "
                       "declared in dataset.json (labels are 0..{})".format(k - 1))
    low, high = spec.image.pixel_min, spec.image.pixel_max
    if low > 0 or high < 255:
        out = np.flatnonzero((images < low).any(axis=(1, 2, 3)) | (images > high).any(axis=(1, 2, 3)))
        if out.size and row_local is not None:
            row_local["pixels clipped"] = row_local.get("pixels clipped", 0) + int(out.size)
            images = np.clip(images, low, high).astype(images.dtype)
        elif out.size:
            raise IdxError(f"{iname}: image {int(out[0])} has pixels outside the declared range [{low}, {high}]")
    return ImageRows(images, labels.astype(np.int64), (images_path, labels_path))
