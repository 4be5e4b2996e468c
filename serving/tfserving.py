"""A ``models.config`` for the real ``tensorflow_model_server`` over a serving directory.

privtrain does not start that binary itself (it listens on all interfaces without auth; see
``serving.server.TFSERVING_REFUSED``); this module prints the config for operators who run it behind
their own TLS-terminating, authenticating proxy."""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from .repository import discover_models, read_labels_file

def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def models_config_text(serving_dir: str, max_versions: Optional[int] = 2,
                       model_names: Optional[List[str]] = None) -> str:
    """A ``ModelServerConfig`` text proto for every model under ``serving_dir``.

    Labels come from each model's ``labels.json`` only (TF Serving rejects labels that point at
    versions it has not loaded, so the stable/canary convention is left to the built-in server).
    """
    serving_dir = os.path.abspath(serving_dir)
    lines = ["model_config_list {"]
    for name, versions in sorted(discover_models(serving_dir).items()):
        if model_names and name not in model_names:
            continue
        base = os.path.join(serving_dir, name)
        lines += ["  config {", f"    name: {_q(name)}", f"    base_path: {_q(base)}",
                  '    model_platform: "tensorflow"']
        labels = read_labels_file(base) or {}
        if labels:
            # Keep labelled versions loaded as well as the newest ones.
            newest = sorted(versions, reverse=True)[: max_versions or len(versions)]
            keep = sorted(set(newest) | {v for v in labels.values() if v in versions})
            lines.append("    model_version_policy { specific { "
                         + " ".join(f"versions: {v}" for v in keep) + " } }")
        elif max_versions:
            lines.append(f"    model_version_policy {{ latest {{ num_versions: {max_versions} }} }}")
        else:
            lines.append("    model_version_policy { all {} }")
        for k, v in sorted(labels.items()):
            if v in versions:
                lines.append(f"    version_labels {{ key: {_q(k)} value: {v} }}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m serving.tfserving",
                                description="Print a models.config for tensorflow_model_server over a serving "
                                            "directory (for running it yourself behind a TLS/auth proxy).")
    p.add_argument("--serving-dir", required=True)
    p.add_argument("--max-versions", type=int, default=2, help="0 keeps all versions")
    a = p.parse_args(argv)
    sys.stdout.write(models_config_text(a.serving_dir, a.max_versions or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
