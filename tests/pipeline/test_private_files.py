"""Workdirs are private to their owner (issue 17.8): another local user cannot read the private rows, statistics
or model files a run writes. The attack runs ``cat`` as the unprivileged user nobody (uid 65534) through
``setpriv``; the test first proves the attack reads a file left with the old modes (0644 in a 0755 directory),
so a failure to read the workdir's files is the modes' doing, not the test's."""
from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from tests.conftest import make_adult_sample, run_cli

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="the attack needs root (to become nobody) and util-linux's setpriv")


def _read_as_nobody(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", path],
                          capture_output=True, timeout=60)


@pytest.fixture
def open_parent():
    """A directory every user can enter (0755 under /tmp, not pytest's 0700 tmp_path), removed afterwards."""
    path = tempfile.mkdtemp(prefix="privtrain-open-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_another_user_cannot_read_a_runs_private_rows(open_parent, tmp_path):
    # the attack is real: a file with the old modes (umask 022) is read by nobody
    witness_dir = os.path.join(open_parent, "old-modes")
    os.mkdir(witness_dir, 0o755)
    os.chmod(witness_dir, 0o755)
    witness = os.path.join(witness_dir, "rows.txt")
    with open(witness, "w") as f:
        f.write("39, State-gov\n")
    os.chmod(witness, 0o644)
    assert _read_as_nobody(witness).stdout == b"39, State-gov\n"

    data = make_adult_sample(str(tmp_path / "data"), train_rows=200, eval_rows=100)
    workdir = os.path.join(open_parent, "work")
    result = run_cli("run", "--validate-only", "--trainer", "standard", "--data", data, "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    examples = glob.glob(os.path.join(workdir, "pipeline_root", "ExampleGen", "examples", "*", "Split-train", "*"))
    private = examples + [os.path.join(workdir, "metadata.sqlite")]
    assert examples and all(os.path.isfile(p) for p in private), private
    for path in private + glob.glob(os.path.join(workdir, "private", "*")):
        attempt = _read_as_nobody(path)
        assert attempt.returncode != 0 and attempt.stdout == b"", f"user nobody read {path}"
        assert b"Permission denied" in attempt.stderr
    # every directory is 0700 and every file 0600 (or tighter): nothing is open to group or others
    for root, dirs, files in os.walk(workdir):
        for name in [root] + [os.path.join(root, f) for f in files]:
            assert stat.S_IMODE(os.lstat(name).st_mode) & 0o077 == 0, (name, oct(os.lstat(name).st_mode))


def test_an_existing_workdir_open_to_others_is_refused_with_the_fix(tmp_path):
    data = make_adult_sample(str(tmp_path / "data"), train_rows=50, eval_rows=20)
    workdir = str(tmp_path / "open")
    os.mkdir(workdir)
    os.chmod(workdir, 0o755)
    result = run_cli("run", "--validate-only", "--trainer", "standard", "--data", data, "--workdir", workdir)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert f"chmod 700 {workdir}" in lines[0] and "mode 0755" in lines[0]
    assert os.listdir(workdir) == []                 # nothing written into it
    served = run_cli("serve", "--workdir", workdir, timeout=120)
    assert served.returncode == 2 and f"chmod 700 {workdir}" in served.stderr


def test_private_dir_creates_owner_only_directories_and_files(tmp_path):
    from core.private_files import OpenDirectoryError, private_dir, write_private_text

    old = os.umask(0o022)
    try:
        path = private_dir(str(tmp_path / "a" / "b"))
        write_private_text(os.path.join(path, "x.json"), "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(path, "x.json")).st_mode) == 0o600
    os.chmod(path, 0o750)
    with pytest.raises(OpenDirectoryError, match="chmod 700"):
        private_dir(path)
