"""Scaling the pipeline (docs/scaling.md): --beam-arg reaches Beam (a multi-processing run starts Beam's SDK
worker processes and passes), bad options are one line; the standard trainer on 2 local MultiWorkerMirroredStrategy
worker processes trains and pushes; a failing task stops the others; DP-SGD refuses several replicas."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import psutil
import pytest

from pipeline.beam_options import BeamArgError, beam_pipeline_args, validate
from pipeline.trainers import multiworker
from tests.conftest import PROJECT_ROOT, make_adult_sample, run_cli


# -- Beam options -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg, message", [
    ("direct_running_mode=multi_processing", "write it as --beam-arg=--NAME=VALUE"),
    ("--runner=FastRunner", "unknown Beam runner 'FastRunner'"),
    ("--direct_running_mode=fast", "mode is one of in_memory, multi_threading, multi_processing"),
    ("--direct_num_workers=0", "must be an integer >= 1"),
    ("--flinkmaster=localhost:8081", "Beam has no such option"),
    ("--num_workers=many", "invalid int value: 'many'"),
])
def test_bad_beam_options_are_refused_with_one_line(arg, message):
    with pytest.raises(BeamArgError, match=message) as info:
        validate([arg])
    assert "\n" not in str(info.value)


def test_beam_options_are_passed_through_after_the_defaults():
    flink = ["--runner=FlinkRunner", "--flink_master=localhost:8081", "--environment_type=LOOPBACK"]
    assert validate(flink) == flink
    assert beam_pipeline_args(flink) == flink  # a remote runner gets no in-process defaults
    args = beam_pipeline_args(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert args[0] == "--direct_running_mode=in_memory" and args[-2:] == ["--direct_running_mode=multi_processing",
                                                                          "--direct_num_workers=2"]
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    direct = PipelineOptions(args).view_as(DirectOptions)  # Beam keeps the last value: the user's
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("multi_processing", 2)


def test_cli_refuses_a_bad_beam_arg_before_anything_runs(tmp_path, capsys):
    from privtrain_cli.main import main

    sample = make_adult_sample(str(tmp_path / "data"), 50, 20)
    workdir = tmp_path / "work"
    assert main(["run", "--trainer", "standard", "--allow-non-private", "--data", sample, "--workdir",
                 str(workdir), "--beam-arg=--runner=Nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("privtrain: --beam-arg '--runner=Nope': unknown Beam runner") and "\n" not in err
    assert not workdir.exists()


def _descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_multi_processing_run_starts_beam_workers_and_passes(tmp_path):
    """--validate-only keeps it short: ExampleGen and StatisticsGen run on Beam in multi-processing mode."""
    sample = make_adult_sample(str(tmp_path / "data"), 400, 200)
    env = dict(os.environ, PYTHONPATH=PROJECT_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-m", "privtrain_cli", "run", "--validate-only", "--data", sample,
                             "--workdir", str(tmp_path / "work"), "--json",
                             "--beam-arg=--direct_running_mode=multi_processing",
                             "--beam-arg=--direct_num_workers=2"],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = {}
    try:
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            for child in _descendants(proc.pid):
                try:
                    if "apache_beam.runners.worker.sdk_worker_main" in " ".join(child.cmdline()):
                        options = json.loads(child.environ().get("PIPELINE_OPTIONS", "{}"))
                        # Beam's portable form: {"beam:option:NAME:v1": value}
                        seen[child.pid] = {k.split(":")[2] if k.startswith("beam:option:") else k: v
                                           for k, v in options.items()}
                except (psutil.NoSuchProcess, psutil.AccessDenied, json.JSONDecodeError):
                    pass
            time.sleep(0.1)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert {c["component"]: c["state"] for c in summary["components"]}["StatisticsGen"] == "COMPLETE"
    # the option reached Beam's runner: it started SDK worker processes, with the run's options
    assert seen, "no Beam SDK worker process was started"
    assert all(o.get("direct_running_mode") == "multi_processing" for o in seen.values()), seen
    assert not [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


# -- multi-worker training ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tf_config, message", [
    ("{not json", "is not JSON"),
    ('{"cluster": {}}', "names no cluster"),
    ('{"cluster": {"worker": ["10.1.2.3:2222"]}}', "is not this machine"),
    ('{"cluster": {"worker": ["localhost:2222"], "ps": ["localhost:2223"]}}', "task type 'ps'"),
    ('{"cluster": {"worker": ["localhost:2222", "localhost:2222"]}}', "appears twice"),
    ('{"cluster": {"worker": ["localhost"]}}', "not a host:port address"),
])
def test_bad_tf_config_is_one_line(tf_config, message):
    with pytest.raises(ValueError, match=message) as info:
        multiworker.cluster_from_tf_config(tf_config)
    assert "\n" not in str(info.value)


def _run_args(**kw):
    base = dict(beam_args=[], tf_config=None, train_workers=None, trainer="standard")
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_tf_config_comes_from_the_environment_and_dp_sgd_refuses_replicas(monkeypatch, tmp_path):
    from privtrain_cli.run import run_options

    cluster = {"cluster": {"chief": ["localhost:2222"], "worker": ["127.0.0.1:2223"]},
               "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    options = run_options(_run_args())
    assert options["trainer_args"] == {"cluster": cluster["cluster"]}
    assert "TF_CONFIG" not in os.environ  # the pipeline's own process does not act as one of the tasks
    assert multiworker.tasks_of(options["trainer_args"]["cluster"])[0] == ("chief", 0, "localhost:2222")
    with pytest.raises(ValueError, match="noise would be added once per replica"):
        run_options(_run_args(trainer="dp_sgd", train_workers=2))
    path = tmp_path / "tf_config.json"
    path.write_text(json.dumps(cluster))
    with pytest.raises(ValueError, match="DP-SGD runs in one replica only"):
        run_options(_run_args(trainer="dp_sgd", tf_config=str(path)))
    with pytest.raises(ValueError, match="for --trainer standard only"):
        run_options(_run_args(trainer="federated", train_workers=2))
    with pytest.raises(ValueError, match="both name the training cluster"):
        run_options(_run_args(tf_config=str(path), train_workers=2))
    assert run_options(_run_args(trainer="dp_sgd", train_workers=1))["trainer_args"] == {}
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:2222"]}}')  # one task: dp_sgd as usual
    assert run_options(_run_args(trainer="dp_sgd"))["trainer_args"] == {}


def test_a_failing_task_stops_the_other_and_is_named(tmp_path):
    import numpy as np

    def build_model():  # nested: pickled by value into the worker processes
        import json as _json
        import os as _os

        import tensorflow as _tf

        if _json.loads(_os.environ["TF_CONFIG"])["task"]["index"] == 1:
            raise RuntimeError("worker one cannot build its model")
        inputs = {"x": _tf.keras.Input((1,), name="x")}
        return _tf.keras.Model(inputs, _tf.keras.layers.Dense(1)(inputs["x"]))

    logs = []
    context = types.SimpleNamespace(train_features={"x": np.zeros((64, 1), np.float32)},
                                    train_labels=np.zeros(64, np.float32), build_model=build_model,
                                    scratch_dir=str(tmp_path), log=logs.append)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(multiworker.MultiWorkerError, match=r"training task worker 1 \(localhost:\d+\) exited with "
                                                           r"status 1: .*worker one cannot build its model"):
        multiworker.train(context, multiworker.local_cluster(2), epochs=1, batch_size=16, learning_rate=0.1)
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left, "a training task was left running"
    assert not os.path.exists(tmp_path / "multiworker" / "data.npz")  # the rows' copy is removed


def test_attack_a_process_outside_cannot_reach_a_training_tasks_port():
    """TF's task servers listen on every interface and run whatever a client sends. Inside the private network
    namespace a server bound to 0.0.0.0 is reachable by its peers but not by any other process of this machine
    (without the namespace the same connection succeeds: the attack works)."""
    from core.netns import PrivateNetwork

    server = ("import socket, sys, time; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
              "print(s.getsockname()[1], flush=True); "
              "c = socket.create_connection(('localhost', s.getsockname()[1])); print('peer ok', flush=True); "
              "time.sleep(30)")

    def reachable(port):
        import socket
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return True
        except OSError:
            return False

    for isolate in (False, True):
        with PrivateNetwork() as net:
            if isolate and not net.isolated:
                pytest.skip(f"no private network namespace on this machine: {net.reason}")
            prefix = net.prefix if isolate else []
            proc = subprocess.Popen(prefix + [sys.executable, "-c", server], stdout=subprocess.PIPE, text=True,
                                    start_new_session=True)
            try:
                port = int(proc.stdout.readline())
                assert proc.stdout.readline().strip() == "peer ok"  # inside, a peer task connects
                assert reachable(port) is (not isolate)
            finally:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    data = make_adult_sample(str(tmp_path_factory.mktemp("mw_data")), 1500, 600)
    workdir = str(tmp_path_factory.mktemp("mw_run"))
    result = run_cli("run", "--trainer", "standard", "--allow-non-private", "--data", data, "--workdir", workdir,
                     "--train-workers", "2", "--epochs", "3", "--min-auc", "0.6", "--json")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return workdir, json.loads(result.stdout), result


def test_two_worker_standard_run_trains_and_pushes(two_worker_run):
    workdir, summary, result = two_worker_run
    assert summary["pushed_path"] and os.path.isfile(os.path.join(summary["pushed_path"], "saved_model.pb"))
    parameters = json.loads(summary["model_properties"]["trainer_parameters"])
    assert parameters["strategy"] == "MultiWorkerMirroredStrategy"
    assert parameters["workers"] == 2 and parameters["replicas"] == 2
    assert "MultiWorkerMirroredStrategy over 2 local worker processes" in result.stderr
    from core.netns import PrivateNetwork
    with PrivateNetwork() as net:
        isolated = net.isolated
    assert ("in a private network namespace" in result.stderr) is isolated
    assert summary["metrics"]["Overall"]["auc"] > 0.6
    trainer_dir = os.path.dirname(os.path.dirname(summary["model_uri"]))  # <pipeline_root>/Trainer
    files = {f for _, _, names in os.walk(os.path.join(trainer_dir, "model_run")) for f in names}
    assert {"worker-0.log", "worker-1.log"} <= files  # both tasks ran (their logs stay in the private ModelRun)
    assert "data.npz" not in files and "build_model.pkl" not in files  # the rows' copy did not outlive the run
    running = [p for p in psutil.process_iter(["cmdline"])
               if "pipeline.trainers.multiworker" in " ".join(p.info["cmdline"] or [])]
    assert not running


@pytest.mark.slow
def test_full_pipeline_on_multi_processing_beam_with_two_training_workers(tmp_path):
    """Every Beam component in multi-processing mode and a 2-task Trainer, together (minutes on 2 cores)."""
    data = make_adult_sample(str(tmp_path / "data"), 2000, 1000)
    result = run_cli("run", "--trainer", "standard", "--allow-non-private", "--data", data, "--workdir",
                     str(tmp_path / "work"), "--epochs", "2", "--min-auc", "0.6", "--train-workers", "2", "--json",
                     "--beam-arg=--direct_running_mode=multi_processing", "--beam-arg=--direct_num_workers=2")
    assert result.returncode == 0, result.stderr[-5000:]
    summary = json.loads(result.stdout)
    assert all(c["state"] == "COMPLETE" for c in summary["components"]) and summary["pushed_path"]


def test_ctrl_c_while_training_stops_every_task(tmp_path, monkeypatch):
    import numpy as np

    def interrupted(procs, job, poll_seconds):
        time.sleep(1.0)  # the tasks are running (importing TensorFlow)
        assert all(p.poll() is None for _, p in procs)
        raise KeyboardInterrupt

    monkeypatch.setattr(multiworker, "_wait", interrupted)
    context = types.SimpleNamespace(train_features={"x": np.zeros((8, 1), np.float32)},
                                    train_labels=np.zeros(8, np.float32), build_model=lambda: None,
                                    scratch_dir=str(tmp_path), log=lambda message: None)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(KeyboardInterrupt):
        multiworker.train(context, multiworker.local_cluster(2), epochs=1, batch_size=4, learning_rate=0.1)
    assert not {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not os.path.exists(tmp_path / "multiworker" / "data.npz")
