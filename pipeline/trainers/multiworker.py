"""Multi-worker training of the ``standard`` kind: Keras fit under ``tf.distribute.MultiWorkerMirroredStrategy``
in worker processes that the Trainer executor starts itself (docs/scaling.md#multi-worker-training).

Why processes of their own: the strategy's collective ops must be configured before TensorFlow runs anything,
and the executor's process has long been running TensorFlow (Transform, loading the examples). So the executor
(already past the privacy protocol's plan and ledger reservation, which stay in the executor) writes the
transformed training rows and the model recipe to its private scratch directory, starts one process per task
of the cluster with that task's ``TF_CONFIG``, and waits. All tasks train the same global batches (the data
is sharded by element across them); the chief (``chief`` task, else worker 0) writes the trained weights, the
others write theirs to a temporary directory that is removed (TFX's and TensorFlow's rule for distributed
saving). The executor loads the chief's weights into a fresh model and exports it as for one process. A task
that fails stops the others (their process groups are killed), also on Ctrl-C; the error names the task.

The cluster: ``TF_CONFIG``'s ``cluster`` (from ``--tf-config FILE`` or the environment; its ``task`` is ignored,
every task is started here), or ``--train-workers N`` (N local workers on free ports). Every address must be
this machine: ``privtrain run`` starts the tasks itself.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Tuple

from core.netns import PrivateNetwork
from core.processes import free_ports, start_group, stop_groups

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
TASK_TYPES = ("chief", "worker")


class MultiWorkerError(RuntimeError):
    """A training task failed; the message names it and its last log line."""


def cluster_from_tf_config(tf_config, origin: str = "TF_CONFIG") -> Dict[str, List[str]]:
    """Validates a TF_CONFIG (a JSON string or dict) and returns its cluster {"chief": [..], "worker": [..]}.
    Raises ValueError with one line naming the problem and the fix."""
    if isinstance(tf_config, str):
        try:
            tf_config = json.loads(tf_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"{origin} is not JSON ({e.msg} at line {e.lineno} column {e.colno}); write it as "
                             '{"cluster": {"worker": ["localhost:PORT", "localhost:PORT"]}}') from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise ValueError(f"{origin} names no cluster: write it as "
                         '{"cluster": {"worker": ["localhost:PORT", "localhost:PORT"]}}')
    other = sorted(set(cluster) - set(TASK_TYPES))
    if other:
        raise ValueError(f"{origin}: task type {other[0]!r} is not used by MultiWorkerMirroredStrategy; the "
                         "cluster may have one 'chief' and 'worker' tasks only")
    if len(cluster.get("chief") or []) > 1:
        raise ValueError(f"{origin}: a cluster has at most one 'chief' task")
    seen = set()
    out = {}
    for task_type in TASK_TYPES:
        addresses = cluster.get(task_type) or []
        if not isinstance(addresses, list):
            raise ValueError(f"{origin}: cluster.{task_type} must be a list of \"host:port\" addresses")
        for address in addresses:
            host, sep, port = str(address).rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{origin}: {address!r} is not a host:port address")
            if host not in LOCAL_HOSTS and host not in (socket.gethostname(), socket.getfqdn()):
                raise ValueError(f"{origin}: task address {address!r} is not this machine; privtrain run starts "
                                 "every task of the cluster itself, so use localhost addresses (a cluster of "
                                 "several machines is not supported: see docs/scaling.md)")
            if address in seen:
                raise ValueError(f"{origin}: address {address!r} appears twice in the cluster")
            seen.add(address)
        if addresses:
            out[task_type] = [str(a) for a in addresses]
    return out


def local_cluster(workers: int) -> Dict[str, List[str]]:
    return {"worker": [f"localhost:{p}" for p in free_ports(workers)]}


def tasks_of(cluster: Mapping[str, List[str]]) -> List[Tuple[str, int, str]]:
    """(type, index, address) of every task; the chief (``chief``, else worker 0) first."""
    return [(t, i, a) for t in TASK_TYPES for i, a in enumerate(cluster.get(t) or [])]


def num_tasks(cluster: Mapping[str, List[str]]) -> int:
    return len(tasks_of(cluster))


def _is_chief(task_type: str, index: int, cluster: Mapping[str, List[str]]) -> bool:
    return task_type == "chief" or (not cluster.get("chief") and task_type == "worker" and index == 0)


def train(context, cluster: Mapping[str, List[str]], epochs: int, batch_size: int, learning_rate: float,
          poll_seconds: float = 0.2):
    """Trains context.build_model() on every task of ``cluster``; returns (model with the chief's weights,
    the chief's history dict). Every task process is stopped when this returns or raises."""
    import cloudpickle
    import numpy as np

    job = os.path.join(context.scratch_dir, "multiworker")
    shutil.rmtree(job, ignore_errors=True)
    os.makedirs(job)
    arrays = {f"x:{k}": np.asarray(v) for k, v in context.train_features.items()}
    np.savez(os.path.join(job, "data.npz"), y=np.asarray(context.train_labels), **arrays)
    with open(os.path.join(job, "build_model.pkl"), "wb") as f:
        cloudpickle.dump(context.build_model, f)  # the model recipe, with the released DP normalisation
    with open(os.path.join(job, "job.json"), "w") as f:
        json.dump({"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                   "cluster": dict(cluster)}, f)
    procs: List[Tuple[str, subprocess.Popen]] = []
    network = PrivateNetwork().__enter__()  # the tasks' gRPC ports are reachable only from inside it
    if not network.isolated:
        context.log(f"warning: the training tasks' ports are open to this machine's network while they hold the "
                    f"training rows (no private network namespace: {network.reason}); run only on a trusted host")
    try:
        for task_type, index, address in tasks_of(cluster):
            env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": dict(cluster),
                                                         "task": {"type": task_type, "index": index}}),
                       PYTHONPATH=os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p))
            log = open(os.path.join(job, f"{task_type}-{index}.log"), "w")
            try:
                procs.append((f"{task_type} {index} ({address})", start_group(
                    network.prefix + [sys.executable, "-m", "pipeline.trainers.multiworker", job], env=env,
                    cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)))
            finally:
                log.close()
        context.log(f"standard trainer: MultiWorkerMirroredStrategy over {len(procs)} local worker processes"
                    + (" in a private network namespace" if network.isolated else ""))
        _wait(procs, job, poll_seconds)
        with open(os.path.join(job, "result", "history.json")) as f:
            history = json.load(f)
        with np.load(os.path.join(job, "result", "weights.npz")) as saved:
            weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    finally:
        stop(procs)
        network.__exit__()
        for name in ("data.npz", "build_model.pkl"):  # the private rows' copy does not outlive the run
            try:
                os.remove(os.path.join(job, name))
            except FileNotFoundError:
                pass
    for line in history.get("log", []):
        context.log(line)
    model = context.build_model()
    model.set_weights(weights)
    return model, history


def _wait(procs, job: str, poll_seconds: float) -> None:
    while True:
        running = 0
        for name, proc in procs:
            rc = proc.poll()
            if rc is None:
                running += 1
            elif rc != 0:
                raise MultiWorkerError(f"training task {name} exited with status {rc}: "
                                       f"{_last_line(job, name)} (its log: {_log_path(job, name)})")
        if not running:
            return
        time.sleep(poll_seconds)


def _log_path(job: str, name: str) -> str:
    task_type, index = name.split()[:2]
    return os.path.join(job, f"{task_type}-{index}.log")


def _last_line(job: str, name: str) -> str:
    try:
        with open(_log_path(job, name), errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:300]


def stop(procs, grace: float = 5.0) -> None:
    """Terminates every task's process group, then kills what is left after ``grace`` seconds."""
    stop_groups([proc for _, proc in procs], grace)


def worker_main(job: str) -> int:
    """One task: its TF_CONFIG is in the environment. Must create the strategy before any TensorFlow op."""
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import cloudpickle
    import numpy as np

    task = json.loads(os.environ["TF_CONFIG"])["task"]
    with open(os.path.join(job, "job.json")) as f:
        settings = json.load(f)
    chief = _is_chief(task["type"], int(task["index"]), settings["cluster"])
    with np.load(os.path.join(job, "data.npz")) as data:
        x = {k[2:]: data[k] for k in data.files if k.startswith("x:")}
        y = data["y"]
    with open(os.path.join(job, "build_model.pkl"), "rb") as f:
        build_model = cloudpickle.load(f)
    with strategy.scope():
        model = build_model()
        model.compile(optimizer=tf.keras.optimizers.Adam(settings["learning_rate"]),
                      loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                      metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # The same seeded order on every task, global batches of --batch-size, each task a share of each batch.
    train_data = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), seed=0)
                  .batch(settings["batch_size"]).with_options(options))
    history = model.fit(train_data, epochs=settings["epochs"], verbose=0)
    losses = [float(v) for v in history.history["loss"]]
    accuracies = [float(v) for v in history.history["accuracy"]]
    # Every task saves (the strategy's rule); only the chief's copy is kept.
    target = os.path.join(job, "result") if chief else os.path.join(job, f"tmp-{task['type']}-{task['index']}")
    os.makedirs(target, exist_ok=True)
    np.savez(os.path.join(target, "weights.npz"), *model.get_weights())
    log = [f"  epoch {i + 1}/{len(losses)}: loss {loss:.4f} accuracy {acc:.4f} (over all workers)"
           for i, (loss, acc) in enumerate(zip(losses, accuracies))]
    with open(os.path.join(target, "history.json"), "w") as f:
        json.dump({"loss": losses, "accuracy": accuracies, "replicas": strategy.num_replicas_in_sync,
                   "log": log}, f)
    if not chief:
        shutil.rmtree(target, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
