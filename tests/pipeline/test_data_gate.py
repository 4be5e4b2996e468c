"""The data gate against a corpus of damaged and harmless variants of a small Adult sample (200/100 rows).

Damaged: each stops the run with exit code 2 or 1 and one clear line naming the file and line (or the feature,
split and statistic), no Python or Beam traceback, nothing trained or pushed. Structural damage is refused by
the gate's first half before TFX starts (seconds); range and drift violations by TFDV at ExampleValidator, so
those runs stop after validation. Row-level damage stops a run only on the PUBLIC eval split: on the private
train split it is handled row by row (tests/pipeline/test_row_local_gate.py), except a train split with no
readable row at all (``empty_train``, ``semicolons``).
Harmless: each passes the gate (``run --validate-only``: ingestion, statistics, validation) and ingests
exactly the clean sample's rows; one variant combining all four also runs to a pushed model.
"""
from __future__ import annotations

import codecs
import glob
import json
import os

import pytest

from core.pushed import PushedVersion
from tests.conftest import make_adult_sample, run_cli

TRAIN, EVAL = "adult.data", "adult.test"
HEADER = ("age, workclass, fnlwgt, education, education-num, marital-status, occupation, relationship, race, "
          "sex, capital-gain, capital-loss, hours-per-week, native-country, income")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_adult_sample(str(tmp_path_factory.mktemp("gate_clean")), train_rows=200, eval_rows=100)


def _variant(clean_dir, tmp_path, name, change, description=None):
    """A copy of the clean sample with its own source id; ``change(split_file, bytes) -> bytes``."""
    directory = str(tmp_path / name)
    os.makedirs(directory)
    for f in os.listdir(clean_dir):
        with open(os.path.join(clean_dir, f), "rb") as src:
            data = src.read()
        if f in (TRAIN, EVAL):
            data = change(f, data)
        elif f == "dataset.json":
            desc = json.loads(data)
            desc["privacy"]["source_id"] = f"gate-{name}"
            if description:
                description(desc)
            data = json.dumps(desc, indent=1).encode()
        with open(os.path.join(directory, f), "wb") as dst:
            dst.write(data)
    return directory


def _lines(data: bytes):
    return data.decode().splitlines(keepends=True)


def _edit_line(target, index, fn):
    def change(f, data):
        if f != target:
            return data
        lines = _lines(data)
        lines[index] = fn(lines[index])
        return "".join(lines).encode()
    return change


def _set_field(line, field, value):
    cells = line.rstrip("\n").split(", ")
    cells[field] = value
    return ", ".join(cells) + "\n"


def _every_row(target, fn):
    def change(f, data):
        return "".join(fn(i, line) for i, line in enumerate(_lines(data))).encode() if f == target else data
    return change


def _no_push(workdir):
    return not glob.glob(os.path.join(workdir, "serving", "**", "saved_model.pb"), recursive=True)


# name -> (change, dataset.json edit, words the one line must hold, where the run stops: "gate" | "validation")
DAMAGED = {
    "empty_train": (lambda f, d: b"" if f == TRAIN else d, None, ["adult.data", "train split has no data rows"],
                    "gate"),
    "blank_eval": (lambda f, d: b"\n\n  \n" if f == EVAL else d, None, ["adult.test", "eval split has no data rows"],
                   "gate"),
    "header_first_line": (lambda f, d: (HEADER + "\n").encode() + d if f == EVAL else d, None,
                          ["adult.test line 1", "header line"], "gate"),
    "header_inside": (_edit_line(EVAL, 49, lambda line: HEADER + "\n" + line), None,
                      ["adult.test line 50", "header line"], "gate"),
    "unknown_label": (_edit_line(EVAL, 9, lambda line: _set_field(line, 14, "maybe")), None,
                      ["adult.test line 10", "label column 'income'", "'maybe'"], "gate"),
    "missing_label": (_edit_line(EVAL, 19, lambda line: _set_field(line, 14, "?")), None,
                      ["adult.test line 20", "label column 'income'"], "gate"),
    "too_few_fields": (_edit_line(EVAL, 99, lambda line: ", ".join(line.split(", ")[:13]) + "\n"), None,
                       ["adult.test line 100", "expected 15 fields", "found 13"], "gate"),
    "too_many_fields": (_edit_line(EVAL, 4, lambda line: line.rstrip("\n") + ", extra\n"), None,
                        ["adult.test line 5", "expected 15 fields", "found 16"], "gate"),
    "semicolons": (_every_row(TRAIN, lambda i, line: line.replace(", ", ";")), None,
                   ["adult.data line 1", "train split has no data rows", "expected 15 fields", "found 1"],
                   "gate"),
    "truncated_file": (lambda f, d: d[: d.rindex(b",", 0, len(d) - 40)] if f == EVAL else d, None,
                       ["adult.test line 100", "expected 15 fields"], "gate"),
    "latin1_bytes": (lambda f, d: d.replace(b"United-States", "Österreich".encode("latin-1"), 1) if f == EVAL
                     else d, None, ["adult.test line 1", "not UTF-8"], "gate"),
    "utf16_file": (lambda f, d: d.decode().encode("utf-16") if f == EVAL else d, None,
                   ["adult.test line 1", "NUL byte"], "gate"),
    "bad_drift_config": (lambda f, d: d, lambda desc: desc.update(validation={"drift": {"sex": {"l2": 0.1}}}),
                         ["dataset.json", "unknown statistic 'l2'", "infinity_norm"], "gate"),
    "age_out_of_range": (_every_row(EVAL, lambda i, line: _set_field(line, 0, "150") if i % 7 == 0 else line),
                         None, ["[eval] feature 'age'", "range"], "validation"),
    # drift compares eval with train: it can stop a run only when both are public (a public benchmark)
    "eval_drift_public_benchmark": (
        _every_row(EVAL, lambda i, line: _set_field(line, 9, "Female")),
        lambda desc: (desc.update(validation={"drift": {"sex": {"infinity_norm": 0.1}}}),
                      desc["privacy"].update(public_benchmark=True)),
        ["[eval vs train] feature 'sex'", "drift (infinity_norm)", "above the threshold 0.1"], "validation"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_a_damaged_variant_stops_with_one_clear_line_and_nothing_is_pushed(name, clean, tmp_path):
    change, description, words, stops_at = DAMAGED[name]
    data = _variant(clean, tmp_path, name, change, description)
    workdir = str(tmp_path / "work")
    result = run_cli("run", "--trainer", "standard", "--allow-non-private", "--epochs", "1", "--data", data,
                     "--workdir", workdir)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert _no_push(workdir)
    if stops_at == "gate":
        assert result.returncode == 2, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("privtrain: "), result.stderr[-3000:]
        assert all(w in lines[0] for w in words), lines[0]
        assert not os.path.exists(os.path.join(workdir, "metadata.sqlite"))  # refused before the pipeline
    else:
        assert result.returncode == 1, result.stderr[-3000:]
        message = result.stderr[result.stderr.index("DataValidationError"):]
        assert all(w in message for w in words), message
        assert "Nothing was trained or pushed" in message
        assert "Trainer" not in result.stdout and "Transform " not in result.stdout


def _crlf(f, d):
    return d.replace(b"\n", b"\r\n")


def _trailing_blank_lines(f, d):
    return d + b"\n\n   \n\n"


def _bom(f, d):
    return codecs.BOM_UTF8 + d


def _extra_spaces(f, d):
    return b"\n".join(b"  " + line.replace(b", ", b" ,   ") + b"   " if line else line for line in d.split(b"\n"))


HARMLESS = {"crlf": _crlf, "trailing_blank_lines": _trailing_blank_lines, "utf8_bom": _bom,
            "extra_spaces": _extra_spaces}


def _ingested(workdir):
    """{split: (number of examples, {feature: type})} from the run's statistics."""
    import tensorflow_data_validation as tfdv

    out = {}
    for path in glob.glob(os.path.join(workdir, "pipeline_root", "StatisticsGen", "statistics", "*", "Split-*",
                                       "FeatureStats.pb")):
        stats = tfdv.load_stats_binary(path).datasets[0]
        split = os.path.basename(os.path.dirname(path))[len("Split-"):]
        out[split] = (stats.num_examples, {f.path.step[0]: f.type for f in stats.features})
    return out


@pytest.fixture(scope="module")
def clean_ingested(clean, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gate_clean_work"))
    result = run_cli("run", "--validate-only", "--trainer", "standard", "--data", clean, "--workdir", workdir,
                     "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return _ingested(workdir)


@pytest.mark.slow  # the default suite checks all variants at once (below), with the same ingestion check
@pytest.mark.parametrize("name", sorted(HARMLESS))
def test_a_harmless_variant_passes_the_gate_and_ingests_the_clean_rows(name, clean, clean_ingested, tmp_path):
    data = _variant(clean, tmp_path, name, HARMLESS[name])
    workdir = str(tmp_path / "work")
    result = run_cli("run", "--validate-only", "--trainer", "standard", "--data", data, "--workdir", workdir,
                     "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    states = {c["component"]: c["state"] for c in summary["components"]}
    assert states.get("StrictExampleValidator") == "COMPLETE" and "Trainer" not in states
    assert _ingested(workdir) == clean_ingested  # same counts, same types (a BOM would make 'age' text)
    assert clean_ingested["train"][0] == 200 and clean_ingested["eval"][0] == 100


def _private_row_damage(f, d):
    """Row-level damage on the PRIVATE train split (issue 17.2): values out of the public range, an unknown
    category and a non-numeric age in three rows, three damaged lines added. None may stop the run; the rows are
    handled one by one (clipped, out-of-vocabulary, missing; the damaged lines dropped)."""
    if f != TRAIN:
        return d
    lines = _lines(d)
    lines[2] = _set_field(lines[2], 0, "91")
    lines[4] = _set_field(lines[4], 13, "Atlantis")
    lines[6] = _set_field(lines[6], 0, "thirty-nine")
    lines[10:10] = [HEADER + "\n", _set_field(lines[1], 14, "maybe"), ", ".join(lines[3].split(", ")[:13]) + "\n"]
    return "".join(lines).encode()


def test_all_harmless_variants_and_private_row_damage_at_once_run_to_a_pushed_model(clean, clean_ingested,
                                                                                      tmp_path):
    def everything(f, d):
        return _bom(f, _crlf(f, _trailing_blank_lines(f, _extra_spaces(f, _private_row_damage(f, d)))))

    data = _variant(clean, tmp_path, "all_harmless", everything)
    workdir = str(tmp_path / "work")
    result = run_cli("run", "--trainer", "standard", "--allow-non-private", "--epochs", "1", "--min-auc", "0.5",
                     "--data", data, "--workdir", workdir, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["blessed"] is True and summary["pushed_path"], summary
    assert "blessed" in summary["blessing_reason"] and "0.5" in summary["blessing_reason"]
    assert _ingested(workdir) == clean_ingested  # same counts, same types (a BOM would make 'age' text)
    assert clean_ingested["train"][0] == 200 and clean_ingested["eval"][0] == 100
    # the private rows' handling is counted in private files only; the report publishes the public gate only
    with open(os.path.join(workdir, "private", "data_checks.json")) as f:
        structural = json.load(f)["structural"]["train"]
    assert sum(structural["dropped"].values()) == 3 and structural["unparsed_numeric_cells"] == {"age": 1}
    findings = glob.glob(os.path.join(workdir, "pipeline_root", "StrictExampleValidator", "anomalies", "*",
                                      "private_checks.json"))
    assert findings and "[train] feature 'age'" in open(findings[0]).read()
    validation = PushedVersion(summary["pushed_path"]).report()["lineage"]["validation"]
    assert validation["result"] == "passed (public splits: eval)", validation
    # issue 17.8: the whole workdir, pushed model included, is the owner's only (dirs 0700, files 0600)
    opened = [path for root, _, files in os.walk(workdir) for path in [root] + [os.path.join(root, f) for f in files]
              if os.lstat(path).st_mode & 0o077]
    assert not opened, opened[:5]
