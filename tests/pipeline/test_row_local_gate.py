"""The data gate never makes a go/no-go decision on one private row (issue 17.2).

Two neighbouring data sets, the clean Adult sample and the same with ONE more training row (out of range,
unknown category, damaged line), must get the same outcome from both halves of the gate: the structural check
(``check_raw_data``, before anything runs) and the ExampleValidator's executor (TFDV against the reference
schema). Both are run in-process (seconds). The public eval split is still checked strictly: the same damage
there stops the run.
"""
from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from tests.conftest import make_adult_sample

TRAIN, EVAL = "adult.data", "adult.test"
AGE, NATIVE_COUNTRY = 0, 13


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_adult_sample(str(tmp_path_factory.mktemp("row_local_clean")), train_rows=200, eval_rows=100)


def _neighbour(clean_dir, directory, target, extra_lines):
    """A copy of the clean sample with ``extra_lines`` (bytes) appended to the file ``target``."""
    shutil.copytree(clean_dir, directory)
    with open(os.path.join(directory, target), "ab") as f:
        f.write(b"".join(extra_lines))
    return directory


def _first_line(clean_dir, name=TRAIN) -> str:
    with open(os.path.join(clean_dir, name)) as f:
        return f.readline().rstrip("\n")


def _with(line: str, field: int, value: str) -> bytes:
    cells = line.split(", ")
    cells[field] = value
    return (", ".join(cells) + "\n").encode()


HEADER = ("age, workclass, fnlwgt, education, education-num, marital-status, occupation, relationship, race, "
          "sex, capital-gain, capital-loss, hours-per-week, native-country, income")

# one extra row (bytes) made from a clean row: every kind of damage a single row can carry
ONE_ROW = {
    "age_91_out_of_range": lambda row: _with(row, AGE, "91"),
    "unknown_category": lambda row: _with(row, NATIVE_COUNTRY, "Atlantis"),
    "age_not_a_number": lambda row: _with(row, AGE, "thirty-nine"),
    "unknown_label": lambda row: _with(row, 14, "maybe"),
    "too_few_fields": lambda row: (", ".join(row.split(", ")[:13]) + "\n").encode(),
    "header_line": lambda row: (HEADER + "\n").encode(),
    "latin1_bytes": lambda row: _with(row, NATIVE_COUNTRY, "Österreich").decode().encode("latin-1"),
    "nul_byte": lambda row: row.encode() + b"\x00\n",
}


def _gate_outcome(directory):
    """'publishable' or the refusal's message."""
    from core.dataset import load_dataset
    from pipeline.data_gate import IngestionError, check_raw_data

    try:
        check_raw_data(load_dataset(directory))
        return "publishable"
    except IngestionError as e:
        return str(e)


@pytest.mark.parametrize("damage", sorted(ONE_ROW))
def test_one_private_row_never_flips_the_structural_gate(damage, clean, tmp_path):
    neighbour = _neighbour(clean, str(tmp_path / "neighbour"), TRAIN, [ONE_ROW[damage](_first_line(clean))])
    assert _gate_outcome(clean) == "publishable"
    assert _gate_outcome(neighbour) == _gate_outcome(clean)


@pytest.mark.parametrize("damage", ["unknown_label", "too_few_fields", "header_line", "latin1_bytes",
                                    "nul_byte"])
def test_the_same_damage_on_the_public_eval_split_still_stops_the_run(damage, clean, tmp_path):
    neighbour = _neighbour(clean, str(tmp_path / "neighbour"), EVAL, [ONE_ROW[damage](_first_line(clean, EVAL))])
    outcome = _gate_outcome(neighbour)
    assert outcome != "publishable" and "adult.test line 101" in outcome and "\n" not in outcome, outcome


def test_damaged_private_lines_are_counted_privately_and_an_unreadable_split_stops(clean, tmp_path):
    from core.dataset import load_dataset
    from pipeline.data_gate import IngestionError, check_raw_data, write_private_checks

    row = _first_line(clean)
    neighbour = _neighbour(clean, str(tmp_path / "n"), TRAIN,
                           [ONE_ROW[d](row) for d in ("unknown_label", "too_few_fields", "age_not_a_number")])
    tally = check_raw_data(load_dataset(neighbour))
    assert tally["train"]["private"] and not tally["eval"]["private"]
    assert tally["train"]["rows"] == 201 and sum(tally["train"]["dropped"].values()) == 2
    assert tally["train"]["unparsed_numeric_cells"] == {"age": 1}
    workdir = str(tmp_path / "work")
    os.makedirs(workdir, mode=0o700)
    path = write_private_checks(workdir, tally)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    with open(path) as f:
        assert json.load(f)["structural"]["train"]["rows"] == 201
    # the one data-dependent stop: a split with no readable row (tells the empty data set from its neighbours)
    empty = str(tmp_path / "empty")
    shutil.copytree(clean, empty)
    with open(os.path.join(empty, TRAIN), "w") as f:
        f.write(HEADER.replace(", ", ";") + "\n")
    with pytest.raises(IngestionError) as e:
        check_raw_data(load_dataset(empty))
    assert "train split has no data rows" in str(e.value) and "adult.data line 1" in str(e.value)


# -- the ExampleValidator's executor on neighbouring statistics --------------------------------------------------
def _examples(path):
    """tf.Examples of a sample file's readable rows, typed as the reference schema declares (INT numerics)."""
    import tensorflow as tf

    from core.dataset import load_dataset, parse_row

    spec = load_dataset(os.path.dirname(path))
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            cells = parse_row(spec, line.rstrip("\n").split(","), f"line {i + 1}")
            feature = {}
            for column, cell in zip(spec.columns, cells):
                name = spec.label_feature if column.kind == "label" else column.name
                if not cell:   # the missing-value token: an absent feature, as ingestion writes it
                    continue
                if column.kind in ("label", "numeric"):
                    feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(cell)]))
                else:
                    feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[cell.encode()]))
            out.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return out


def _statistics_artifact(data_dir, directory):
    import tensorflow_data_validation as tfdv
    from tfx import version
    from tfx.types import artifact_utils, standard_artifacts
    from tfx_bsl.coders import example_coder

    artifact = standard_artifacts.ExampleStatistics()
    artifact.uri = directory
    artifact.split_names = artifact_utils.encode_split_names(["train", "eval"])
    artifact.set_string_custom_property("tfx_version", version.__version__)
    decoder = example_coder.ExamplesToRecordBatchDecoder()
    for split, name in (("train", TRAIN), ("eval", EVAL)):
        batch = decoder.DecodeBatch(_examples(os.path.join(data_dir, name)))
        stats = tfdv.generate_statistics_from_record_batch(batch) if hasattr(
            tfdv, "generate_statistics_from_record_batch") else _stats_in_memory(batch)
        os.makedirs(os.path.join(directory, f"Split-{split}"))
        with open(os.path.join(directory, f"Split-{split}", "FeatureStats.pb"), "wb") as f:
            f.write(stats.SerializeToString())
    return artifact


def _stats_in_memory(batch):
    from tensorflow_data_validation.statistics import stats_impl, stats_options

    return stats_impl.generate_statistics_in_memory(batch, stats_options.StatsOptions())


def _validator_outcome(data_dir, workdir):
    """'publishable' or the DataValidationError's message, from the executor run in-process on the data's
    statistics against the reference schema, with the eval split public (as Adult declares)."""
    from tfx.types import standard_artifacts, standard_component_specs as specs

    from pipeline.validation import DataValidationError, StrictValidatorExecutor

    schema = standard_artifacts.Schema()
    schema.uri = os.path.join(workdir, "schema")
    os.makedirs(schema.uri)
    shutil.copy(os.path.join(data_dir, "schema.pbtxt"), schema.uri)
    anomalies = standard_artifacts.ExampleAnomalies()
    anomalies.uri = os.path.join(workdir, "anomalies")
    inputs = {specs.STATISTICS_KEY: [_statistics_artifact(data_dir, os.path.join(workdir, "stats"))],
              specs.SCHEMA_KEY: [schema]}
    try:
        StrictValidatorExecutor().Do(inputs, {specs.ANOMALIES_KEY: [anomalies]},
                                     {specs.EXCLUDE_SPLITS_KEY: "[]", "public_splits": json.dumps(["eval"])})
        return "publishable"
    except DataValidationError as e:
        return str(e)


def _unknown_countries(clean_dir, n):
    """Rows with an unknown native country: Adult's schema allows 1% of values outside the domain
    (min_domain_mass 0.99), so 2 of 200 pass and a third (the neighbour's one extra row) does not."""
    row = _first_line(clean_dir)
    return [_with(row, NATIVE_COUNTRY, "Atlantis") for _ in range(n)]


@pytest.mark.parametrize("neighbours", ["age_91", "third_unknown_category"])
def test_one_private_row_never_flips_the_validator(neighbours, clean, tmp_path):
    if neighbours == "age_91":   # the reference schema's age range is [17, 90]
        d, d_prime = [], [_with(_first_line(clean), AGE, "91")]
    else:
        d, d_prime = _unknown_countries(clean, 2), _unknown_countries(clean, 3)
    # the clean sample's first two train rows are replaced by d, the neighbour adds one more row
    base = _neighbour(clean, str(tmp_path / "d"), TRAIN, d)
    neighbour = _neighbour(clean, str(tmp_path / "d_prime"), TRAIN, d_prime)
    outcome = _validator_outcome(base, str(tmp_path / "work_d"))
    assert outcome == "publishable", outcome
    assert _validator_outcome(neighbour, str(tmp_path / "work_d_prime")) == outcome
    # the private split's anomaly is recorded, privately, beside the anomalies artifact
    path = os.path.join(str(tmp_path / "work_d_prime"), "anomalies", "private_checks.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        findings = json.load(f)["findings"]
    feature = "age" if neighbours == "age_91" else "native-country"
    assert any(f"[train] feature '{feature}'" in line for line in findings), findings


def test_an_anomaly_of_the_public_eval_split_still_stops_the_run(clean, tmp_path):
    data = _neighbour(clean, str(tmp_path / "d"), EVAL, [_with(_first_line(clean, EVAL), AGE, "91")])
    outcome = _validator_outcome(data, str(tmp_path / "work"))
    assert "[eval] feature 'age'" in outcome and "Nothing was trained or pushed" in outcome, outcome


# -- ingestion: a private split's column types are declared, never decided by one row ----------------------------
def _ingest(data_dir, split_pattern, out_dir):
    import glob

    import apache_beam as beam
    import tensorflow as tf
    from tfx.types import standard_component_specs

    from core.dataset import load_dataset
    from pipeline.ingest import _DelimitedToExample, spec_to_custom_config

    props = {standard_component_specs.CUSTOM_CONFIG_KEY: spec_to_custom_config(load_dataset(data_dir)),
             standard_component_specs.INPUT_BASE_KEY: data_dir}
    with beam.Pipeline() as p:
        _ = (p | _DelimitedToExample(props, split_pattern)
             | beam.Map(lambda e: e.SerializeToString())
             | beam.io.WriteToTFRecord(os.path.join(out_dir, "examples")))
    return [tf.train.Example.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(out_dir, "examples*"))))]


def test_one_private_row_never_changes_a_columns_type_at_ingestion(clean, tmp_path):
    row = _first_line(clean)
    neighbour = _neighbour(clean, str(tmp_path / "n"), TRAIN,
                           [ONE_ROW["age_not_a_number"](row), ONE_ROW["too_few_fields"](row)])
    examples = _ingest(neighbour, TRAIN, str(tmp_path / "out"))
    assert len(examples) == 201                      # the damaged line dropped, the text age kept as missing
    kinds = {e.features.feature["age"].WhichOneof("kind") for e in examples}
    assert kinds == {"int64_list", None}, kinds     # the reference schema's INT, never text
    assert sum(1 for e in examples if "age" not in e.features.feature
               or not e.features.feature["age"].int64_list.value) == 1


def test_under_replace_one_a_damaged_row_is_replaced_so_the_public_count_never_moves(clean, tmp_path):
    """Under replace_one the training row count is public (it sets the sampling rate): a damaged row becomes the
    public placeholder row instead of being dropped, so a neighbour that replaces a good row by a damaged one has
    the same count."""
    from core.dataset import load_dataset
    from pipeline.data_gate import check_raw_data, readable_rows

    good = _replace_one(_neighbour(clean, str(tmp_path / "good"), TRAIN, [(_first_line(clean) + "\n").encode()]))
    for damage in ("unknown_label", "too_few_fields", "nul_byte"):
        bad = _replace_one(_neighbour(clean, str(tmp_path / damage), TRAIN, [ONE_ROW[damage](_first_line(clean))]))
        assert readable_rows(load_dataset(bad), "train") == readable_rows(load_dataset(good), "train") == 201
        assert check_raw_data(load_dataset(bad))["train"]["rows"] == 201


# -- the readers outside the gate read by its rule: the content fingerprint, the planner's exact count and
# federated.simulate's loader (issue 17.2, review F1) ----------------------------------------------------------
def _replace_one(directory):
    path = os.path.join(directory, "dataset.json")
    with open(path) as f:
        desc = json.load(f)
    desc["privacy"]["relation"] = "replace_one"
    with open(path, "w") as f:
        json.dump(desc, f)
    return directory


@pytest.mark.parametrize("damage", sorted(ONE_ROW))
def test_one_private_row_never_stops_the_fingerprint_the_planners_count_or_the_federated_loader(
        damage, clean, tmp_path):
    from core.dataset import load_dataset, readable_rows
    from dp_training.fingerprint import content_digest
    from dp_training.planner import exact_rows
    from federated.data import load_tabular

    row = ONE_ROW[damage](_first_line(clean))
    neighbour = _neighbour(clean, str(tmp_path / "n"), TRAIN, [row])
    digest = content_digest(load_dataset(neighbour))            # the pre-flight's and the reservation's read
    assert isinstance(digest, bytes) and len(digest) == 32
    gate_rows = check_rows = readable_rows(load_dataset(neighbour), "train")
    loaded = load_tabular(neighbour)                             # federated.simulate's loader
    assert len(loaded.train_labels) == gate_rows
    from pipeline.data_gate import check_raw_data
    check_rows = check_raw_data(load_dataset(neighbour))["train"]["rows"]
    assert gate_rows == check_rows
    # under replace_one (the count is public) the Trainer's plan counts as the gate does: the damaged row is a
    # placeholder, so the neighbour that replaced a good row by a damaged one has the good one's count
    bad = _replace_one(_neighbour(clean, str(tmp_path / "bad"), TRAIN, [row]))
    good = _replace_one(_neighbour(clean, str(tmp_path / "good"), TRAIN, [(_first_line(clean) + "\n").encode()]))
    assert exact_rows(load_dataset(bad)) == exact_rows(load_dataset(good)) == 201
    assert len(load_tabular(bad).train_labels) == 201
    assert isinstance(content_digest(load_dataset(bad)), bytes)


def test_a_quoted_field_over_two_lines_is_counted_by_the_planner_as_by_the_gate(clean, tmp_path):
    from core.dataset import load_dataset
    from dp_training.planner import exact_rows
    from pipeline.data_gate import check_raw_data

    row = _first_line(clean).split(", ")
    row[1] = '"State\ngov"'
    bad = _replace_one(_neighbour(clean, str(tmp_path / "q"), TRAIN, [(", ".join(row) + "\n").encode()]))
    assert exact_rows(load_dataset(bad)) == check_raw_data(load_dataset(bad))["train"]["rows"] == 202


def test_the_public_eval_split_is_still_read_strictly_by_the_federated_loader(clean, tmp_path):
    from core.dataset import RowError
    from federated.data import load_tabular

    neighbour = _neighbour(clean, str(tmp_path / "n"), EVAL, [ONE_ROW["age_not_a_number"](_first_line(clean, EVAL))])
    with pytest.raises(RowError, match="adult.test line 101"):
        load_tabular(neighbour)
