"""First use from the command line (issue 20): `privtrain serve` runs the server as `python -m
serving.server` does (TensorFlow's oneDNN allocator off); ports out of range, a missing or malformed
`predict --input`, and an unknown `budget --source` give one line and status 2, never a traceback or a
silent success; `./privtrain python` runs one's own script in the platform environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .helpers import push_version, stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    return env


def _cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "privtrain_cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=ROOT)


def _one_line(r, prefix):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def test_privtrain_serve_turns_onednn_off_like_the_module(tmp_path, model_templates):
    """The CLI imports TensorFlow while building its parser; `serve` now sets TF_ENABLE_ONEDNN_OPTS=0
    first, so the server does not report that large requests' memory stays in oneDNN's pool."""
    push_version(tmp_path / "serving", model_templates, "adult", 1, "a")
    proc = subprocess.Popen([sys.executable, "-m", "privtrain_cli", "serve", "--workdir", str(tmp_path),
                             "--rest-port", "0", "--grpc-port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY") or len(lines) > 200:
                break
        assert lines and lines[-1].startswith("READY"), lines
        out = "".join(lines)
        assert "oneDNN on" not in out, out
        with open(f"/proc/{proc.pid}/maps") as f:       # TensorFlow is loaded: the check is meaningful
            assert "tensorflow" in f.read()
    finally:
        stop_process(proc)


@pytest.mark.parametrize("flag,value", [("--rest-port", "70000"), ("--grpc-port", "-1"), ("--rest-port", "-8501")])
def test_ports_out_of_range_are_one_line(tmp_path, model_templates, flag, value):
    push_version(tmp_path / "serving", model_templates, "adult", 1, "a")
    other = "--grpc-port" if flag == "--rest-port" else "--rest-port"
    r = _cli("serve", "--workdir", str(tmp_path), other, "0", flag, value)
    line = _one_line(r, "privtrain serve: ")
    assert f"{flag} must be a port number from 0 to 65535" in line and value in line
    r = subprocess.run([sys.executable, "-m", "serving.server", "--serving-dir", str(tmp_path / "serving"),
                        other, "0", flag, value], capture_output=True, text=True, env=_env(), timeout=180)
    assert f"{flag} must be a port number" in _one_line(r, "privtrain serve: ")


@pytest.fixture
def predict_workdir(tmp_path):
    """A workdir whose pushed version has the dataset description that `predict` reads rows with
    (rows are read, and refused, before the model is loaded)."""
    extra = tmp_path / "work" / "serving" / "adult" / "1" / "assets.extra"
    extra.mkdir(parents=True)
    (extra / "dataset.json").write_text(json.dumps({
        "name": "adult", "format": "csv", "delimiter": ",", "missing_value": "?", "header": False,
        "splits": {"train": "adult.data", "eval": "adult.test"}, "label_feature": "income_over_50k",
        "columns": [{"name": "age", "type": "numeric"}, {"name": "workclass", "type": "categorical"},
                    {"name": "income", "type": "label", "positive": ">50K", "negative": "<=50K"}]}))
    (extra.parent / "saved_model.pb").write_bytes(b"")   # a complete version (core.pushed); never loaded here
    return tmp_path / "work"


@pytest.mark.parametrize("content,needle", [
    (None, "does not exist"),
    ("DIR", "is not a file"),
    ("39, Private, >50K\n40\n", ":2: 1 values, expected 3 (all columns) or 2 (features only)"),
    ("thirty, Private\n", "column 'age' is numeric, not 'thirty'"),
    ("", "holds no rows"),
])
def test_predict_input_problems_are_one_line(predict_workdir, tmp_path, content, needle):
    path = tmp_path / "rows.csv"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    r = _cli("predict", "--workdir", str(predict_workdir), "--input", str(path))
    assert needle in _one_line(r, "privtrain predict: ")


def test_budget_for_an_unknown_source_is_an_error(tmp_path):
    ledger = str(tmp_path / "ledger.sqlite")
    r = _cli("--ledger", ledger, "budget", "--source", "typo")
    line = _one_line(r, "privtrain budget: ")
    assert "no data source 'typo'" in line and "--data" in line
    # a source that exists is shown (status 0)
    r = _cli("--ledger", ledger, "budget", "--source", "real", "--set-epsilon", "2", "--delta", "1e-5",
             "--relation", "add_or_remove_one")
    assert r.returncode == 0, r.stderr
    r = _cli("--ledger", ledger, "budget", "--source", "real")
    assert r.returncode == 0 and "real" in r.stdout, r.stderr
    r = _cli("--ledger", ledger, "budget", "--source", "rael")
    assert "(its sources: real)" in _one_line(r, "privtrain budget: ")


def test_privtrain_python_runs_a_script_in_the_environment(tmp_path):
    script = tmp_path / "mine.py"
    script.write_text("import sys, serving, pipeline.predict\nprint(sys.executable)\nprint(sys.argv[1:])\n")
    r = subprocess.run([os.path.join(ROOT, "privtrain"), "python", str(script), "a", "--b"], capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    exe, argv = r.stdout.splitlines()[-2:]
    assert os.path.realpath(exe) == os.path.realpath(sys.executable)     # the platform environment's Python
    assert argv == "['a', '--b']"
