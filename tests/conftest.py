"""Shared fixtures: small samples of the Adult data set and one pipeline run reused by several tests."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import zlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADULT_DIR = os.path.join(PROJECT_ROOT, "data", "adult")


@pytest.fixture(scope="session", autouse=True)
def _private_ledger(tmp_path_factory):
    """Every test session gets its own budget ledger: no test ever reads or charges the user's real one.
    (Tests that need a ledger of their own set PRIVTRAIN_LEDGER again with monkeypatch.)"""
    path = str(tmp_path_factory.mktemp("privtrain_ledger") / "ledger.sqlite")
    old = os.environ.get("PRIVTRAIN_LEDGER")
    os.environ["PRIVTRAIN_LEDGER"] = path
    yield path
    if old is None:
        os.environ.pop("PRIVTRAIN_LEDGER", None)
    else:
        os.environ["PRIVTRAIN_LEDGER"] = old


def make_adult_sample(directory: str, train_rows: int, eval_rows: int, mutate=None, source_id=None,
                      privacy=None) -> str:
    """Copies Adult's description and reference schema plus the first rows of each split.

    The copy declares its own data source (``source_id``, default: one per directory, so that budgets of
    different tests never mix in the session's ledger) with ``train_rows`` as its public planning size;
    ``privacy`` overrides keys of the privacy section.
    ``mutate(split, fields) -> fields`` may rewrite every parsed row (to corrupt the data)."""
    os.makedirs(directory, exist_ok=True)
    for name in ("schema.pbtxt", "README.md"):
        shutil.copy(os.path.join(ADULT_DIR, name), directory)
    with open(os.path.join(ADULT_DIR, "dataset.json")) as f:
        description = json.load(f)
    source = source_id or f"adult-sample-{os.path.basename(directory)}"
    description["privacy"].update({"source_id": source, "public_row_estimate": int(train_rows), **(privacy or {})})
    with open(os.path.join(directory, "dataset.json"), "w") as f:
        json.dump(description, f, indent=1)
    # A sample under its default per-directory source id starts at an offset of its own: the ledger refuses the
    # same training content under two source ids (docs/ledger.md, "Copies under a new source id"), and these
    # samples are meant as different sources. (The tests that name a source id use sizes of their own.)
    skip = 0 if source_id else zlib.crc32(source.encode("utf-8")) % 1000
    for split, filename, rows in (("train", "adult.data", train_rows), ("eval", "adult.test", eval_rows)):
        with open(os.path.join(ADULT_DIR, filename)) as src, open(os.path.join(directory, filename), "w") as dst:
            lines = itertools.islice(src, skip if split == "train" else 0, None)
            for i, line in enumerate(lines):
                if i >= rows:
                    break
                if mutate is not None:
                    line = ", ".join(mutate(split, i, line.rstrip("\n").split(", "))) + "\n"
                dst.write(line)
    return directory


def run_cli(*args, timeout=1200, env=None):
    """Runs ``python -m privtrain_cli ARGS`` in the platform environment (this interpreter)."""
    full_env = dict(os.environ, PYTHONPATH=PROJECT_ROOT, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run([sys.executable, "-m", "privtrain_cli", *args], cwd=PROJECT_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def adult_sample(tmp_path_factory):
    return make_adult_sample(str(tmp_path_factory.mktemp("adult_sample")), train_rows=3000, eval_rows=1500)


@pytest.fixture(scope="session")
def standard_run(tmp_path_factory, adult_sample):
    """One full pipeline run with the standard trainer on the Adult sample: (workdir, summary dict, result)."""
    workdir = str(tmp_path_factory.mktemp("standard_run"))
    result = run_cli("run", "--trainer", "standard", "--data", adult_sample, "--workdir", workdir, "--json",
                     "--allow-non-private")
    assert result.returncode == 0, f"pipeline failed:\n{result.stdout}\n{result.stderr[-5000:]}"
    return workdir, json.loads(result.stdout), result
