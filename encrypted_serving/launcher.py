"""Platform-side control of the encrypted service (platform env; no TF-Encrypted import, subprocess only).

LEGACY (the old client-driven design, issue 9): kept only as the baseline of simulations/bench_encrypted.py
and the control of the attack tests. A client of this design drives the parties' TF graph and can read the
weights; the served design is encrypted_serving.service / gateway / worker / driver / share_client.


* ``EncryptedService(model_dir, ...)``: starts the four long-running parties (server0, server1,
  server2, model-owner) as separate encrypted-env processes, each in its own process group, on
  127.0.0.1 ports, and writes ``<run_dir>/cluster.json`` for clients. ``start()/stop()`` or a
  ``with`` block; ``stop()`` always terminates (SIGTERM, then SIGKILL to each process group).
* ``run_predict(...)``: the function behind ``privtrain predict --encrypted``; runs the prediction
  client (``python -m encrypted_serving.client``) in the encrypted env against a running service, or
  against a temporary one started for the call.
* ``encrypted_python()``: the encrypted env's interpreter, from ``scripts/setup_env.sh encrypted``.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Union

from encrypted_serving import cluster as cl
from encrypted_serving import model_format as mf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE_SUBDIR = "encrypted_serving"   # <workdir>/encrypted_serving/{cluster.json,public/,model/,logs/}
DEFAULT_DATASET = os.path.join(REPO, "data", "adult")


class EncryptedServiceError(RuntimeError):
    """The encrypted service could not start, died, or a prediction failed; the message says why."""


class PartyUnavailable(EncryptedServiceError):
    """A party died or did not answer within the timeout (client exit status 3)."""


_ENC_PY: Optional[str] = None


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
            raise EncryptedServiceError("cannot set up the encrypted environment (%s encrypted):\n%s"
                                        % (script, e.stderr[-2000:])) from e
        _ENC_PY = os.path.join(out.stdout.strip().splitlines()[-1], "bin", "python")
    return _ENC_PY


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL it; reaps the leader."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # stragglers in the group, even if the leader exited
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:
        pass


def find_pushed_model(workdir: str) -> Optional[str]:
    """Newest pushed SavedModel version dir under workdir: one holding assets.extra/preprocessing.json."""
    found = []
    for root, dirs, files in os.walk(workdir):
        if os.path.basename(root) == "assets.extra" and mf.PREPROCESSING_JSON in files:
            vdir = os.path.dirname(root)
            if os.path.isfile(os.path.join(vdir, "saved_model.pb")):
                base = os.path.basename(vdir)
                found.append((int(base) if base.isdigit() else -1, os.path.getmtime(vdir), vdir))
    return max(found)[2] if found else None


def prepare_model(model: str, out_dir: str) -> str:
    """An encrypted_model dir for `model`: used as is if it holds model.json, else exported from a pushed
    SavedModel version dir (or the newest one under a workdir) into out_dir."""
    if os.path.isfile(os.path.join(model, mf.MODEL_JSON)):
        return model
    version_dir = model
    if not os.path.isfile(os.path.join(model, "saved_model.pb")):
        version_dir = find_pushed_model(model)
        if version_dir is None:
            raise EncryptedServiceError("%s is neither an encrypted_model dir (model.json), a pushed SavedModel "
                                        "version dir, nor a workdir holding one" % model)
    from encrypted_serving import export
    return export.export_pushed_model(version_dir, out_dir)


class EncryptedService:
    """The encrypted service: server0-2 and the model owner as separate encrypted-env processes.

    model_dir: an encrypted_model directory (or a pushed SavedModel version dir: exported first).
    run_dir: where cluster.json, public/, logs/ and the model owner's staged weights go
      (default: <workdir>/encrypted_serving if workdir is given, else a fresh temp dir removed on stop).
    ports: {player: port} or a list of 5 ports in cluster.PLAYERS order (prediction-client last);
      missing ones are picked free.
    """

    def __init__(self, model_dir: str, run_dir: Optional[str] = None, workdir: Optional[str] = None,
                 ports: Union[None, Sequence[int], Dict[str, int]] = None, protocol: str = "aby3",
                 host: str = "127.0.0.1", startup_timeout: float = 180.0, peer_grace: float = 3.0,
                 python: Optional[str] = None):
        if protocol not in cl.PROTOCOLS:
            raise EncryptedServiceError("protocol must be one of %s, got %r" % (cl.PROTOCOLS, protocol))
        self.model_dir = model_dir
        self._own_run_dir = run_dir is None and workdir is None
        self.run_dir = run_dir or (os.path.join(workdir, SERVICE_SUBDIR) if workdir else None)
        if isinstance(ports, (list, tuple)):
            if len(ports) != len(cl.PLAYERS):
                raise EncryptedServiceError("ports: give %d ports in the order %s" % (len(cl.PLAYERS), cl.PLAYERS))
            ports = dict(zip(cl.PLAYERS, ports))
        self.requested_ports = dict(ports or {})
        self.protocol = protocol
        self.host = host
        self.startup_timeout = startup_timeout
        self.peer_grace = peer_grace
        self.python = python
        self.procs: Dict[str, subprocess.Popen] = {}
        self.cluster: Optional[dict] = None
        self._atexit = False

    # ------------------------------------------------------------------ paths
    @property
    def cluster_json(self) -> str:
        return os.path.join(self.run_dir, cl.CLUSTER_JSON)

    def log_path(self, name: str) -> str:
        return os.path.join(self.run_dir, "logs", name + ".log")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "EncryptedService":
        if self.procs:
            raise EncryptedServiceError("service already started")
        if self.run_dir is None:
            self.run_dir = tempfile.mkdtemp(prefix="privtrain-encrypted-")
        os.makedirs(self.run_dir, exist_ok=True)
        for sub in ("ready", "public"):
            shutil.rmtree(os.path.join(self.run_dir, sub), ignore_errors=True)
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        model_dir = prepare_model(self.model_dir, os.path.join(self.run_dir, "model"))
        config = mf.load_config(model_dir)
        mf.load_weights(model_dir, config)          # validate before starting anything
        mf.load_preprocessing(model_dir, config)
        public = os.path.join(self.run_dir, "public")
        os.makedirs(public)
        for f in (mf.MODEL_JSON, mf.PREPROCESSING_JSON):   # the public part only: no weights
            shutil.copyfile(os.path.join(model_dir, f), os.path.join(public, f))
        free = iter(cl.free_ports(len(cl.PLAYERS), self.host))
        ports = {p: int(self.requested_ports.get(p) or next(free)) for p in cl.PLAYERS}
        busy = [p for p in cl.SERVICE_PLAYERS if cl.port_open("%s:%d" % (self.host, ports[p]), 0.2)]
        if busy:
            raise EncryptedServiceError("port(s) already in use: %s" % {p: ports[p] for p in busy})
        self.cluster = cl.make_cluster(ports, self.protocol, self.run_dir, self.host)
        cl.save(self.cluster, self.cluster_json + ".starting")
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        py = self.python or encrypted_python()
        try:
            for name in cl.SERVICE_PLAYERS:
                cmd = [py, "-m", "encrypted_serving.player", "--cluster", self.cluster_json + ".starting",
                       "--name", name, "--peer-grace", str(self.peer_grace)]
                if name == cl.MODEL_OWNER:
                    cmd += ["--model-dir", os.path.abspath(model_dir)]
                with open(self.log_path(name), "ab") as log:
                    self.procs[name] = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdin=subprocess.DEVNULL,
                                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_ready()
            os.replace(self.cluster_json + ".starting", self.cluster_json)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = set(cl.SERVICE_PLAYERS)
        while pending:
            for name in list(pending):
                rc = self.procs[name].poll()
                if rc is not None:
                    raise EncryptedServiceError("encrypted party %s exited with status %s during start-up; log %s:\n%s"
                                                % (name, rc, self.log_path(name), self.log_tail(name)))
                if (os.path.exists(os.path.join(self.run_dir, "ready", name))
                        and cl.port_open(cl.address(self.cluster, name), 0.2)):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise EncryptedServiceError("encrypted parties %s not ready after %.0fs (logs in %s)"
                                            % (sorted(pending), self.startup_timeout, os.path.dirname(self.log_path("x"))))
            if pending:
                time.sleep(0.1)

    def stop(self) -> None:
        """Terminate every party (process groups; SIGKILL after a grace period). Idempotent."""
        procs, self.procs = self.procs, {}
        for proc in procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in procs.values():
            _kill_group(proc, grace=5.0)
        if self.run_dir and os.path.isfile(self.cluster_json):
            try:
                os.remove(self.cluster_json)
            except OSError:
                pass
        if self.run_dir:
            shutil.rmtree(os.path.join(self.run_dir, cl.MODEL_OWNER), ignore_errors=True)  # staged weights
        if self._own_run_dir and self.run_dir and os.path.isdir(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._atexit:
            try:
                atexit.unregister(self.stop)
            except Exception:  # noqa: BLE001
                pass
            self._atexit = False

    def __enter__(self) -> "EncryptedService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ status
    @property
    def pids(self) -> Dict[str, int]:
        return {n: p.pid for n, p in self.procs.items()}

    def dead_parties(self) -> Dict[str, int]:
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def is_alive(self) -> bool:
        return bool(self.procs) and not self.dead_parties()

    def log_tail(self, name: str, n: int = 20) -> str:
        try:
            with open(self.log_path(name), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def serve_forever(self, poll: float = 1.0) -> int:
        """Block until a party exits (returns 1 after stopping the rest) or Ctrl-C / SIGTERM (returns 0)."""
        stop = {"flag": False}
        old = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
        try:
            while not stop["flag"]:
                dead = self.dead_parties()
                if dead:
                    sys.stderr.write("encrypted service: party %s exited (%s); stopping the others\n"
                                     % (", ".join(dead), dead))
                    return 1
                time.sleep(poll)
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            signal.signal(signal.SIGTERM, old)
            self.stop()


def run_predict(input_file: str, workdir: Optional[str] = None, limit: Optional[int] = None,
                cluster_json: Optional[str] = None, model: Optional[str] = None,
                dataset: str = DEFAULT_DATASET, timeout_s: float = 30.0, batch_size: int = 1000,
                protocol: str = "aby3", python: Optional[str] = None) -> dict:
    """Encrypted predictions for the raw rows in input_file (behind `privtrain predict --encrypted`).

    Uses the running service whose cluster.json is given or found at <workdir>/encrypted_serving/;
    otherwise starts a temporary service for `model` (or the newest pushed model under workdir) and
    stops it afterwards. Returns the client's JSON result (see encrypted_serving.client). Raises
    PartyUnavailable when a party is down / silent, EncryptedServiceError for anything else.
    """
    if cluster_json is None and workdir is not None:
        cand = os.path.join(workdir, SERVICE_SUBDIR, cl.CLUSTER_JSON)
        if os.path.isfile(cand):
            cluster_json = cand
    if cluster_json is not None:
        return _run_client(cluster_json, input_file, limit, dataset, timeout_s, batch_size, python)
    model = model or workdir
    if model is None:
        raise EncryptedServiceError("run_predict needs a workdir (with a running service or a pushed model), "
                                    "a cluster_json or a model")
    with tempfile.TemporaryDirectory(prefix="privtrain-encrypted-predict-") as tmp:
        with EncryptedService(model, run_dir=tmp, protocol=protocol, python=python) as svc:
            return _run_client(svc.cluster_json, input_file, limit, dataset, timeout_s, batch_size, python)


def _last_phase(err: str) -> str:
    phases = [l[len("phase: "):] for l in (err or "").splitlines() if l.startswith("phase: ")]
    return phases[-1] if phases else "starting"


def _diagnose(cluster: dict) -> str:
    down = cl.unreachable(cluster)
    if down:
        return "Unreachable: %s." % ", ".join(down)
    quiet = cl.silent(cluster)
    if quiet:
        return "Not answering: %s." % ", ".join(quiet)
    return "All parties answer now."


def _run_client(cluster_json, input_file, limit, dataset, timeout_s, batch_size, python) -> dict:
    cluster = cl.load(cluster_json)
    down = cl.unreachable(cluster)
    if down:
        raise PartyUnavailable("encrypted service party %s not reachable (%s); is `privtrain serve --encrypted` "
                               "running?" % (", ".join(down), cluster_json))
    fd, out = tempfile.mkstemp(prefix="privtrain-encrypted-result-", suffix=".json")
    os.close(fd)
    cmd = [python or encrypted_python(), "-m", "encrypted_serving.client", "--cluster", cluster_json,
           "--input", os.path.abspath(input_file), "--dataset", os.path.abspath(dataset), "--output", out,
           "--timeout", str(timeout_s), "--batch-size", str(batch_size)]
    if limit is not None:
        cmd += ["--limit", str(int(limit))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    # The client has its own per-call timeout; this outer one also covers its start-up (TF import).
    outer = 120.0 + 3 * timeout_s
    try:
        _, err = proc.communicate(timeout=outer)
    except subprocess.TimeoutExpired:
        _kill_group(proc, grace=1.0)
        _, err = proc.communicate()
        raise PartyUnavailable("encrypted prediction client did not finish within %.0fs (last phase: %s); killed. %s"
                               % (outer, _last_phase(err), _diagnose(cluster)))
    finally:
        if proc.poll() is None:
            _kill_group(proc, grace=1.0)
    try:
        if proc.returncode != 0:
            msg = [l[len("error: "):] for l in err.splitlines() if l.startswith("error: ")]
            text = msg[-1] if msg else err.strip()[-2000:]
            cls = PartyUnavailable if proc.returncode == 3 else EncryptedServiceError
            if not msg and "Timeout (" in err:   # the client's faulthandler hard limit fired
                text = "encrypted prediction client hung while %s and was stopped; %s" % (_last_phase(err),
                                                                                         _diagnose(cluster))
                cls = PartyUnavailable
            raise cls(text or "encrypted prediction client failed with status %d" % proc.returncode)
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)
