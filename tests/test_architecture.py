"""The import layers (README 'Layout'), checked on the source by AST, and the command line's lazy imports.

Each package may import only the packages of lower layers (function-level imports included): a cycle between
packages, or a library layer reaching up into the pipeline or the command line, fails here."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lower number = lower layer. A package imports its own layer's package and lower layers only; packages that
# share a layer do not import each other.
LAYERS = {
    "core": -1,                # the shared core: data-set reader, public transform, process isolation
    "dp_training": 0,          # the privacy layer (and the DP-SGD kind, model builders)
    "federated": 1, "serving": 1, "encrypted_serving": 1,
    "pipeline": 2,             # TFX only
    "simulations": 3,          # studies and benchmarks
    "privtrain_cli": 4,        # the command line
}


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def _violations():
    found = []
    for package, layer in LAYERS.items():
        for root, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                for line, target in _imports(path):
                    if target in LAYERS and target != package and LAYERS[target] >= layer:
                        found.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target} "
                                     f"(layer {LAYERS[target]} >= {package}'s {layer})")
    return found


def test_packages_import_only_lower_layers():
    assert _violations() == []


def test_the_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    # The checker itself: a dp_training module importing the pipeline is reported.
    bad = tmp_path / "dp_training"
    bad.mkdir()
    (bad / "m.py").write_text("def f():\n    from pipeline import runner\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert any("imports pipeline" in v for v in _violations())


@pytest.mark.parametrize("argv", [["--help"], ["budget", "--help"], ["report", "--help"], ["budget"],
                                  ["privacy", "report", "--help"], ["predict", "--help"], ["run", "--help"]])
def test_light_commands_do_not_import_tensorflow(argv, tmp_path):
    code = ("import sys\nfrom privtrain_cli.main import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('tensorflow', 'tfx', 'tensorflow_federated', 'apache_beam') "
            "if m in sys.modules)\n"
            "print('HEAVY=' + ','.join(heavy))\n")
    env = dict(os.environ, PYTHONPATH=ROOT, PRIVTRAIN_LEDGER=str(tmp_path / "ledger.sqlite"))
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=120)
    assert "HEAVY=\n" in r.stdout, (r.stdout[-500:], r.stderr[-2000:])


def _replay(tmp_path, pushed_path, receipts=None):
    """Records a run of `privtrain run` in a fresh workdir (a real, empty ML Metadata store; ``receipts``: the
    lines of private/receipts.jsonl), then runs the same command through ``main()`` in a subprocess, which
    replays the record. Returns the finished process (stdout: RC=…, HEAVY=…, RECORDED when replayed)."""
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    from tests.conftest import make_adult_sample

    data = make_adult_sample(str(tmp_path / "data"), train_rows=50, eval_rows=20)
    workdir = tmp_path / "work"
    (workdir / "private").mkdir(parents=True)
    if pushed_path:
        (workdir / pushed_path).mkdir(parents=True)
    if receipts:
        (workdir / "private" / "receipts.jsonl").write_text("".join(line + "\n" for line in receipts))
    meta = workdir / "metadata.sqlite"
    config = metadata_store_pb2.ConnectionConfig()   # a real (empty) ML Metadata store: the replay reads its receipts
    config.sqlite.filename_uri = str(meta)
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    metadata_store.MetadataStore(config)
    pushed = str(workdir / pushed_path) if pushed_path else None
    argv = ["run", "--trainer", "standard", "--data", data, "--workdir", str(workdir), "--allow-non-private"]
    code = ("import sys\nfrom core.dataset import load_dataset\nfrom pipeline import run_memo\n"
            "from privtrain_cli.main import build_parser, main\n"
            "args = build_parser(sys.argv[1:]).parse_args(sys.argv[1:])\n"
            "digest = run_memo.fingerprint(vars(args), load_dataset(args.data))\n"
            f"run_memo.record({str(workdir)!r}, {str(meta)!r}, digest, {{'pushed_path': {pushed!r}}}, 'RECORDED')\n"
            "rc = main(sys.argv[1:])\n"
            "heavy = sorted(m for m in ('tensorflow', 'tfx', 'tensorflow_federated', 'apache_beam') "
            "if m in sys.modules)\n"
            "print('RC=%d HEAVY=%s' % (rc, ','.join(heavy)))\n")
    env = dict(os.environ, PYTHONPATH=ROOT, PRIVTRAIN_LEDGER=str(tmp_path / "ledger.sqlite"))
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=120)


def test_an_identical_rerun_imports_nothing_heavy(tmp_path):
    # `privtrain run` replaying the last run's record (pipeline/run_memo.py) parses its flags (every trainer
    # kind's) and answers without TensorFlow, TFF, TFX or Beam: the re-run costs the interpreter, not TF's import.
    r = _replay(tmp_path, os.path.join("serving", "adult", "1"))
    assert "identical to the run" in r.stderr, r.stderr[-2000:]
    assert "RECORDED" in r.stdout and "RC=0 HEAVY=\n" in r.stdout, (r.stdout[-500:], r.stderr[-2000:])


def test_an_identical_rerun_still_refuses_a_ledger_that_contradicts_the_workdirs_receipts(tmp_path):
    # Nothing is charged by a replay, but the ledger is checked against the workdir's receipts as on every run:
    # a receipt the ledger lacks (its entry deleted) is refused in one line and nothing is replayed.
    r = _replay(tmp_path, None, ['{"event": "finish", "seq": 3, "head_hash": "%s"}' % ("ab" * 32)])
    assert "RC=2" in r.stdout and "RECORDED" not in r.stdout, (r.stdout[-500:], r.stderr[-2000:])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("privtrain: ") and "entry 3" in lines[0], lines


def test_every_command_parses_its_own_flags():
    # The lazy table lists every command; each command module adds the parser of the name it is listed under.
    from privtrain_cli.main import COMMANDS, build_parser

    parser = build_parser([], full=True)
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([name, "--help"])
        assert e.value.code == 0
