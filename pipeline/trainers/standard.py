"""Non-private training: Keras fit inside a tf.distribute strategy over every visible GPU (CPU otherwise), or
over several worker processes with MultiWorkerMirroredStrategy (``cluster`` / ``train_workers`` arguments;
pipeline.trainers.multiworker)."""
from __future__ import annotations

import tensorflow as tf

import dp_accounting

from dp_training.contract import PlanInputs, TrainerContext, TrainingOutcome, TrainingPlan


# Uses the CLI's shared --epochs (default 5), --batch-size (256) and --learning-rate (Adam, 1e-3).
def trainer_args(namespace) -> dict:
    return {k: v for k, v in {"epochs": getattr(namespace, "epochs", None),
                              "batch_size": getattr(namespace, "batch_size", None),
                              "learning_rate": getattr(namespace, "learning_rate", None)}.items() if v is not None}


def distribution_strategy() -> tf.distribute.Strategy:
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    if gpus:
        return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def is_private(args) -> bool:
    return False


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


def _settings(args):
    epochs = int(round(float(args.get("epochs", 5))))
    batch_size = int(args.get("batch_size", 256))
    learning_rate = float(args.get("learning_rate", 1e-3))
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError(f"standard trainer: epochs ({epochs}) and batch size ({batch_size}) must be >= 1 "
                         f"and the learning rate ({learning_rate}) > 0")
    return epochs, batch_size, learning_rate


class StandardTrainer:
    name = "standard"

    def plan(self, inputs: PlanInputs) -> TrainingPlan:
        epochs, batch_size, learning_rate = _settings(inputs.args)
        cluster_of(inputs.args)  # a bad cluster is refused before anything runs
        return TrainingPlan(event=dp_accounting.NonPrivateDpEvent(), private=False,
                            mechanism="none (non-private Keras fit)",
                            public={"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                                    "optimizer": "Adam"})

    def train(self, context: TrainerContext) -> TrainingOutcome:
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
                            callbacks=[_EpochLog(context.log, epochs)])
        return TrainingOutcome(
            model=model, released_event=dp_accounting.NonPrivateDpEvent(),
            public_details={"strategy": strategy.__class__.__name__, "replicas": strategy.num_replicas_in_sync},
            private_details={"final_train_loss": float(history.history["loss"][-1]),
                             "final_eval_accuracy": float(history.history["val_accuracy"][-1])})


def _train_multiworker(context: TrainerContext, cluster, epochs: int, batch_size: int,
                       learning_rate: float) -> TrainingOutcome:
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


class _EpochLog(tf.keras.callbacks.Callback):
    def __init__(self, log, epochs):
        super().__init__()
        self._log, self._epochs = log, epochs

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self._log(f"  epoch {epoch + 1}/{self._epochs}: loss {logs.get('loss', float('nan')):.4f} "
                  f"accuracy {logs.get('accuracy', float('nan')):.4f} "
                  f"eval accuracy {logs.get('val_accuracy', float('nan')):.4f}")
