"""Running the real ``tensorflow_model_server`` when it is on PATH: its ``models.config`` and process."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
from typing import Dict, List, Optional

from .repository import discover_models, read_labels_file

BINARY = "tensorflow_model_server"


def find_binary() -> Optional[str]:
    return shutil.which(BINARY)


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


def write_atomic(path: str, text: str) -> bool:
    """Write if changed; returns whether the file changed."""
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except OSError:
        pass
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


class TFServingProcess:
    """``tensorflow_model_server`` on a generated ``models.config`` that is kept in sync with the
    serving directory (new models / labels) by a small thread; TF Serving itself polls the config
    file and the version directories."""

    def __init__(self, binary: str, serving_dir: str, config_dir: str, rest_port: int, grpc_port: int,
                 poll_interval_s: float = 1.0, max_versions: Optional[int] = 2,
                 model_names: Optional[List[str]] = None, extra_args: Optional[List[str]] = None,
                 batching: bool = False):
        self.binary, self.serving_dir, self.config_dir = binary, serving_dir, config_dir
        self.rest_port, self.grpc_port = rest_port, grpc_port
        self.poll_interval_s = max(1.0, float(poll_interval_s or 1.0))
        self.max_versions, self.model_names = max_versions, model_names
        self.extra_args = list(extra_args or [])
        self.batching = batching
        self.config_path = os.path.join(config_dir, "models.config")
        self.proc: Optional[subprocess.Popen] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def command(self) -> List[str]:
        cmd = [self.binary, f"--port={self.grpc_port}", f"--rest_api_port={self.rest_port}",
               f"--model_config_file={self.config_path}",
               f"--model_config_file_poll_wait_seconds={int(self.poll_interval_s)}",
               f"--file_system_poll_wait_seconds={int(self.poll_interval_s)}"]
        if self.batching:
            cmd.append("--enable_batching=true")
        return cmd + self.extra_args

    def write_config(self) -> bool:
        os.makedirs(self.config_dir, exist_ok=True)
        return write_atomic(self.config_path,
                            models_config_text(self.serving_dir, self.max_versions, self.model_names))

    def start(self) -> None:
        self.write_config()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sync_loop, name="privtrain-tfserving-config",
                                        daemon=True)
        self._thread.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.write_config()
            except OSError:
                pass

    def poll(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
