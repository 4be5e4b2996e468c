"""Workdirs, serving directories and private files are readable by their owner only (0700 / 0600).

A workdir holds private rows (ExampleGen's tf.Examples, Transform outputs, the ScatterNet cache), statistics,
anomalies, checkpoints and the pushed model's plaintext weights. Every privtrain process that writes sets the
umask to 077 at its start (:func:`private_umask`: ``privtrain_cli.main.main`` and ``pipeline.runner.run_pipeline``;
Beam's DirectRunner, TFX executors and subprocesses inherit it), so every file it creates is 0600 and every
directory 0700. The workdir itself is created 0700 (:func:`private_dir`); an existing one that other users can
read or enter is refused with one line naming the ``chmod 700`` fix (:class:`OpenDirectoryError`).

``federated.simulate`` and ``dp_training.protocol.run_private_training`` (the pipeline-free runs) create their
output/scratch directory with :func:`private_dir` and write under an owner-only umask (:func:`owner_only`),
restoring the caller's umask after.

No TensorFlow import: the CLI refuses an open workdir in a second.
"""
from __future__ import annotations

import os
import stat

PRIVATE_UMASK = 0o077


class OpenDirectoryError(ValueError):
    """A directory that holds private files is readable or enterable by other users (one line with the fix)."""


def private_umask() -> int:
    """Sets the process umask to 077 (files 0600, directories 0700 from now on, in this process and its
    children); returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


def open_bits(path: str) -> int:
    """The group/other permission bits of ``path`` (0 when only the owner can use it)."""
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077


def check_private_dir(path: str, what: str = "workdir") -> None:
    """Raises :class:`OpenDirectoryError` when the existing directory ``path`` is open to other users."""
    if os.path.isdir(path) and open_bits(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        raise OpenDirectoryError(
            f"the {what} {path} is open to other users (mode {mode:04o}) and holds private rows, statistics and "
            f"model weights; run `chmod 700 {path}` (or choose another --workdir) and try again")


def private_dir(path: str, what: str = "workdir") -> str:
    """Creates ``path`` (and missing parents) mode 0700, or checks an existing one (see
    :func:`check_private_dir`). Returns ``path``."""
    if os.path.isdir(path):
        check_private_dir(path, what)
        return path
    old = private_umask()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    finally:
        os.umask(old)
    os.chmod(path, 0o700)
    return path


class owner_only:
    """A context: the umask is 077 inside (files 0600, directories 0700), the previous one restored after."""

    def __enter__(self):
        self._old = private_umask()
        return self

    def __exit__(self, *exc):
        os.umask(self._old)
        return False


def write_private_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` mode 0600 (replaced atomically)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
