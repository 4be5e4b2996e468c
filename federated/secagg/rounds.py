"""Federated rounds with secure aggregation: the server learns only each round's (noisy) sum of client updates.

``run_secure`` is the engine's path for ``FederatedConfig.secure_aggregation`` (``--secure-aggregation``). Each
round: sample clients (as the engine: Poisson or fixed, from OS entropy for a private run), train each sampled
client locally (plain SGD on a Keras copy of the model, outside any aggregator), encode its clipped update with
the distributed discrete Gaussian (``ddp``), run SecAgg+ (``protocol``) among the sampled clients with the
configured dropouts (the dropped clients go silent after sharing their keys), decode the sum, divide by the public
``clients_per_round`` and apply it with the server learning rate (DP-FedAvg's unweighted mean). Clients without
rows take part with a zero update: they still add their noise share, and the round's abort condition (fewer
participants than ``min_clients``) depends only on sampling and dropouts, never on the data.

``aggregation="central"`` runs the same loop with DP-FedAvg's central Gaussian instead (plaintext clipped sum +
N(0, (z C)^2)), the like-for-like baseline of ``simulations/bench_secagg.py``.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import secrets
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np

from federated.secagg import ddp, protocol

SMALL_COHORT = 64        # up to this many clients per round: every pair of clients masks (SecAgg)
DEGREE = 40              # above: SecAgg+ neighbourhoods of this size (a random Harary graph per round)
POISSON_FLOOR = 0.8      # Poisson cohorts: the noise floor at 80% of the expected surviving clients


def min_clients(clients_per_round: int, dropout_rate: float, sampling: str) -> int:
    """The fewest clients whose noise a released sum holds (public): each client adds noise for this many, and
    the clients refuse to unmask a smaller sum. Fixed-size cohorts: the survivors of the configured dropouts;
    Poisson cohorts: 80% of the expected survivors (a smaller cohort's round is aborted)."""
    survivors = clients_per_round * (1.0 - float(dropout_rate))
    if sampling == "fixed":
        return max(2, int(math.ceil(survivors - 0.5 - 1e-9)))   # m - round(rate m) >= m (1 - rate) - 0.5
    return max(2, int(math.floor(POISSON_FLOOR * survivors)))


def policy(floor: int) -> protocol.Policy:
    """The run configuration every client gets at start (not from the server): the graph degree, a majority
    threshold and the noise floor it accepts in a round's parameters."""
    return protocol.Policy(min_inputs=int(floor), small_cohort=SMALL_COHORT, degree=DEGREE)


def protocol_params(ids, dim: int, bits: int, floor: int) -> protocol.Params:
    return policy(floor).params(list(ids), dim, bits)


def check_config(cfg) -> None:
    """One clear line for the settings the secure path does not run."""
    if cfg.client_optimizer != "sgd" or cfg.server_optimizer != "sgd":
        raise ValueError("--secure-aggregation trains clients and applies the sum with plain SGD: pass "
                         "--client-optimizer sgd --server-optimizer sgd")
    if cfg.adaptive_clipping:
        raise ValueError("--secure-aggregation uses a fixed clip norm: drop --adaptive-clipping")
    if cfg.workers:
        raise ValueError("--secure-aggregation runs its clients in this process or in --worker-processes N client "
                         "processes, not on TFF workers: drop --workers")
    if cfg.checkpoint_every:
        raise ValueError("--secure-aggregation does not write checkpoints yet: drop --checkpoint-every")
    if cfg.noise_cohort_size is not None:
        raise ValueError("--secure-aggregation adds each client's noise share itself: drop --noise-cohort-size")


class LocalTrainer:
    """Plain local SGD on a Keras copy of the model; returns the client's model delta (trainable weights)."""

    def __init__(self, build_model, features, labels, shards, batch_size: int, epochs: int, lr: float):
        import tensorflow as tf

        self.tf = tf
        self.model = build_model()
        self.vars = self.model.trainable_variables
        self.shapes = [tuple(v.shape) for v in self.vars]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.dim = int(sum(self.sizes))
        self.features, self.labels, self.shards = features, labels, shards
        self.batch_size, self.epochs, self.lr = batch_size, epochs, float(lr)
        loss_fn = tf.keras.losses.BinaryCrossentropy(from_logits=True)
        model, tvars = self.model, self.vars

        @tf.function(reduce_retracing=True)
        def step(x, y, lr):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = loss_fn(y, logits)
            grads = tape.gradient(loss, tvars)
            for v, g in zip(tvars, grads):
                v.assign_sub(lr * g)
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.cast(logits > 0, tf.float32), y), tf.float32))
            return loss * tf.cast(tf.shape(y)[0], tf.float32), correct

        self._step = step

    def flat(self, variables) -> np.ndarray:
        return np.concatenate([np.asarray(v).reshape(-1) for v in variables]).astype(np.float64)

    def assign(self, variables, flat: np.ndarray) -> None:
        off = 0
        for v, shape, size in zip(variables, self.shapes, self.sizes):
            v.assign(flat[off:off + size].reshape(shape).astype(np.float32))
            off += size

    def train(self, c: int, global_flat: np.ndarray, round_seed: int):
        """(delta, summed loss, correct, examples) of client ``c`` from the global weights."""
        rows = self.shards[c]
        if rows.shape[0] == 0:
            return np.zeros(self.dim), 0.0, 0.0, 0
        self.assign(self.vars, global_flat)
        rng = np.random.default_rng([int(round_seed), int(c)])
        order = np.concatenate([rows[rng.permutation(rows.shape[0])] for _ in range(self.epochs)])
        lr = self.tf.constant(self.lr, self.tf.float32)
        loss_sum = correct = 0.0
        for s in range(0, order.shape[0], self.batch_size):
            idx = order[s:s + self.batch_size]
            x = collections.OrderedDict((k, v[idx]) for k, v in self.features.items())
            l, a = self._step(x, self.labels[idx], lr)
            loss_sum += float(l)
            correct += float(a)
        return self.flat(self.vars) - global_flat, loss_sum, correct, int(order.shape[0])


@dataclasses.dataclass
class Aggregate:
    total: Optional[np.ndarray]     # the decoded noisy sum, None when the round aborted
    bytes_per_client: float
    aborted: Optional[str] = None
    critical_path_seconds: Optional[float] = None   # clients in parallel (encoding + protocol) + server


def secure_sum(updates: Mapping[int, np.ndarray], dropped, dim: int, cfg, floor: int, clients) -> Aggregate:
    """SecAgg+ over the cohort ``updates`` ({protocol id: update}); ``dropped`` go silent after ShareKeys.
    ``clients``: ``protocol.LocalClients`` / ``Identities`` or ``processes.ProcessClients``."""
    n = len(updates)
    if n < floor:
        return Aggregate(None, 0.0, f"{n} clients sampled, fewer than the {floor} the noise floor needs")
    noise = float(cfg.dp_noise_multiplier or 0.0)
    par = ddp.for_scale(dim, cfg.dp_clip, noise, floor, n)
    params = protocol_params(sorted(updates), par.dim_padded, par.bits, floor)
    inputs, slowest = {}, 0.0
    for i, u in updates.items():
        if i not in dropped:
            t = time.perf_counter()
            inputs[i] = ddp.encode(u, par, params.digest)
            slowest = max(slowest, time.perf_counter() - t)
    inputs.update({i: np.zeros(par.dim_padded, np.uint64) for i in dropped})   # never sent
    try:
        res = protocol.run_round(params, inputs, clients, drop={2: set(dropped)})
    except protocol.ProtocolAbort as e:
        return Aggregate(None, 0.0, str(e))
    t = time.perf_counter()
    total = ddp.decode(res.total, par, params.digest)
    return Aggregate(total, res.bytes_per_client, None,
                     slowest + res.critical_path_seconds + time.perf_counter() - t)


def central_sum(updates: Mapping[int, np.ndarray], dropped, dim: int, cfg) -> Aggregate:
    """DP-FedAvg's aggregator: the plaintext sum of clipped updates plus N(0, (z C)^2) per coordinate."""
    total = np.zeros(dim)
    for i, u in updates.items():
        if i not in dropped:
            total += ddp.clip_l2(u, cfg.dp_clip)
    z = float(cfg.dp_noise_multiplier or 0.0)
    rng = np.random.default_rng(secrets.randbits(128))
    return Aggregate(total + rng.normal(0.0, z * cfg.dp_clip, dim), 4.0 * dim)


def run_secure(train_features, train_labels, eval_features, eval_labels, build_model: Callable[[], Any], cfg, *,
               output_dir: Optional[str] = None, log: Callable[[str], None] = print, on_round=None,
               shards: Optional[List[np.ndarray]] = None, progress: Optional[Dict[str, int]] = None,
               aggregation: str = "secagg"):
    from federated import engine
    from federated import partition as partition_lib

    check_config(cfg)
    progress = progress if progress is not None else {}
    progress.setdefault("rounds_started", 0)
    if not 0.0 <= cfg.dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {cfg.dropout_rate}")
    features = engine._as_model_dtypes(train_features)
    labels = np.asarray(train_labels, np.float32).reshape(-1)
    spec = partition_lib.PartitionSpec.parse(cfg.partition)
    if shards is None:
        shards = partition_lib.make_shards(spec, features, labels, cfg.clients, cfg.seed)
    n_clients, m = len(shards), cfg.clients_per_round
    if not 1 <= m <= n_clients:
        raise ValueError(f"clients_per_round must be in 1..{n_clients} (the number of clients), got {m}")
    private = cfg.dp_noise_multiplier is not None
    floor = min_clients(m, cfg.dropout_rate, cfg.sampling)
    rng = np.random.default_rng(secrets.randbits(128)) if private else np.random.default_rng([cfg.seed, 2])
    t0 = time.perf_counter()
    local = LocalTrainer(build_model, features, labels.reshape(-1, 1), shards, cfg.client_batch_size,
                         cfg.local_epochs, cfg.client_lr)
    keras_model = build_model()
    global_flat = local.flat(keras_model.trainable_variables)
    # the clients' long-term keys (the PKI), protocol id = client index + 1; in client processes with
    # --worker-processes N (the keys never leave them)
    if cfg.worker_processes:
        from federated.secagg.processes import ProcessClients

        clients = ProcessClients(range(1, n_clients + 1), cfg.worker_processes, policy(floor))
    else:
        clients = protocol.LocalClients(protocol.Identities.generate(range(1, n_clients + 1)), policy(floor))
    build_s = time.perf_counter() - t0
    try:
        return _rounds(cfg, local, keras_model, global_flat, clients, build_s, shards, labels, spec, floor, rng,
                       eval_features, eval_labels, output_dir, log, on_round, progress, aggregation)
    finally:
        if hasattr(clients, "close"):
            clients.close()


def _rounds(cfg, local, keras_model, global_flat, clients, build_s, shards, labels, spec, floor, rng,
            eval_features, eval_labels, output_dir, log, on_round, progress, aggregation):
    import tensorflow as tf

    from federated import engine
    from federated import partition as partition_lib

    n_clients, m = len(shards), cfg.clients_per_round
    eval_model = None
    if eval_features is not None and eval_labels is not None and cfg.eval_every > 0:
        eval_model = keras_model
        eval_model.compile(loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                           metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
        eval_x = engine._as_model_dtypes(eval_features)
        eval_y = np.asarray(eval_labels, np.float32).reshape(-1, 1)
    q = m / n_clients
    log(f"[federated] {'secure aggregation (SecAgg+, distributed discrete Gaussian)' if aggregation == 'secagg' else 'central DP aggregate'}: "
        f"{cfg.rounds} rounds, {m} of {n_clients} clients per round ({cfg.sampling}), noise floor {floor} clients")
    history: List[Dict[str, Any]] = []
    for rnd in range(1, cfg.rounds + 1):
        t_round = time.perf_counter()
        progress["round"] = rnd
        from federated.engine import sample_round

        sampled, dropped_arr = sample_round(rng, cfg, n_clients, q, m)
        n_drop = int(len(dropped_arr))
        dropped_c = set(dropped_arr.tolist())
        round_seed = int(rng.integers(0, 2 ** 31 - 1))
        ids = {int(c): int(c) + 1 for c in sampled}   # protocol id = client index + 1
        updates, loss_sum, correct, examples = {}, 0.0, 0.0, 0
        t_train = time.perf_counter()
        for c, i in ids.items():
            if c in dropped_c:
                updates[i] = np.zeros(local.dim)
                continue
            delta, l, a, e = local.train(c, global_flat, round_seed)
            updates[i] = delta
            loss_sum, correct, examples = loss_sum + l, correct + a, examples + e
        train_s = time.perf_counter() - t_train
        dropped = {ids[c] for c in dropped_c}
        progress["rounds_started"] += 1
        t_agg = time.perf_counter()
        agg = (secure_sum(updates, dropped, local.dim, cfg, floor, clients) if aggregation == "secagg"
               else central_sum(updates, dropped, local.dim, cfg))
        agg_s = time.perf_counter() - t_agg
        if agg.total is not None:
            global_flat = global_flat + cfg.server_lr * agg.total / m
        rec: Dict[str, Any] = {"round": rnd, "sampled": int(len(sampled)), "dropped": n_drop,
                               "participants": int(len(sampled) - n_drop), "examples": examples,
                               "train_loss": loss_sum / examples if examples else None,
                               "train_accuracy": correct / examples if examples else None,
                               "aborted": agg.aborted, "client_train_seconds": train_s,
                               "aggregation_seconds": agg_s, "bytes_per_client": agg.bytes_per_client,
                               "aggregation_critical_path_seconds": agg.critical_path_seconds}
        rec["round_seconds"] = time.perf_counter() - t_round
        if eval_model is not None and (rnd % cfg.eval_every == 0 or rnd == cfg.rounds):
            local.assign(keras_model.trainable_variables, global_flat)
            loss, acc = eval_model.evaluate(eval_x, eval_y, batch_size=2048, verbose=0)
            rec["eval_loss"], rec["eval_accuracy"] = float(loss), float(acc)
        history.append(rec)
        log(f"[federated] round {rnd}/{cfg.rounds} done" + (", aborted (nothing released)" if agg.aborted else "")
            + (f", eval acc {rec['eval_accuracy']:.4f}" if "eval_accuracy" in rec else ""))
        if on_round is not None:
            on_round(rec)
    local.assign(keras_model.trainable_variables, global_flat)
    final = {"rounds": cfg.rounds, "clients": n_clients, "clients_per_round": m, "build_seconds": build_s,
             "aggregation": aggregation, "noise_floor_clients": floor,
             "aborted_rounds": sum(1 for h in history if h["aborted"])}
    evals = [h for h in history if "eval_accuracy" in h]
    if evals:
        final["eval_accuracy"], final["eval_loss"] = evals[-1]["eval_accuracy"], evals[-1]["eval_loss"]
    for k in ("round_seconds", "aggregation_seconds", "client_train_seconds", "bytes_per_client"):
        final[f"mean_{k}"] = float(np.mean([h[k] for h in history])) if history else None
    result = engine.FederatedResult(history=history, shards=partition_lib.shard_summary(shards, labels),
                                    model=keras_model, final=final, output_dir=output_dir)
    if output_dir:
        strategy = {"strategy": "dp-fedavg, secure aggregation" if aggregation == "secagg" else "dp-fedavg (central)",
                    "noise_multiplier": cfg.dp_noise_multiplier, "clip": cfg.dp_clip, "noise_floor_clients": floor}
        result.files = engine.write_outputs(output_dir, result, dataclasses.asdict(cfg), strategy, str(spec))
    return result
