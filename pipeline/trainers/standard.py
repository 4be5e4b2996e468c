"""Non-private training: Keras fit inside a tf.distribute strategy over every visible GPU (CPU otherwise), or
over several worker processes with MultiWorkerMirroredStrategy (``cluster`` / ``train_workers`` arguments;
pipeline.trainers.multiworker). TensorFlow is imported where a model is trained, not at import: the command line
builds its parser from this module (``privtrain run --help`` and an identical re-run never load TensorFlow)."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional

import dp_accounting

from dp_training.contract import (ArgumentError, KindConfig, PlanInputs, TrainerContext, TrainerKind, TrainingOutcome,
                                  TrainingPlan, parse_number, parse_whole)


# Uses the CLI's shared --epochs (default 5), --batch-size (256) and --learning-rate (Adam, 1e-3).
def trainer_args(namespace) -> dict:
    return {k: v for k, v in {"epochs": getattr(namespace, "epochs", None),
                              "batch_size": getattr(namespace, "batch_size", None),
                              "learning_rate": getattr(namespace, "learning_rate", None)}.items() if v is not None}


def distribution_strategy():
    """The tf.distribute strategy over every visible GPU (one: OneDeviceStrategy), else the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    if gpus:
        return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def cluster_of(args):
    """The multi-worker cluster of the run's arguments (None: one process). ``cluster``: a TF_CONFIG cluster;
    ``train_workers``: N local workers on free ports (chosen when training starts)."""
    from pipeline.trainers import multiworker

    if args.get("cluster"):
        return multiworker.cluster_from_tf_config({"cluster": args["cluster"]}, "--tf-config")
    workers = args.get("train_workers")
    if workers is not None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"--train-workers {workers!r}: the number of local training workers must be >= 1")
        return multiworker.local_cluster(workers) if workers > 1 else None
    return None


@dataclasses.dataclass(frozen=True)
class StandardConfig(KindConfig):
    """The standard (non-private) trainer's arguments, typed: Adam, ``epochs`` (a number, rounded to whole
    epochs), ``batch_size``, ``learning_rate``; ``cluster`` / ``train_workers`` for multi-worker training."""

    kind: ClassVar[str] = "standard"
    epochs: float = 5
    batch_size: int = 256
    learning_rate: float = 1e-3
    cluster: Optional[Mapping[str, Any]] = None
    train_workers: Optional[int] = None

    def __post_init__(self):
        epochs = int(round(parse_number(self.kind, "epochs", self.epochs)))
        if epochs < 1:
            raise ArgumentError(f"standard trainer: epochs ({self.epochs}) must be >= 1")
        self._set("epochs", epochs)
        self._set("batch_size", parse_whole(self.kind, "batch_size", self.batch_size, minimum=1))
        self._set("learning_rate", parse_number(self.kind, "learning_rate", self.learning_rate, above=0.0))
        if self.cluster is not None and not isinstance(self.cluster, Mapping):
            raise ArgumentError(f"standard trainer argument cluster must be a TF_CONFIG cluster mapping, got "
                                f"{self.cluster!r}")
        if self.train_workers is not None:
            self._set("train_workers", parse_whole(self.kind, "train_workers", self.train_workers, minimum=1))

    @property
    def private(self) -> bool:
        return False


def _settings(args):
    c = StandardConfig.parse(args)
    return c.epochs, c.batch_size, c.learning_rate


class StandardTrainer(TrainerKind):
    name = "standard"
    Config = StandardConfig
    study_hidden = ("cluster", "train_workers")

    def from_arguments(self, namespace) -> StandardConfig:
        return StandardConfig.parse(trainer_args(namespace))

    def plan(self, inputs: PlanInputs) -> TrainingPlan:
        config = StandardConfig.parse(inputs.config if inputs.config is not None else inputs.args)
        args = config.to_args()
        cluster_of(args)  # a bad cluster is refused before anything runs
        return TrainingPlan(event=dp_accounting.NonPrivateDpEvent(), private=config.private,
                            mechanism="none (non-private Keras fit)",
                            public={"epochs": config.epochs, "batch_size": config.batch_size,
                                    "learning_rate": config.learning_rate, "optimizer": "Adam"})

    def train(self, context: TrainerContext) -> TrainingOutcome:
        import tensorflow as tf

        epochs, batch_size, learning_rate = _settings(context.args)
        cluster = cluster_of(context.args)
        if cluster is not None:
            return _train_multiworker(context, cluster, epochs, batch_size, learning_rate)
        strategy = distribution_strategy()
        context.log(f"standard trainer: {strategy.__class__.__name__} over "
                    f"{strategy.num_replicas_in_sync} replica(s), {epochs} epochs, batch {batch_size}")
        with strategy.scope():
            model = context.build_model()
            model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate),
                          loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                          metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
        train = (tf.data.Dataset.from_tensor_slices((dict(context.train_features), context.train_labels))
                 .shuffle(context.num_train_rows, seed=0).batch(batch_size).prefetch(2))
        evaluation = tf.data.Dataset.from_tensor_slices(
            (dict(context.eval_features), context.eval_labels)).batch(1024)
        history = model.fit(train, epochs=epochs, validation_data=evaluation, verbose=0,
                            callbacks=[_epoch_log(context.log, epochs)])
        return TrainingOutcome(
            model=model, released_event=dp_accounting.NonPrivateDpEvent(),
            public_details={"strategy": strategy.__class__.__name__, "replicas": strategy.num_replicas_in_sync},
            private_details={"final_train_loss": float(history.history["loss"][-1]),
                             "final_eval_accuracy": float(history.history["val_accuracy"][-1])})


def _train_multiworker(context: TrainerContext, cluster, epochs: int, batch_size: int,
                       learning_rate: float) -> TrainingOutcome:
    import tensorflow as tf

    from pipeline.trainers import multiworker

    model, history = multiworker.train(context, cluster, epochs, batch_size, learning_rate)
    model.compile(loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
    evaluation = tf.data.Dataset.from_tensor_slices((dict(context.eval_features), context.eval_labels)).batch(1024)
    _, eval_accuracy = model.evaluate(evaluation, verbose=0)
    return TrainingOutcome(
        model=model, released_event=dp_accounting.NonPrivateDpEvent(),
        public_details={"strategy": "MultiWorkerMirroredStrategy", "replicas": int(history["replicas"]),
                        "workers": multiworker.num_tasks(cluster)},
        private_details={"final_train_loss": history["loss"][-1], "final_eval_accuracy": float(eval_accuracy)})


def _epoch_log(log, epochs):
    """A Keras callback logging one line per epoch (defined here so that importing this module loads no TF)."""
    import tensorflow as tf

    class _EpochLog(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            log(f"  epoch {epoch + 1}/{epochs}: loss {logs.get('loss', float('nan')):.4f} "
                f"accuracy {logs.get('accuracy', float('nan')):.4f} "
                f"eval accuracy {logs.get('val_accuracy', float('nan')):.4f}")

    return _EpochLog()
