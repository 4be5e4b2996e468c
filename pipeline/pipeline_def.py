"""The TFX pipeline: ExampleGen -> StatisticsGen -> SchemaGen (+ reference schema) -> ExampleValidator ->
Transform -> Trainer (pluggable kind) -> Resolver + Evaluator -> Pusher."""
from __future__ import annotations

import hashlib
import os
import shutil

import tensorflow_model_analysis as tfma
from tfx import v1 as tfx
from tfx.dsl.components.base import executor_spec
from tfx.components import FileBasedExampleGen
from tfx.proto import example_gen_pb2

from pipeline.beam_options import beam_pipeline_args
from pipeline.config import RunConfig, code_version
from core.dataset import DatasetSpec
from pipeline.image_codec import IMAGE_EXAMPLE_FORMAT
from pipeline.image_ingest import IdxExampleGenExecutor
from pipeline.ingest import DelimitedExampleGenExecutor, spec_to_custom_config
from pipeline.trainer_executor import PrivacyRecordingTrainerExecutor
from pipeline.validation import StrictExampleValidator, load_comparators, public_splits


def pipeline_name(spec: DatasetSpec, trainer: str) -> str:
    """One pipeline (and so one line of blessed models to compare against) per data set and trainer kind."""
    return f"{spec.name}-{trainer}"


def model_name(config: RunConfig, spec: DatasetSpec) -> str:
    return config.model_name or spec.name


def _content_addressed_copy(path: str, directory: str) -> str:
    """Copies a file under a name derived from its content, so that TFX's cache sees content changes."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, f"{digest}-{os.path.basename(path)}")
    if not os.path.exists(target):
        shutil.copyfile(path, target)
    return target


def blessing_threshold(lower_bound: float, max_drop: float) -> tfma.MetricThreshold:
    """The blessing gate: above ``lower_bound`` and not below the latest blessed model by more than ``max_drop``."""
    return tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": lower_bound}),
        change_threshold=tfma.GenericChangeThreshold(
            direction=tfma.MetricDirection.HIGHER_IS_BETTER, absolute={"value": -max_drop - 1e-10}))


def gated_eval_config(spec: DatasetSpec, gate: str, threshold: tfma.MetricThreshold,
                      extra=()) -> tfma.EvalConfig:
    """Overall and per-slice metrics (ExampleCount, the ``gate`` metric with its overall threshold, ``extra``)."""
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(signature_name="serving_default", label_key=spec.label_feature,
                                    prediction_key="probabilities")],
        slicing_specs=[tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[f]) for f in spec.slice_features],
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="ExampleCount"),
            tfma.MetricConfig(class_name=gate, per_slice_thresholds=[
                tfma.PerSliceMetricThreshold(slicing_specs=[tfma.SlicingSpec()], threshold=threshold)]),
            *[tfma.MetricConfig(class_name=name) for name in extra]])])


def eval_config(spec: DatasetSpec, config: RunConfig) -> tfma.EvalConfig:
    if spec.is_image:  # multi-class: accuracy overall and per class (pipeline/image_pipeline.py)
        from pipeline.image_pipeline import image_eval_config
        return image_eval_config(spec, config)
    # The blessing gate is the overall AUC: a per-slice floor lets a tiny slice (a handful of rows, no positives,
    # AUC undefined) veto a good model. Slice metrics are still computed and reported; MeanLabel (the share of
    # positives per slice) tells an undefined AUC (a slice with one class) from a bad one.
    return gated_eval_config(spec, "AUC", blessing_threshold(config.min_auc, config.max_auc_drop),
                             extra=("BinaryAccuracy", "Precision", "Recall", "MeanLabel"))


def create_pipeline(config: RunConfig, spec: DatasetSpec, name: str = None) -> tfx.dsl.Pipeline:
    """``name``: the pipeline's name when an orchestrator needs another spelling (default: pipeline_name)."""
    name = name or config.pipeline_name or pipeline_name(spec, config.trainer)   # a study shares one name
    version = code_version()
    example_gen = FileBasedExampleGen(
        input_base=spec.raw_directory,
        input_config=example_gen_pb2.Input(splits=[
            example_gen_pb2.Input.Split(name=split, pattern=pattern) for split, pattern in spec.splits.items()]),
        # images: the examples' form (one PNG per image) is part of ExampleGen's cache key
        custom_config=spec_to_custom_config(spec, IMAGE_EXAMPLE_FORMAT if spec.is_image else None),
        custom_executor_spec=executor_spec.BeamExecutorSpec(
            IdxExampleGenExecutor if spec.is_image else DelimitedExampleGenExecutor),
    ).with_id("ExampleGen")
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    # The schema inferred from this data, kept for the audit trail and as the starting point of curation.
    schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs["statistics"],
                                          infer_feature_shape=False)
    components = [example_gen, statistics_gen, schema_gen]
    # Validation needs a reference the data cannot move: the data set's curated schema when it has one.
    if spec.schema_path:
        reference = tfx.components.ImportSchemaGen(
            schema_file=_content_addressed_copy(spec.schema_path, os.path.join(config.workdir, "schemas"))
        ).with_id("ReferenceSchema")
        components.append(reference)
        schema = reference.outputs["schema"]
    else:
        schema = schema_gen.outputs["schema"]
    # Only a public split's anomalies stop the run; a private split's rows are handled row by row by the
    # Transform (clipped, out-of-vocabulary), so one row never decides whether anything is published.
    validator = StrictExampleValidator(statistics=statistics_gen.outputs["statistics"], schema=schema,
                                       comparators=load_comparators(spec),  # drift/skew limits of dataset.json
                                       public_splits=public_splits(spec))
    if config.validate_only:  # the data gate alone: nothing is trained, nothing is pushed
        return tfx.dsl.Pipeline(
            pipeline_name=name, pipeline_root=config.pipeline_root,
            components=components + [validator], enable_cache=config.enable_cache,
            metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
                config.metadata_path),
            beam_pipeline_args=beam_pipeline_args(config.beam_args))
    # Images: Transform only writes its graph (decode the PNG, scale by the public range; no analyzers, so TFX runs
    # it in place, with no pass over the data) and the Trainer applies it to ExampleGen's examples: materialising
    # height x width floats per image, with statistics over each of them, was most of the run's time.
    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"], schema=schema,
        preprocessing_fn="pipeline.transform.preprocessing_fn",
        custom_config={"dataset": spec.to_json_dict(), "code_version": version},
        **({"materialize": False, "disable_statistics": True} if spec.is_image else {}))
    # Transform must not start on data whose public splits failed validation.
    transform.add_upstream_node(validator)
    trainer = tfx.components.Trainer(
        run_fn="pipeline.trainer_executor.run_fn",
        examples=example_gen.outputs["examples"] if spec.is_image else transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"],
        schema=schema,
        train_args=tfx.proto.TrainArgs(splits=["train"]),
        eval_args=tfx.proto.EvalArgs(splits=["eval"]),
        custom_config={"dataset": spec.to_json_dict(), "trainer": config.trainer,
                       "trainer_args": dict(config.trainer_args), "privacy": config.privacy_args(),
                       "hidden_units": list(config.hidden_units), "code_version": version,
                       # image data sets: the model and the workdir's (private) ScatterNet feature cache
                       **({"image_model": config.image_model, "cache_dir": os.path.join(config.workdir, "cache")}
                          if spec.is_image else {})},
        custom_executor_spec=executor_spec.ExecutorClassSpec(PrivacyRecordingTrainerExecutor),
    )
    baseline = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("LatestBlessedModelResolver")
    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"], model=trainer.outputs["model"],
        baseline_model=baseline.outputs["model"] if config.compare_to_baseline else None,
        eval_config=eval_config(spec, config), example_splits=["eval"])
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"], model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(filesystem=tfx.proto.PushDestination.Filesystem(
            base_directory=os.path.join(config.serving_dir, model_name(config, spec)))))
    components += [validator, transform, trainer] + ([baseline] if config.compare_to_baseline else []) + [
        evaluator, pusher]
    return tfx.dsl.Pipeline(
        pipeline_name=name, pipeline_root=config.pipeline_root,
        components=components, enable_cache=config.enable_cache,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            config.metadata_path),
        beam_pipeline_args=beam_pipeline_args(config.beam_args))

