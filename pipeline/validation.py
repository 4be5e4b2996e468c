"""The data gate's second half: ExampleValidator (TFDV) that stops the run on anomalies, with a message naming
each feature, split and statistic.

1. Every split's statistics against the data set's curated reference schema (types, presence, categorical
   domains, the declared numeric ``int_domain``/``float_domain`` ranges, the 0/1 label).
2. Drift and skew comparators declared in ``dataset.json`` (optional)::

     "validation": {
       "drift": {"sex": {"infinity_norm": 0.1}, "age": {"jensen_shannon_divergence": 0.1}},
       "skew":  {"race": {"infinity_norm": 0.2}}
     }

   ``drift`` compares the eval split with the train split (TFDV's ``previous_statistics``: the train split is
   the reference); ``skew`` compares the train split with the eval split standing for the data the model will
   be served (TFDV's ``serving_statistics``). ``infinity_norm`` (largest difference of a categorical value's
   share) and ``jensen_shannon_divergence`` (categorical or numeric histograms) are the statistics; each
   threshold is a number in (0, 1]. A violation stops the run like any anomaly.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from tfx.components import ExampleValidator
from tfx.components.example_validator import executor as tfx_validator_executor
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_component_specs
from tfx.types.component_spec import ExecutionParameter
from tfx.utils import json_utils

from pipeline.data_gate import COMPARATORS, STATISTICS, load_comparators  # noqa: F401 (re-exported)

COMPARATORS_KEY = "comparators"


class DataValidationError(RuntimeError):
    """The data does not match the reference schema or drifted; nothing was trained or pushed."""


def describe_anomalies(anomalies, split: str, only_comparators: bool = False,
                       comparator: Optional[str] = None) -> List[str]:
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    type_name = anomalies_pb2.AnomalyInfo.Type.Name
    lines = []
    for feature, info in sorted(anomalies.anomaly_info.items()):
        reasons = [r for r in info.reason
                   if not only_comparators or type_name(r.type).startswith("COMPARATOR_")]
        if only_comparators and not reasons:
            continue
        if comparator:
            text = "; ".join(f"{comparator} ({_statistic(type_name(r.type))}): {r.description}" for r in reasons)
        else:
            text = "; ".join(f"{r.short_description}: {r.description}" for r in reasons) or info.description
        lines.append(f"  [{split}] feature '{feature}': {text}")
    if not only_comparators and anomalies.HasField("dataset_anomaly_info"):
        info = anomalies.dataset_anomaly_info
        reasons = "; ".join(f"{r.short_description}: {r.description}" for r in info.reason) or info.description
        lines.append(f"  [{split}] data set: {reasons}")
    return lines


def _statistic(type_name: str) -> str:
    if "L_INFTY" in type_name:
        return "infinity_norm"
    if "JENSEN_SHANNON" in type_name:
        return "jensen_shannon_divergence"
    return type_name.lower()


def comparator_problems(schema, train_stats, eval_stats, comparators: Dict[str, Any]) -> List[str]:
    """TFDV's drift (eval vs train) and skew (train vs eval as serving) checks, one line per violation."""
    import tensorflow_data_validation as tfdv
    from tensorflow_metadata.proto.v0 import schema_pb2

    problems: List[str] = []
    for kind, by_feature in sorted(comparators.items()):
        s = schema_pb2.Schema()
        s.CopyFrom(schema)
        for feature, stats in by_feature.items():
            comparator = getattr(tfdv.get_feature(s, feature), f"{kind}_comparator")
            for stat, threshold in stats.items():
                getattr(comparator, stat).threshold = threshold
        if kind == "drift":
            anomalies = tfdv.validate_statistics(statistics=eval_stats, schema=s, previous_statistics=train_stats)
        else:
            anomalies = tfdv.validate_statistics(statistics=train_stats, schema=s, serving_statistics=eval_stats)
        problems.extend(describe_anomalies(anomalies, COMPARATORS[kind], only_comparators=True, comparator=kind))
    return problems


class StrictValidatorExecutor(tfx_validator_executor.Executor):
    def Do(self, input_dict, output_dict, exec_properties):
        from tfx.components.statistics_gen import stats_artifact_utils
        from tfx.types import artifact_utils
        from tfx.utils import io_utils

        self._problems: List[str] = []
        result = super().Do(input_dict, output_dict, exec_properties)
        comparators = json_utils.loads(exec_properties.get(COMPARATORS_KEY) or "null") or {}
        if comparators:
            stats = artifact_utils.get_single_instance(input_dict[standard_component_specs.STATISTICS_KEY])
            schema = io_utils.SchemaReader().read(io_utils.get_only_uri_in_dir(
                artifact_utils.get_single_uri(input_dict[standard_component_specs.SCHEMA_KEY])))
            train, evaluation = (stats_artifact_utils.load_statistics(stats, split).proto()
                                 for split in ("train", "eval"))
            self._problems.extend(comparator_problems(schema, train, evaluation, comparators))
        if self._problems:
            raise DataValidationError(
                "data validation failed; the data does not match the data set's reference schema or the "
                "drift/skew limits in dataset.json:\n"
                + "\n".join(self._problems)
                + "\nFix the data (or, if the change is intended, update the reference schema or the "
                  "\"validation\" limits named in dataset.json) and run again. Nothing was trained or pushed.")
        return result

    def _Validate(self, inputs, outputs):
        anomalies = super()._Validate(inputs, outputs)
        split = str(outputs.get("schema_diff_path", "")).rstrip("/").rsplit("Split-", 1)[-1] or "?"
        self._problems.extend(describe_anomalies(anomalies, split))
        return anomalies


class StrictExampleValidatorSpec(standard_component_specs.ExampleValidatorSpec):
    PARAMETERS = dict(standard_component_specs.ExampleValidatorSpec.PARAMETERS,
                      **{COMPARATORS_KEY: ExecutionParameter(type=str, optional=True)})


class StrictExampleValidator(ExampleValidator):
    SPEC_CLASS = StrictExampleValidatorSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(StrictValidatorExecutor)

    def __init__(self, statistics, schema, comparators: Optional[Dict[str, Any]] = None):
        from tfx import types
        from tfx.types import standard_artifacts

        spec = StrictExampleValidatorSpec(
            statistics=statistics, schema=schema, exclude_splits=json_utils.dumps([]),
            anomalies=types.Channel(type=standard_artifacts.ExampleAnomalies),
            **({COMPARATORS_KEY: json.dumps(comparators, sort_keys=True)} if comparators else {}))
        base_component.BaseComponent.__init__(self, spec=spec)
