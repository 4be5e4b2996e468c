"""The encrypted environment's interpreter (TF-Encrypted 0.9.1 on TF 2.9.1), for starting party processes.

``encrypted_python()``: ``$PRIVTRAIN_ENCRYPTED_PYTHON`` if set, else the env ``scripts/setup_env.sh encrypted``
prints (building it on first use). Pure Python: imported by the platform side only to start subprocesses."""
from __future__ import annotations

import os
import subprocess
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENC_PY: Optional[str] = None


class EnvironmentSetupError(RuntimeError):
    """The encrypted environment could not be set up; the message has the setup script's last output."""


def encrypted_python() -> str:
    """Path of the encrypted env's python (creating the env on first use via scripts/setup_env.sh)."""
    global _ENC_PY
    if os.environ.get("PRIVTRAIN_ENCRYPTED_PYTHON"):
        return os.environ["PRIVTRAIN_ENCRYPTED_PYTHON"]
    if _ENC_PY is None:
        script = os.path.join(REPO, "scripts", "setup_env.sh")
        try:
            out = subprocess.run(["bash", script, "encrypted"], check=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, timeout=3600)
        except subprocess.CalledProcessError as e:
            raise EnvironmentSetupError("cannot set up the encrypted environment (%s encrypted):\n%s"
                                        % (script, e.stderr[-2000:])) from e
        _ENC_PY = os.path.join(out.stdout.strip().splitlines()[-1], "bin", "python")
    return _ENC_PY
