"""DP-SGD through the pipeline, end to end: one guarantee recorded the same way everywhere, the trust boundary
(exactly what leaves, and nothing that depends on the exact row count or the file's content), neighbouring data
sets giving identical public structure, and the shared, tamper-evident ledger refusing what it must."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sqlite3

import pytest

from core.pushed import PUBLISHED_FILES, PushedVersion
from pipeline.metadata import custom_properties, open_store
from tests.conftest import make_adult_sample, run_cli

BUDGET = 3.0  # the second run asks for 3 more: composed with the first, over budget
TRAIN_ROWS = 2987   # the sample's real size; its dataset.json declares the public planning figure 3000
SINGLETON_LINE = 305  # the sample's only row with native-country Laos
SOURCE = "adult-sample-private-runs"



@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_adult_sample(str(tmp_path_factory.mktemp("private_sample")), TRAIN_ROWS, 1200, source_id=SOURCE,
                             privacy={"public_row_estimate": 3000})


@pytest.fixture(scope="module")
def neighbour(tmp_path_factory, sample):
    """The same data source minus one row (the only Laos row): a neighbouring data set."""
    directory = str(tmp_path_factory.mktemp("private_neighbour"))
    for name in os.listdir(sample):
        shutil.copy(os.path.join(sample, name), directory)
    with open(os.path.join(sample, "adult.data")) as f:
        lines = f.readlines()
    assert ", Laos," in lines[SINGLETON_LINE - 1] and sum(", Laos," in line for line in lines) == 1
    with open(os.path.join(directory, "adult.data"), "w") as f:
        f.writelines(lines[:SINGLETON_LINE - 1] + lines[SINGLETON_LINE:])
    return directory


def _run(data, workdir, *extra, env=None):
    return run_cli("run", "--trainer", "dp_sgd", "--data", data, "--workdir", workdir, "--json",
                   "--epochs", "2", "--min-auc", "0.5", *extra, env=env)  # bookkeeping, not utility


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, sample):
    workdir = str(tmp_path_factory.mktemp("dp_run"))
    result = _run(sample, workdir, "--target-epsilon", "2", "--budget-epsilon", str(BUDGET))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return workdir, json.loads(result.stdout)


def _model_props(workdir):
    with open_store(os.path.join(workdir, "metadata.sqlite")) as store:
        return [custom_properties(m) for m in store.get_artifacts_by_type("Model")]


def test_one_guarantee_in_privacy_json_metadata_and_summary(dp_run):
    workdir, summary = dp_run
    privacy = PushedVersion(summary["pushed_path"]).privacy()
    (props,) = _model_props(workdir)
    assert json.loads(props["privacy_guarantee"]) == privacy        # the same object, serialised one way
    assert 1.9 < privacy["epsilon"] <= 2.0 and privacy["accountant"] == "pld"
    assert privacy["neighbouring_relation"] == "add_or_remove_one" and privacy["privacy_unit"] == "row"
    assert privacy["source_id"] == SOURCE and "add or remove one row" in privacy["statement"]
    covers = [m["covers"] for m in privacy["mechanisms"]]
    assert any("normalisation" in c for c in covers) and any("weights" in c for c in covers)
    # the composed event is what the ledger charged: recompute epsilon independently
    import dp_accounting
    from dp_training import events
    event = events.from_json(privacy["event"])
    acc = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(event)
    assert acc.get_epsilon(privacy["delta"]) == pytest.approx(privacy["epsilon"], rel=1e-6)
    assert privacy["parameters"]["planning_rows"] == 3000
    assert props["privacy_epsilon"] == pytest.approx(privacy["epsilon"]) and props["private"] == 1
    # the ledger entry is anchored: `budget verify` checks the recorded hash
    anchor = f"{privacy['ledger']['seq']}:{privacy['ledger']['head_hash']}"
    check = run_cli("budget", "verify", "--anchor", anchor)
    assert check.returncode == 0 and "ledger OK" in check.stdout, check.stderr


def test_only_declared_files_and_properties_leave_and_none_depends_on_the_exact_rows(dp_run, sample, tmp_path):
    workdir, summary = dp_run
    pushed = summary["pushed_path"]
    version = PushedVersion(pushed)
    # what may leave with a pushed model is core.pushed's declared list (docs/privacy_model.md): nothing else
    # is present, every file it requires is, and each present file is one declared entry's
    files = version.files()
    assert version.undeclared() == [] and version.missing() == [], (version.undeclared(), version.missing())
    declared = {d.pattern: [f for f in files if version.declaration(f) is d] for d in PUBLISHED_FILES}
    assert all(len(matches) == 1 for matches in declared.values()), declared   # a Keras model: every entry
    # the published data-set description is what the user wrote: core.dataset's loader reads it
    published = version.dataset_spec()
    assert published.privacy.source_id == SOURCE and "directory" not in json.dumps(version.dataset_description())
    copy = str(tmp_path / "published_dataset")
    os.makedirs(copy)
    for name in os.listdir(sample):
        if name != "dataset.json":
            os.symlink(os.path.join(sample, name), os.path.join(copy, name))
    shutil.copy(version.dataset_path, os.path.join(copy, "dataset.json"))
    from core.dataset import load_dataset
    assert load_dataset(copy).to_json_dict() == {**load_dataset(sample).to_json_dict(), "directory": copy}
    from pipeline.trainer_executor import PUBLIC_PROPERTIES
    (props,) = _model_props(workdir)
    assert set(props) <= set(PUBLIC_PROPERTIES), set(props) - set(PUBLIC_PROPERTIES)
    with open(os.path.join(sample, "adult.data"), "rb") as f:
        content_hash = hashlib.sha256(f.read()).hexdigest()
    published = [open(os.path.join(pushed, name), "rb").read() for name in files]
    published.append(json.dumps(props).encode())
    published.append(json.dumps(summary).encode())
    import re
    import struct
    binary_n = [struct.pack("<q", TRAIN_ROWS), struct.pack("<d", float(TRAIN_ROWS))]
    for blob in published:
        # embedded images are base64 noise where any 4 digits occur by chance: their pixels are not searched
        text = re.sub(rb"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", b"", blob)
        # no exact n, as a number in text (not as digits inside another number: the noisy means' decimals may
        # contain any 4 digits by chance) ...
        assert not re.search(rb"(?<![0-9.eE+-])%d(?![0-9])" % TRAIN_ROWS, text), str(TRAIN_ROWS)
        assert not any(b in blob for b in binary_n)             # ... or as a 64-bit number
        assert content_hash.encode() not in text and content_hash[:16].encode() not in text
        for private_fact in (b"mia_auc", b"epoch_seconds", b"empty_batches", b"train_rows", b"fingerprint\""):
            assert private_fact not in text
    # the private details stay in the workdir
    details = glob.glob(os.path.join(workdir, "pipeline_root", "**", "private_details.json"), recursive=True)
    assert details and json.load(open(details[0]))["train_rows"] == TRAIN_ROWS


def test_neighbouring_data_sets_publish_the_same_vocabularies_and_shapes(dp_run, neighbour, tmp_path):
    import tensorflow as tf

    _, summary = dp_run
    result = _run(neighbour, str(tmp_path / "w"), "--target-epsilon", "0.5", "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    other = json.loads(result.stdout)["pushed_path"]

    def vocabularies(pushed):
        return {e["name"]: e.get("vocabulary") for e in PushedVersion(pushed).preprocessing()}

    assert vocabularies(summary["pushed_path"]) == vocabularies(other)
    assert "Laos" in vocabularies(other)["native-country"]  # from the public domain, not the rows
    shapes = [sorted(tf.train.list_variables(os.path.join(p, "variables", "variables"))) for p in
              (summary["pushed_path"], other)]
    assert shapes[0] == shapes[1]
    assert not [f for f in glob.glob(os.path.join(summary["pushed_path"], "assets", "*"))]  # no data-derived assets


def test_a_second_workdir_and_a_neighbouring_file_share_the_sources_budget(dp_run, neighbour, tmp_path):
    workdir, summary = dp_run
    spent = summary["model_properties"]["privacy_epsilon"]
    # another workdir, and a neighbouring file (one row less) of the same source: one budget
    for data, wd in ((neighbour, str(tmp_path / "other")), (neighbour, workdir)):
        result = _run(data, wd, "--target-epsilon", "3")
        assert result.returncode == 2, result.stderr[-2000:]
        assert "budget" in result.stderr and "Nothing was trained" in result.stderr
        assert "Traceback" not in result.stderr
    assert len(_model_props(workdir)) == 1
    assert not os.path.exists(os.path.join(tmp_path, "other", "metadata.sqlite"))  # refused before the pipeline
    budget = json.loads(run_cli("budget", "--source", SOURCE, "--json").stdout)
    text = json.dumps(budget)
    assert str(BUDGET) in text
    result = run_cli("budget", "--source", SOURCE, "--set-epsilon", "30", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "30" in result.stdout


def test_non_private_training_on_a_budgeted_source_is_refused_unless_allowed(dp_run, sample):
    workdir, _ = dp_run
    result = run_cli("run", "--trainer", "standard", "--data", sample, "--workdir", workdir)
    assert result.returncode == 2
    assert "--allow-non-private" in result.stderr and "Traceback" not in result.stderr


def test_an_edited_ledger_fails_verify_and_the_next_run(tmp_path, sample):
    import dp_accounting
    from dp_training.ledger import Ledger

    path = str(tmp_path / "ledger.sqlite")
    ledger = Ledger(path)
    res = ledger.reserve(SOURCE, dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 1000),
                         trainer="dp_sgd", private=True, accountant="pld", relation="add_or_remove_one", delta=1e-5)
    ledger.finish(res, dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 1000), "completed")
    env = {"PRIVTRAIN_LEDGER": path}
    assert run_cli("budget", "verify", env=env).returncode == 0
    con = sqlite3.connect(path)
    con.execute("DROP TRIGGER entries_no_update")
    con.execute("UPDATE entries SET payload = replace(payload, '\"count\":1000', '\"count\":1')")
    con.commit()
    con.close()
    check = run_cli("budget", "verify", env=env)
    assert check.returncode == 1 and "edited" in (check.stdout + check.stderr)
    result = _run(sample, str(tmp_path / "w"), env=env)
    assert result.returncode == 2 and "edited" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(str(tmp_path / "w" / "metadata.sqlite"))


@pytest.mark.parametrize("case", ["unit", "accountant", "not_a_ledger"])
def test_bad_privacy_input_is_one_clear_line_and_nothing_is_trained(case, tmp_path, sample):
    data = str(tmp_path / "data")
    shutil.copytree(sample, data)
    env, extra = None, []
    desc_path = os.path.join(data, "dataset.json")
    desc = json.load(open(desc_path))
    if case == "unit":
        desc["privacy"]["unit"] = "household"
        expect = "unknown privacy unit"
    elif case == "accountant":
        desc["privacy"].update(relation="replace_one", source_id=SOURCE + "-replace")
        extra = ["--accountant", "rdp"]
        expect = "cannot account"
    else:
        bogus = tmp_path / "ledger.sqlite"
        bogus.write_bytes(b"these are my notes, not a ledger\n")
        env = {"PRIVTRAIN_LEDGER": str(bogus)}
        expect = "not a privtrain ledger"
    json.dump(desc, open(desc_path, "w"))
    result = _run(data, str(tmp_path / "w"), *extra, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("privtrain")]
    assert len(lines) == 1 and expect in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not glob.glob(str(tmp_path / "w" / "serving" / "**" / "saved_model.pb"), recursive=True)
    if case == "not_a_ledger":
        assert (tmp_path / "ledger.sqlite").read_bytes() == b"these are my notes, not a ledger\n"
