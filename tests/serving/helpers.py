"""Helpers shared by the serving tests."""
from __future__ import annotations

import os
import shutil
import threading


def push_version(serving_dir, model_templates, name, version, template):
    """Copy a template into ``<serving_dir>/<name>/<version>`` the way a push would (temp + rename)."""
    model_dir = os.path.join(str(serving_dir), name)
    os.makedirs(model_dir, exist_ok=True)
    tmp = os.path.join(model_dir, f".tmp-{version}")
    shutil.copytree(model_templates[template], tmp)
    os.replace(tmp, os.path.join(model_dir, str(version)))


def privtrain_threads():
    return [t for t in threading.enumerate() if t.name.startswith("privtrain") and t.is_alive()]
