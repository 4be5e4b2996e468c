"""Start, supervise and stop the gateway-based encrypted service (platform env; subprocess only, no TF).

``GatewayService(model, workdir=...)`` (behind ``privtrain serve --encrypted``) runs on one host:

* a private CA and certificates (``<run>/certs``; bring your own with ``certs_dir=``), every one registered in
  ``<certs>/registry.json`` (revoke with ``python -m encrypted_serving.certs revoke``); the CA's key is kept
  only in ``ca_key_dir`` (outside the run directory) or destroyed after issuing,
* the TF cluster (three compute workers + the driver) **inside its own network namespace** (root; the
  namespace has only a loopback interface, so no process outside it can reach a TF port),
* the three share gateways on the host's 127.0.0.1 with mutual TLS, each linked to its own worker by a
  Unix socket in the party's private directory,
* the model owner (this process, with the model-owner certificate) uploads the weight shares,
* a monitor: a worker or the driver exiting stops everything (the reason goes to waiting clients);
  ``serve_forever`` restarts a gateway that died.

``run_party(parties_json, party)`` (behind ``privtrain encrypted-party``) runs one party (gateway +
worker) or the driver of a multi-host deployment.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from core.netns import PrivateNetwork
from core.processes import free_ports, start_group, stop_group, stop_groups
from encrypted_serving import certs
from encrypted_serving import model_format as mf
from encrypted_serving import parties as pc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE_SUBDIR = "encrypted_serving"
DEFAULT_DATASET = os.path.join(REPO, "data", "adult")
ISOLATIONS = ("netns", "none")
WIPED_AT_START = ("parties", "driver", "public", "clients")    # not budget/: the query budget outlives restarts


class EncryptedServiceError(RuntimeError):
    """The encrypted service could not start, died, or a request failed; the message says why."""


def encrypted_python() -> str:
    from encrypted_serving.environment import EnvironmentSetupError, encrypted_python as ep
    try:
        return ep()
    except EnvironmentSetupError as e:
        raise EncryptedServiceError(str(e)) from e


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def check_isolation(isolation: str) -> None:
    if isolation not in ISOLATIONS:
        raise EncryptedServiceError("isolation must be one of %s, got %r" % (ISOLATIONS, isolation))


def private_network() -> PrivateNetwork:
    """The TF cluster's private network namespace (core/netns.py: loopback only, no root needed)."""
    net = PrivateNetwork().__enter__()
    if not net.isolated:
        raise EncryptedServiceError("cannot make the TF cluster's private network namespace (%s); pass --isolation "
                                    "none only for development (UNSAFE: TF ports on 127.0.0.1, reachable by every "
                                    "local process)" % net.reason)
    return net


def prepare_model(model: str, out_dir: str) -> str:
    from encrypted_serving.export import prepare_model as pm
    try:
        return pm(model, out_dir)
    except mf.ModelFormatError as e:
        raise EncryptedServiceError(str(e)) from e


def write_client_json(path: str, ca: str, cert: str, key: str, gateways) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return pc.save({"format": pc.CLIENT_FORMAT, "ca": ca, "cert": cert, "key": key,
                    "gateways": [[n, a] for n, a in gateways]}, path)


class GatewayService:
    def __init__(self, model: str, run_dir: Optional[str] = None, workdir: Optional[str] = None,
                 output: str = "logit", isolation: str = "netns", request_timeout_s: float = 30.0,
                 batch_sizes=(1, 1000), rate_limit=(1000, 2000), clients=("client",), certs_dir: Optional[str] = None,
                 startup_timeout: float = 900.0, python: Optional[str] = None, gateway_ports=None,
                 ca_key_dir: Optional[str] = None, min_rows_per_request: int = 100, rows_per_day: int = 10000,
                 in_flight=(2, 8 << 20)):
        if output not in pc.OUTPUTS:
            raise EncryptedServiceError("output must be one of %s, got %r" % (pc.OUTPUTS, output))
        self.model, self.output, self.isolation = model, output, isolation
        self._own_run_dir = run_dir is None and workdir is None
        self.run_dir = run_dir or (os.path.join(workdir, SERVICE_SUBDIR) if workdir else None)
        self.request_timeout_s, self.batch_sizes = float(request_timeout_s), list(batch_sizes)
        self.rate_limit, self.clients, self.certs_dir = rate_limit, tuple(clients), certs_dir
        self.startup_timeout, self.python, self.gateway_ports = startup_timeout, python, gateway_ports
        self.ca_key_dir = os.path.abspath(ca_key_dir) if ca_key_dir else None
        # per registered identity: rate_limit = (rows/s, burst rows); every request costs at least
        # min_rows_per_request rows; rows_per_day: the daily query budget; in_flight = (requests, share bytes) not yet answered
        self.min_rows_per_request, self.rows_per_day, self.in_flight = min_rows_per_request, rows_per_day, in_flight
        self.procs: Dict[str, subprocess.Popen] = {}
        self.netns: Optional[str] = None          # the TF cluster's namespace file (/proc/<pid>/ns/net)
        self._network: Optional[PrivateNetwork] = None
        self.fault: Optional[str] = None
        self.auto_restart_gateways = False
        self._lock = threading.RLock()
        self._monitor: Optional[threading.Thread] = None
        self._stopping = False
        self._stop_lock = threading.Lock()
        self.stopped = threading.Event()

    # ------------------------------------------------------------------ paths
    @property
    def parties_json(self):
        return os.path.join(self.run_dir, "parties.json")

    def client_json(self, name: str = "client") -> str:
        return os.path.join(self.run_dir, "clients", name, "client.json")

    @property
    def owner_json(self):
        return os.path.join(self.run_dir, "owner", "owner.json")

    @property
    def fault_file(self):
        return os.path.join(self.run_dir, "fault")

    def party_dir(self, party: str) -> str:
        return os.path.join(self.run_dir, "parties", party)

    def budget_path(self, party: str) -> str:
        """The party's query-budget ledger: outside the directories start() wipes, so that a restart (of the
        service or of privtrain serve) does not reset the clients' daily budgets."""
        return os.path.join(self.run_dir, "budget", party + ".json")

    def log_path(self, proc: str) -> str:
        return os.path.join(self.run_dir, "logs", proc + ".log")

    def log_tail(self, proc: str, n: int = 15) -> str:
        try:
            with open(self.log_path(proc), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ start
    def start(self) -> "GatewayService":
        check_isolation(self.isolation)
        if self.procs:
            raise EncryptedServiceError("service already started")
        if self.run_dir is None:
            self.run_dir = tempfile.mkdtemp(prefix="privtrain-encrypted-")
        os.makedirs(self.run_dir, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        for sub in WIPED_AT_START:
            shutil.rmtree(os.path.join(self.run_dir, sub), ignore_errors=True)
        for f in (self.fault_file,):
            if os.path.exists(f):
                os.remove(f)
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        # The model owner's own directory: the only place a plaintext weight file may exist.
        owner_dir = os.path.join(self.run_dir, "owner")
        os.makedirs(owner_dir, exist_ok=True)
        os.chmod(owner_dir, 0o700)
        model_dir = prepare_model(self.model, os.path.join(owner_dir, "model"))
        config = mf.load_config(model_dir)
        weights = mf.load_weights(model_dir, config)
        mf.load_preprocessing(model_dir, config)
        from encrypted_serving import bounds
        try:   # the owner's side: the certificate holds for the weights it is about to upload, on the public box
            bounds.verify(config, weights)
        except bounds.BoundsError as e:
            raise EncryptedServiceError(str(e)) from e
        del weights
        public = os.path.join(self.run_dir, "public")
        os.makedirs(public)
        for f in (mf.MODEL_JSON, mf.PREPROCESSING_JSON):
            shutil.copyfile(os.path.join(model_dir, f), os.path.join(public, f))
        cdir = self._setup_certs()
        gw_ports = list(self.gateway_ports or free_ports(3))
        tf_ports = free_ports(4)
        host_tf = "127.0.0.1"
        cfg = {"format": pc.PARTIES_FORMAT, "protocol": "aby3", "public_dir": public,
               "ca": os.path.join(cdir, "ca.pem"), "registry": certs.registry_path(cdir),
               "tf": dict(zip(pc.PARTY_NAMES + (pc.DRIVER,), ["%s:%d" % (host_tf, p) for p in tf_ports])),
               "parties": {p: {"gateway": "127.0.0.1:%d" % gw_ports[i], "cert": os.path.join(cdir, p + ".pem"),
                               "key": os.path.join(cdir, p + ".key"), "dir": self.party_dir(p),
                               "budget": self.budget_path(p)}
                           for i, p in enumerate(pc.PARTY_NAMES)},
               "driver": {"dir": os.path.join(self.run_dir, "driver")},
               "netns": None, "output": self.output,
               "rate_limit": {"rows_per_second": self.rate_limit[0], "burst_rows": self.rate_limit[1],
                              "min_rows_per_request": self.min_rows_per_request},
               "query_budget": {"rows_per_day": self.rows_per_day},
               "in_flight": {"requests": self.in_flight[0], "bytes": self.in_flight[1]},
               "max_batch": max(self.batch_sizes), "batch_sizes": self.batch_sizes,
               "request_timeout_s": self.request_timeout_s}
        for p in pc.PARTY_NAMES:
            os.makedirs(self.party_dir(p), mode=0o700)
        os.makedirs(os.path.dirname(self.budget_path(pc.PARTY_NAMES[0])), mode=0o700, exist_ok=True)
        from encrypted_serving.gateway import BudgetError, DailyBudget
        for p in pc.PARTY_NAMES:      # fail closed, in one line, before anything starts
            try:
                DailyBudget(self.budget_path(p), self.rows_per_day)
            except BudgetError as e:
                raise EncryptedServiceError(str(e)) from None
        os.makedirs(cfg["driver"]["dir"], mode=0o700)
        atexit.register(self.stop)
        try:
            if self.isolation == "netns":
                self._network = private_network()
                self.netns = cfg["netns"] = self._network.namespace_file
            pc.save(cfg, self.parties_json)
            os.chmod(self.parties_json, 0o600)
            try:
                pc.load_parties(self.parties_json)       # limits and paths checked before anything starts
            except pc.ConfigError as e:
                raise EncryptedServiceError(str(e)) from e
            gateways = [(p, cfg["parties"][p]["gateway"]) for p in pc.PARTY_NAMES]
            for c in self.clients:
                write_client_json(self.client_json(c), cfg["ca"], os.path.join(cdir, c + ".pem"),
                                  os.path.join(cdir, c + ".key"), gateways)
            write_client_json(self.owner_json, cfg["ca"], os.path.join(cdir, "model-owner.pem"),
                              os.path.join(cdir, "model-owner.key"), gateways)
            self.py = self.python or encrypted_python()
            for p in pc.PARTY_NAMES:
                self._spawn_gateway(p)
                self._spawn("worker-" + p, ["-m", "encrypted_serving.worker", "--config", self.parties_json,
                                            "--party", p], inside=True)
            self._wait_files([os.path.join(self.party_dir(p), f) for p in pc.PARTY_NAMES
                              for f in ("gateway.ready", "worker.ready")])
            self._spawn("driver", ["-m", "encrypted_serving.driver", "--config", self.parties_json,
                                   "--fault-file", self.fault_file], inside=True)
            self._wait_files([os.path.join(cfg["driver"]["dir"], "driver.ready")])
            self._monitor = threading.Thread(target=self._watch, daemon=True, name="encrypted-service-monitor")
            self._monitor.start()
            from encrypted_serving import share_client
            self.upload_seconds = share_client.upload_model(self.owner_json, model_dir, timeout_s=300)
        except BaseException:
            self.stop()
            raise
        return self

    def _setup_certs(self) -> str:
        """The service's certificates and registry. Without certs_dir: a fresh CA per start whose key is kept
        only in ca_key_dir (outside the run directory) or destroyed; with certs_dir: the operator's files,
        whose directory must not hold the CA key (registry.json is created for the configured names if absent)."""
        run = os.path.abspath(self.run_dir)
        if self.ca_key_dir and (self.ca_key_dir == run or self.ca_key_dir.startswith(run + os.sep)):
            raise EncryptedServiceError("ca_key_dir %s is inside the service's run directory %s: keep the CA key "
                                        "offline, elsewhere" % (self.ca_key_dir, run))
        if self.certs_dir is None:
            cdir = os.path.join(self.run_dir, "certs")
            shutil.rmtree(cdir, ignore_errors=True)
            certs.init_local(cdir, self.clients, ca_key_dir=self.ca_key_dir)
            return cdir
        cdir = self.certs_dir
        names = ("server0", "server1", "server2", "model-owner") + self.clients
        for name in names:
            if not os.path.isfile(os.path.join(cdir, name + ".pem")):
                raise EncryptedServiceError("certificate %s.pem missing in %s" % (name, cdir))
        if os.path.exists(os.path.join(cdir, "ca.key")):
            raise EncryptedServiceError("the CA private key %s sits next to the service's certificates: move it "
                                        "offline (the service needs only ca.pem)" % os.path.join(cdir, "ca.key"))
        if not os.path.isfile(certs.registry_path(cdir)):
            for name in names:
                certs.register(certs.registry_path(cdir), os.path.join(cdir, name + ".pem"))
        return cdir

    def _spawn(self, name: str, args: List[str], inside: bool) -> None:
        cmd = (self.netns_prefix if inside else []) + [self.py] + args
        with open(self.log_path(name), "ab") as log:
            self.procs[name] = start_group(cmd, cwd=REPO, env=_child_env(), stdout=log, stderr=subprocess.STDOUT)

    @property
    def netns_prefix(self) -> List[str]:
        """argv prefix that runs a command inside the TF cluster's namespace ([] without isolation)."""
        return list(self._network.prefix) if self._network else []

    def _spawn_gateway(self, party: str) -> None:
        ready = os.path.join(self.party_dir(party), "gateway.ready")
        if os.path.exists(ready):
            os.remove(ready)
        self._spawn("gateway-" + party, ["-m", "encrypted_serving.gateway", "--config", self.parties_json,
                                         "--party", party, "--fault-file", self.fault_file], inside=False)

    def _wait_files(self, files: List[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise EncryptedServiceError("encrypted service process %s exited with status %s during start-up; "
                                                "log %s:\n%s" % (name, proc.returncode, self.log_path(name),
                                                                 self.log_tail(name)))
            missing = [f for f in files if not os.path.exists(f)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise EncryptedServiceError("encrypted service not ready after %.0fs (waiting for %s; logs in %s)"
                                            % (self.startup_timeout, missing, os.path.join(self.run_dir, "logs")))
            time.sleep(0.1)

    # ------------------------------------------------------------------ supervision
    def restart_gateway(self, party: str) -> None:
        with self._lock:
            old = self.procs.get("gateway-" + party)
            if old is not None:
                stop_group(old, grace=1.0)
            self._spawn_gateway(party)
            self._wait_files([os.path.join(self.party_dir(party), "gateway.ready")])

    def dead(self) -> Dict[str, int]:
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def _watch(self) -> None:
        while not self._stopping:
            time.sleep(0.2)
            with self._lock:
                if self._stopping:
                    return
                dead = self.dead()
                fatal = {n: c for n, c in dead.items() if not n.startswith("gateway-")}
                if fatal:
                    # a dead worker is the cause (the driver's exit follows from it); else the driver's reason
                    name, code = sorted(fatal.items(), key=lambda kv: (not kv[0].startswith("worker-"), kv[0]))[0]
                    reason = None
                    if name.startswith("worker-") and code != 0:
                        reason = "the compute worker of party %s exited (status %s)" % (name[len("worker-"):], code)
                        with open(self.fault_file, "w") as f:
                            f.write(reason + "\n")
                    elif os.path.isfile(self.fault_file):
                        with open(self.fault_file) as f:
                            reason = f.read().strip() or None
                    if reason is None:
                        what = ("compute worker of party %s" % name[len("worker-"):]) if name.startswith("worker-") else name
                        reason = "the %s exited (status %s)" % (what, code)
                        with open(self.fault_file, "w") as f:
                            f.write(reason + "\n")
                    self.fault = reason
                    sys.stderr.write("encrypted service: %s; stopping every party\n" % reason)
                    threading.Thread(target=self.stop, daemon=True).start()
                    return
                if self.auto_restart_gateways:
                    for n in dead:
                        if n.startswith("gateway-"):
                            sys.stderr.write("encrypted service: %s exited (%s); restarting it\n" % (n, dead[n]))
                            self._spawn_gateway(n[len("gateway-"):])

    def is_alive(self) -> bool:
        return bool(self.procs) and not self.dead() and self.fault is None

    @property
    def pids(self) -> Dict[str, int]:
        return {n: p.pid for n, p in self.procs.items()}

    def serve_forever(self) -> int:
        self.auto_restart_gateways = True
        stop = {"flag": False}
        old = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
        try:
            while not stop["flag"]:
                if self.fault or not self.procs:
                    sys.stderr.write("encrypted service stopped: %s\n" % (self.fault or "stopped"))
                    return 1
                time.sleep(0.5)
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            signal.signal(signal.SIGTERM, old)
            self.stop()

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Stop every process (gateways first, so they can tell waiting clients why), remove the namespace.
        A second caller waits until the first has finished."""
        with self._stop_lock:
            self._stop()
        self.stopped.set()

    def _stop(self) -> None:
        with self._lock:
            self._stopping = True
            procs, self.procs = self.procs, {}
        gws = [p for n, p in procs.items() if n.startswith("gateway-")]
        for p in gws:   # SIGTERM first: a gateway tells its waiting clients why, while the rest is stopped
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for n, p in sorted(procs.items(), key=lambda kv: kv[0] != "driver"):   # the driver first
            if not n.startswith("gateway-"):
                stop_group(p, grace=2.0)
        stop_groups(gws, grace=3.0)
        if self._network is not None:
            self._network.__exit__()
            self._network = self.netns = None
        if self.run_dir:
            for p in pc.PARTY_NAMES:
                try:
                    os.remove(os.path.join(self.party_dir(p), "backend.sock"))
                except OSError:
                    pass
        if self._own_run_dir and self.run_dir and os.path.isdir(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------- privtrain predict --encrypted
def find_client_json(workdir: str) -> Optional[str]:
    cand = os.path.join(workdir, SERVICE_SUBDIR, "clients", "client", "client.json")
    return cand if os.path.isfile(cand) else None


def run_predict(input_file: str, workdir: Optional[str] = None, client_json: Optional[str] = None,
                model: Optional[str] = None, dataset: str = DEFAULT_DATASET, limit: Optional[int] = None,
                timeout_s: float = 60.0, isolation: str = "netns") -> dict:
    """Gateway client: uses client_json (or the running service's at <workdir>), else starts a temporary service."""
    from encrypted_serving import preprocessing as pp
    from encrypted_serving import share_client as sc
    if client_json is None and workdir is not None:
        client_json = find_client_json(workdir)
    try:
        if client_json is not None:
            return sc.predict_file(client_json, input_file, dataset, limit, timeout_s)
        if model is None and workdir is None:
            raise EncryptedServiceError("give a workdir (running service or pushed model), a client.json or a model")
        with GatewayService(model or workdir, isolation=isolation, batch_sizes=(1, 1000)) as svc:
            return sc.predict_file(svc.client_json(), input_file, dataset, limit, timeout_s)
    except (sc.ShareClientError, certs.CertError, pc.ConfigError, pp.PreprocessingError, mf.ModelFormatError) as e:
        raise EncryptedServiceError(str(e)) from e


# ---------------------------------------------------------------------- privtrain encrypted-party
def run_party(parties_json: str, party: str, python: Optional[str] = None) -> int:
    """Multi-host mode: run this host's gateway + compute worker (party server0-2) or the driver, until
    SIGTERM/Ctrl-C or until one of them exits (then the other is stopped too)."""
    c = pc.load_parties(parties_json)
    if party not in pc.PARTY_NAMES + (pc.DRIVER,):
        raise EncryptedServiceError("--party must be one of %s" % (pc.PARTY_NAMES + (pc.DRIVER,),))
    py = python or encrypted_python()
    procs = {}
    if party == pc.DRIVER:
        os.makedirs(c["driver"]["dir"], mode=0o700, exist_ok=True)
        cmds = {"driver": ["-m", "encrypted_serving.driver", "--config", parties_json]}
    else:
        certs.check_valid(c["parties"][party]["cert"], "gateway certificate of %s" % party)
        os.makedirs(c["parties"][party]["dir"], mode=0o700, exist_ok=True)
        cmds = {"gateway": ["-m", "encrypted_serving.gateway", "--config", parties_json, "--party", party],
                "worker": ["-m", "encrypted_serving.worker", "--config", parties_json, "--party", party]}
    for name, args in cmds.items():
        procs[name] = start_group([py] + args, cwd=REPO, env=_child_env())
    code = 0
    try:
        while True:
            dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            if dead:
                sys.stderr.write("encrypted-party %s: %s exited; stopping\n" % (party, dead))
                code = 1
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop_groups(procs.values())
    return code
