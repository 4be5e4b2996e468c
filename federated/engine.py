"""The federated round loop shared by ``federated.simulate`` and the ``federated`` trainer kind.

Privacy: this module runs the rounds the kind planned; it never accounts. Everything it records (per-round
sampled/participant/example counts, client losses, shard sizes and label rates, timings) is computed from the
private rows WITHOUT differential privacy: it goes to the run's private scratch directory and the kind's
private details, never into public outputs. The only release covered by the guarantee is the model (the
noisy aggregates of DP-FedAvg).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import hashlib
import json
import secrets
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np

from federated import dp_noise, partition as partition_lib
from federated.strategies import DPFedAvg, FedAvg


@dataclasses.dataclass
class FederatedConfig:
    """Everything that shapes a federated run (independent of where the data comes from)."""

    clients: int = 100
    clients_per_round: int = 10
    rounds: int = 10
    local_epochs: int = 1
    client_batch_size: int = 32
    partition: str = "hash"  # hash | hash-dirichlet:ALPHA | hash:NAME | column:NAME | iid | dirichlet:ALPHA
    client_optimizer: str = "sgd"
    server_optimizer: str = "sgd"
    client_lr: float = 0.05
    server_lr: float = 1.0
    dp_noise_multiplier: Optional[float] = None  # None -> weighted FedAvg; >= 0 -> DP-FedAvg's aggregator
    dp_clip: float = 1.0
    adaptive_clipping: bool = False
    sampling: str = "poisson"  # poisson: each client joins w.p. clients_per_round/clients; fixed: exactly m
    dropout_rate: float = 0.0  # fraction of sampled clients that fail each round
    eval_every: int = 1
    checkpoint_every: int = 0  # 0 -> no checkpoints
    resume: bool = True
    seed: int = 0
    max_concurrent_computation_calls: int = 0  # 0: 2 x cores; -1: unlimited (TFF default)
    plot: bool = True
    client_loop: str = "iterator"  # iterator (fast here) | reduce (TFF default)
    workers: Optional[str] = None  # "HOST:PORT,..." TFF workers to spread each round's clients over
    worker_processes: int = 0  # start this many local TFF workers for the run (and stop them afterwards)
    noise_cohort_size: Optional[int] = None  # simulation setting: noise calibrated for this cohort (trainer plans it)
    noise_population: Optional[int] = None  # ... drawn from this population (default: clients)
    secure_aggregation: bool = False  # SecAgg+ with distributed DP (federated/secagg): the server sees only sums

    def strategy(self, clients_per_round: Optional[float] = None) -> FedAvg:
        common = dict(client_optimizer=self.client_optimizer, server_optimizer=self.server_optimizer,
                      client_lr=self.client_lr, server_lr=self.server_lr, client_loop=self.client_loop)
        if self.dp_noise_multiplier is None:
            return FedAvg(**common)
        return DPFedAvg(**common, noise_multiplier=float(self.dp_noise_multiplier), clip=self.dp_clip,
                        adaptive_clipping=self.adaptive_clipping,
                        clients_per_round=float(clients_per_round or self.clients_per_round))


@dataclasses.dataclass
class FederatedResult:
    """``history``, ``shards`` and ``final`` are PRIVATE (computed from the rows without DP); ``privacy`` is the
    run's guarantee (``Guarantee.to_json()``, set by ``simulate``), the one public statement."""

    history: List[Dict[str, Any]]
    shards: Dict[str, Any]
    model: Any  # Keras model with the final global weights
    final: Dict[str, Any]
    output_dir: Optional[str] = None
    resumed_from_round: int = 0
    files: Dict[str, str] = dataclasses.field(default_factory=dict)
    privacy: Optional[Dict[str, Any]] = None
    guarantee: Any = None


PRIVATE_NOTICE = ("PRIVATE: per-round and per-client figures (sampled/participant/example counts, client losses, "
                  "shard sizes, label rates, timings) computed from the training rows WITHOUT differential "
                  "privacy; NOT covered by the run's guarantee (privacy.json). Keep inside the trust boundary.")


# ----------------------------------------------------------------------------------------- helpers
def _fingerprint(shards) -> str:
    h = hashlib.sha256()
    for s in shards:
        h.update(np.asarray(s, np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _element_spec(features: Mapping[str, np.ndarray]):
    import tensorflow as tf

    x = collections.OrderedDict((k, tf.TensorSpec([None] + list(v.shape[1:]), tf.as_dtype(v.dtype)))
                                for k, v in features.items())
    return (x, tf.TensorSpec([None, 1], tf.float32))


def _as_model_dtypes(features: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """float64 -> float32, small ints -> int64; keys sorted in an OrderedDict (TFF needs that)."""
    out = collections.OrderedDict()
    for k in sorted(features):
        v = features[k]
        v = np.asarray(v)
        if v.dtype == np.float64:
            v = v.astype(np.float32)
        elif v.dtype in (np.int32, np.int16, np.int8, np.uint8):
            v = v.astype(np.int64)
        out[k] = v
    return out


class ClientDatasets:
    """Per-client tf.data pipelines, built lazily for each round's sampled cohort only (a population of 10,000+
    clients never has 10,000 datasets alive), shuffled with a per-round seed inside the graph."""

    def __init__(self, features, labels, shards, batch_size: int, local_epochs: int):
        self.features = features
        self.labels = np.asarray(labels, np.float32).reshape(-1, 1)
        self.shards = shards
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.built = 0  # datasets built so far (tests check the loading is per cohort)

    def client(self, c: int, round_seed: int):
        """Client ``c``'s rows, a fresh permutation per local epoch (seeded by the round's seed and ``c``), in
        batches that may span epochs (as shuffle -> repeat -> batch). The permutation is drawn in numpy: one
        tf.data op per client instead of four (building the datasets was a third of a 100-client round)."""
        import tensorflow as tf

        s = self.shards[c]
        rng = np.random.default_rng([int(round_seed), int(c)])
        order = np.concatenate([s[rng.permutation(s.shape[0])] for _ in range(self.local_epochs)])
        x = collections.OrderedDict((k, v[order]) for k, v in self.features.items())
        self.built += 1
        return tf.data.Dataset.from_tensor_slices((x, self.labels[order])).batch(self.batch_size)

    def for_round(self, client_ids, round_seed: int):
        return [self.client(int(c), round_seed) for c in client_ids]


def _write_csv(path: str, history: List[Dict[str, Any]]) -> None:
    keys: List[str] = []
    for rec in history:
        keys += [k for k in rec if k not in keys and not isinstance(rec[k], (list, dict))]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for rec in history:
            w.writerow(rec)


def plot_history(path: str, history: List[Dict[str, Any]], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [h["round"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(r, [h.get("train_accuracy", np.nan) for h in history], label="train accuracy (clients)")
    ev = [(h["round"], h["eval_accuracy"]) for h in history if h.get("eval_accuracy") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    ax.legend(lines, labels, loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ checkpoints
def _ckpt_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def sample_round(rng: np.random.Generator, cfg, n_clients: int, q: float, m: int):
    """One round's cohort and its simulated dropouts, as the accounted event samples them: Poisson (each client
    with probability ``q``) or exactly ``m`` of ``n_clients`` without replacement; then ``dropout_rate`` of the
    cohort drop. The one place a round is sampled (plain and secure-aggregation rounds). Returns (sampled,
    dropped), both sorted int arrays of client indices."""
    if cfg.sampling == "poisson":
        sampled = np.flatnonzero(rng.random(n_clients) < q)
    else:
        sampled = np.sort(rng.choice(n_clients, size=m, replace=False))
    n_drop = int(round(cfg.dropout_rate * len(sampled)))
    dropped = rng.choice(sampled, size=n_drop, replace=False) if n_drop else np.zeros(0, np.int64)
    return sampled, dropped


def save_checkpoint(output_dir: str, round_num: int, state, rng: Optional[np.random.Generator],
                    history: List[Dict[str, Any]], fingerprint: str, config: Dict[str, Any]) -> str:
    """``rng``: the sampling generator of a non-private run (restored on resume: reproducible); None for a DP
    run, whose sampling state is secret and never stored (a resumed run draws afresh)."""
    import tensorflow as tf
    from federated.dp_noise import without_noise_keys

    state = without_noise_keys(state)  # the aggregator already zeroes its key after use; never store one

    d = _ckpt_dir(output_dir)
    os.makedirs(d, exist_ok=True)
    leaves = tf.nest.flatten(state)
    arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    base = os.path.join(d, f"round_{round_num:05d}")
    np.savez(base + ".npz.tmp.npz", **arrays)
    meta = {"round": round_num, "num_leaves": len(leaves), "history": history, "shards_fingerprint": fingerprint,
            "config": config}
    if rng is not None:
        meta["rng_state"] = rng.bit_generator.state
    with open(base + ".json.tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, default=_json_default)
    os.replace(base + ".npz.tmp.npz", base + ".npz")
    os.replace(base + ".json.tmp", base + ".json")  # the .json marks a complete checkpoint
    return base


def latest_checkpoint(output_dir: Optional[str]) -> Optional[str]:
    if not output_dir:
        return None
    metas = sorted(glob.glob(os.path.join(_ckpt_dir(output_dir), "round_*.json")))
    for m in reversed(metas):
        if os.path.isfile(m[:-5] + ".npz"):
            return m[:-5]
    return None


def load_checkpoint(base: str, template_state):
    import tensorflow as tf

    with open(base + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    with np.load(base + ".npz") as z:
        leaves = [z[f"leaf_{i:05d}"] for i in range(meta["num_leaves"])]
    tmpl = tf.nest.flatten(template_state)
    if len(tmpl) != len(leaves):
        raise ValueError(f"checkpoint {base} has {len(leaves)} state leaves, the process expects {len(tmpl)} "
                         "(different model or strategy?)")
    leaves = [np.asarray(v, dtype=np.asarray(t).dtype).reshape(np.shape(t)) for v, t in zip(leaves, tmpl)]
    return tf.nest.pack_sequence_as(template_state, leaves), meta


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _finite(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------- main loop
def run_federated(train_features: Mapping[str, np.ndarray], train_labels: np.ndarray,
                  eval_features: Optional[Mapping[str, np.ndarray]], eval_labels: Optional[np.ndarray],
                  build_model: Callable[[], Any], config: FederatedConfig, *,
                  output_dir: Optional[str] = None, log: Callable[[str], None] = print,
                  on_round: Optional[Callable[[Dict[str, Any]], None]] = None,
                  shards: Optional[List[np.ndarray]] = None, model_key: Optional[tuple] = None,
                  progress: Optional[Dict[str, int]] = None) -> FederatedResult:
    """Runs ``config.rounds`` federated rounds in a TFF runtime whose worker is always stopped.

    ``shards``: one index array per client (``len(shards)`` is the client population K; empty shards are
    clients without rows). ``progress["rounds_started"]`` counts the rounds this call started (a round counts
    before its aggregate is computed, so a failure never under-counts what was released);
    ``progress["resumed_from_round"]`` is set when a checkpoint was loaded."""
    from federated.runtime import tff_runtime
    from federated.workers import find_lost_worker, parse_addresses

    progress = progress if progress is not None else {}
    progress.setdefault("rounds_started", 0)
    if config.secure_aggregation:   # its own round loop: clients encode and mask, the server only sums
        from federated.secagg.rounds import run_secure

        return run_secure(train_features, train_labels, eval_features, eval_labels, build_model, config,
                          output_dir=output_dir, log=log, on_round=on_round, shards=shards, progress=progress)
    addresses = parse_addresses(config.workers)
    if config.worker_processes < 0:
        raise ValueError(f"worker_processes must be >= 0, got {config.worker_processes}")
    try:
        with tff_runtime(config.max_concurrent_computation_calls, workers=addresses,
                         worker_processes=config.worker_processes):
            if addresses or config.worker_processes:
                log(f"[federated] clients split across {len(addresses) + config.worker_processes} TFF worker(s)"
                    + (f": {', '.join(addresses)}" if addresses else "")
                    + (f" + {config.worker_processes} local" if config.worker_processes and addresses else
                       " (local processes)" if config.worker_processes else ""))
            return _run(train_features, train_labels, eval_features, eval_labels, build_model, config,
                        output_dir, log, on_round, shards, model_key, progress)
    except Exception as exc:  # noqa: BLE001 - a lost worker is re-raised with where the run stands
        lost = find_lost_worker(exc)
        if lost is None:
            raise
        raise RunStopped(lost, progress.get("round"), latest_checkpoint(output_dir)) from None


class RunStopped(RuntimeError):
    """The run stopped because a TFF worker was lost; its last checkpoint (if any) is intact."""

    def __init__(self, lost, round_num: Optional[int], checkpoint: Optional[str]):
        where = f"in round {round_num}" if round_num else "before the first round"
        if checkpoint:
            state = (f"its last checkpoint ({os.path.basename(checkpoint)}, {checkpoint}.npz) is intact: restart the "
                     "worker and run the same command again to resume from it")
        else:
            state = ("no checkpoint was written (pass --checkpoint-every N to resume after a lost worker); restart "
                     "the worker and run the command again")
        super().__init__(f"{lost} {where}; the run stopped, {state}")
        self.address = lost.address
        self.round = round_num
        self.checkpoint = checkpoint


# Settings a resumed run may change (they do not change what the model embodies).
_RESUMABLE_CHANGES = ("rounds", "eval_every", "checkpoint_every", "resume", "plot", "max_concurrent_computation_calls",
                      "workers", "worker_processes")

# Built learning processes, reused by later runs in the same Python process when the caller names its
# model with a hashable ``model_key`` (simulate() does): tracing/compiling costs 5-15 s per build.
_PROCESS_CACHE: Dict[Any, Any] = {}


def _run(train_features, train_labels, eval_features, eval_labels, build_model, config, output_dir, log,
         on_round, shards, model_key, progress):
    import tensorflow as tf
    import tensorflow_federated as tff

    cfg = config
    if not 0.0 <= cfg.dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {cfg.dropout_rate}")
    if cfg.sampling not in ("poisson", "fixed"):
        raise ValueError(f"sampling must be poisson or fixed, got {cfg.sampling!r}")
    features = _as_model_dtypes(train_features)
    labels = np.asarray(train_labels, np.float32).reshape(-1)
    spec = partition_lib.PartitionSpec.parse(cfg.partition)
    if shards is None:
        shards = partition_lib.make_shards(spec, features, labels, cfg.clients, cfg.seed)
    n_clients = len(shards)
    if not 1 <= cfg.clients_per_round <= n_clients:
        raise ValueError(f"clients_per_round must be in 1..{n_clients} (the number of clients), got "
                         f"{cfg.clients_per_round}")
    m = cfg.clients_per_round
    summary = partition_lib.shard_summary(shards, labels)
    log(f"[federated] partition {spec}: {n_clients} clients")
    fingerprint = _fingerprint(shards)
    strategy = cfg.strategy(clients_per_round=m)
    dp = isinstance(strategy, DPFedAvg)

    element_spec = _element_spec(features)

    def model_fn():
        return tff.learning.models.from_keras_model(
            build_model(), loss=tf.keras.losses.BinaryCrossentropy(from_logits=True), input_spec=element_spec,
            metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0.0)])

    t0 = time.perf_counter()
    cache_key = None
    if model_key is not None:
        cache_key = (model_key, repr(strategy), repr(element_spec))
    process = _PROCESS_CACHE.get(cache_key) if cache_key else None
    if process is None:
        process = strategy.build_process(model_fn)
        if cache_key:
            _PROCESS_CACHE.clear()  # keep one: they hold graphs
            _PROCESS_CACHE[cache_key] = process
    state = process.initialize()
    # deterministic initial weights: the model builder's initializers are seeded. No global TF seed is needed (the
    # DP aggregator's noise never comes from TensorFlow's samplers: federated.dp_noise).
    keras_model = build_model()
    state = process.set_model_weights(state, tff.learning.models.ModelWeights.from_model(keras_model))
    build_s = time.perf_counter() - t0

    eval_model = None
    if eval_features is not None and eval_labels is not None and cfg.eval_every > 0:
        eval_model = keras_model
        eval_model.compile(loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                           metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
        eval_x = _as_model_dtypes(eval_features)
        eval_y = np.asarray(eval_labels, np.float32).reshape(-1, 1)

    # Which clients a round samples must stay secret and fresh for the amplification the accounting assumes: a
    # private run draws it from OS entropy (the public seed only keys the partition), also when it resumes: its
    # checkpoints hold no sampling state, so the rounds after a checkpoint never re-use the clients of the
    # rounds an earlier (crashed) run released after it. Non-private runs stay reproducible from the seed.
    rng = (np.random.default_rng(secrets.randbits(128)) if dp else np.random.default_rng([cfg.seed, 2]))
    history: List[Dict[str, Any]] = []
    start = 0
    cfg_dict = dataclasses.asdict(cfg)
    ckpt = latest_checkpoint(output_dir) if cfg.resume else None
    if ckpt:
        with open(ckpt + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        if meta["shards_fingerprint"] != fingerprint:
            raise ValueError(f"checkpoint {ckpt} was written for other client shards; use a fresh --output "
                             "or the same data/partition/seed")
        changed = sorted(k for k in cfg_dict if k not in _RESUMABLE_CHANGES
                         and json.dumps(meta["config"].get(k), default=str) != json.dumps(cfg_dict[k], default=str))
        if changed:
            raise ValueError(f"checkpoint {ckpt} was written with other settings ({', '.join(changed)}); the "
                             "resumed model would embody rounds of another run: use a fresh --output or --no-resume")
        if int(meta["round"]) > cfg.rounds:
            raise ValueError(f"checkpoint {ckpt} is at round {meta['round']}, past the {cfg.rounds} rounds of this "
                             "run; use a fresh --output or --no-resume")
        state, meta = load_checkpoint(ckpt, state)
        if not dp:
            rng.bit_generator.state = meta["rng_state"]
        history = meta["history"]
        start = int(meta["round"])
        progress["resumed_from_round"] = start
        log(f"[federated] resumed from checkpoint {ckpt} (round {start})")
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    if dp and not dp_noise.count_noise_keys(state):
        raise RuntimeError("the DP aggregator has no noise key in its state: DP-FedAvg must use federated.dp_noise's "
                           "queries (its noise is keyed per round from OS entropy)")

    data = ClientDatasets(features, labels, shards, cfg.client_batch_size, cfg.local_epochs)
    q = m / n_clients
    log(f"[federated] {strategy.name}: {cfg.rounds} rounds, {m} of {n_clients} clients per round "
        f"({cfg.sampling} sampling, q={q:.4f}), {cfg.local_epochs} local epoch(s), batch {cfg.client_batch_size}, "
        f"dropout {cfg.dropout_rate:g}")
    last_eval = None
    for rnd in range(start + 1, cfg.rounds + 1):
        t_round = time.perf_counter()
        progress["round"] = rnd
        sampled, dropped = sample_round(rng, cfg, n_clients, q, m)
        n_drop = int(len(dropped))
        survivors = np.setdiff1d(sampled, dropped)
        # clients without rows contribute nothing (for DP-FedAvg exactly what an absent client contributes:
        # a zero term in the clipped sum, whose denominator is the public clients_per_round)
        active = np.asarray([c for c in survivors if shards[c].shape[0] > 0], np.int64)
        round_seed = int(rng.integers(0, 2**31 - 1))
        rec: Dict[str, Any] = {"round": rnd, "sampled": int(len(sampled)), "dropped": int(n_drop),
                               "participants": int(len(active)),
                               "examples": int(sum(shards[c].shape[0] for c in active))}
        if len(active) or dp:
            # DP-FedAvg runs every round, also with nobody left (a noise-only update): skipping it would
            # reveal that every sampled client was empty, which depends on the data.
            progress["rounds_started"] += 1
            # DP: a fresh key block (OS entropy) for this round's noise, handed straight to TFF and never kept;
            # the aggregator returns its state with the key zeroed.
            out = process.next(dp_noise.with_fresh_noise_keys(state) if dp else state,
                               data.for_round(active, round_seed))
            state = out.state
            train = out.metrics["client_work"]["train"]
            rec["train_loss"] = _finite(train.get("loss")) if len(active) else None
            rec["train_accuracy"] = _finite(train.get("binary_accuracy")) if len(active) else None
        else:  # non-private FedAvg with nobody left: the global model stays
            progress["rounds_started"] += 1
            rec["train_loss"] = rec["train_accuracy"] = None
        rec["round_seconds"] = time.perf_counter() - t_round
        if eval_model is not None and (rnd % cfg.eval_every == 0 or rnd == cfg.rounds):
            process.get_model_weights(state).assign_weights_to(eval_model)
            loss, acc = eval_model.evaluate(eval_x, eval_y, batch_size=2048, verbose=0)
            rec["eval_loss"], rec["eval_accuracy"] = float(loss), float(acc)
            last_eval = rec
        history.append(rec)
        # Only public facts on the terminal: participant counts, training losses and timings depend on the private
        # rows (they stay in the private per-round metrics). Eval accuracy is on the eval split (see privacy_model).
        msg = f"[federated] round {rnd}/{cfg.rounds} done"
        if "eval_accuracy" in rec:
            msg += f", eval acc {rec['eval_accuracy']:.4f}"
        log(msg)
        if on_round is not None:
            on_round(rec)
        if output_dir and cfg.checkpoint_every > 0 and (rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds):
            save_checkpoint(output_dir, rnd, state, None if dp else rng, history, fingerprint, cfg_dict)

    process.get_model_weights(state).assign_weights_to(keras_model)
    rounds_run = max(cfg.rounds, start)
    final = {"rounds": rounds_run, "clients": n_clients, "clients_per_round": m, "build_seconds": build_s}
    if history:
        final.update({k: history[-1].get(k) for k in ("train_loss", "train_accuracy")})
    if last_eval is not None or (history and "eval_accuracy" in history[-1]):
        last = history[-1] if "eval_accuracy" in history[-1] else last_eval
        final["eval_accuracy"], final["eval_loss"] = last["eval_accuracy"], last["eval_loss"]
    final["client_datasets_built"] = data.built
    secs = [h["round_seconds"] for h in history if h.get("participants")]
    final["mean_round_seconds"] = float(np.mean(secs)) if secs else None
    result = FederatedResult(history=history, shards=summary, model=keras_model, final=final,
                             output_dir=output_dir, resumed_from_round=start)
    if output_dir:
        result.files = write_outputs(output_dir, result, cfg_dict, strategy.describe(), str(spec))
    return result


def write_outputs(output_dir: str, result: FederatedResult, config: Dict[str, Any], strategy: Dict[str, Any],
                  partition: str) -> Dict[str, str]:
    files = {"csv": os.path.join(output_dir, "metrics.csv"), "json": os.path.join(output_dir, "metrics.json")}
    _write_csv(files["csv"], result.history)
    with open(files["json"], "w", encoding="utf-8") as f:
        json.dump({"privacy_status": PRIVATE_NOTICE, "config": config, "strategy": strategy, "partition": partition,
                   "shards": result.shards, "final": result.final, "resumed_from_round": result.resumed_from_round,
                   "history": result.history}, f, indent=1, default=_json_default)
    if config.get("plot", True) and result.history:
        files["plot"] = os.path.join(output_dir, "accuracy.png")
        plot_history(files["plot"], result.history, f"{strategy['strategy']} / {partition}")
    return files
