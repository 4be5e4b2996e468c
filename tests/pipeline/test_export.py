"""privtrain export: the Kubeflow v2 spec compiled by TFX's KubeflowV2DagRunner against a golden file (components,
their order, the executors and Beam options, the trainer kind and privacy arguments), and the Airflow DAG file
(compiled and imported here; Apache Airflow itself is not installed, so its DAG object is not built: the
pipeline object the file builds is checked instead).

Regenerate the golden file after an intended change: PRIVTRAIN_UPDATE_GOLDEN=1 pytest tests/pipeline/test_export.py
"""
from __future__ import annotations

import json
import os
import runpy

import pytest

from pipeline.config import RunConfig
from pipeline.export import ExportError, export
from tests.conftest import make_adult_sample

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "kubeflow_dp_sgd.json")
LEDGER = "/mnt/privtrain/ledger.sqlite"  # a path the cluster's workers would mount; never opened here


def _order(tasks: dict) -> list:
    """Topological order of the DAG, ties broken by name (deterministic)."""
    done, order = set(), []
    while len(order) < len(tasks):
        ready = sorted(t for t, v in tasks.items() if t not in done and set(v.get("dependentTasks", [])) <= done)
        assert ready, "the compiled DAG has a cycle"
        done.add(ready[0])
        order.append(ready[0])
    return order


def normalise(compiled: dict, workdir: str, data: str) -> dict:
    """The spec's stable content: volatile fields (paths, code and SDK versions, schemas) dropped or replaced."""
    spec = compiled["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    executors = spec["deploymentSpec"]["executors"]
    out = {"name": spec["pipelineInfo"]["name"], "description": spec["pipelineInfo"]["description"],
           "labels": sorted(k for k in compiled.get("labels", {})), "tasks": []}
    for name in _order(tasks):
        component = spec["components"][tasks[name]["componentRef"]["name"]]
        executor = executors.get(component.get("executorLabel", ""), {})
        container = executor.get("container", {})
        args = container.get("args", [])
        entry = {"task": name, "after": sorted(tasks[name].get("dependentTasks", [])),
                 "image": container.get("image"), "command": container.get("command"),
                 "executor_class": args[args.index("--executor_class_path") + 1]
                 if "--executor_class_path" in args else None,
                 "beam_args": [a for a in args if a.startswith("--direct") or a.startswith("--sdk_container")
                               or a.startswith("--runner")],
                 "resolver": "resolver" in executor}
        if name == "Trainer":
            params = tasks[name]["inputs"]["parameters"]
            custom = json.loads(params["custom_config"]["runtimeValue"]["constantValue"]["stringValue"])
            entry["custom_config"] = {"trainer": custom["trainer"], "trainer_args": custom["trainer_args"],
                                      "privacy": custom["privacy"], "hidden_units": custom["hidden_units"],
                                      "dataset": custom["dataset"]["name"],
                                      "privacy_declaration": custom["dataset"]["privacy"]}
            entry["run_fn"] = params["run_fn"]["runtimeValue"]["constantValue"]["stringValue"]
        out["tasks"].append(entry)
    text = json.dumps(out, sort_keys=True)
    return json.loads(text.replace(workdir, "<workdir>").replace(data, "<data>"))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_adult_sample(str(tmp_path_factory.mktemp("export_sample")), 500, 200, source_id="export-sample")


def _config(sample, workdir, **kw) -> RunConfig:
    return RunConfig(data_dir=sample, workdir=workdir, trainer="dp_sgd",
                     privacy={"target_epsilon": 2.0, "delta": 1e-5, "accountant": "pld"},
                     trainer_args={"epochs": 3, "l2_norm_clip": 0.5}, **kw)


def test_kubeflow_spec_matches_the_golden_file(sample, tmp_path):
    output = str(tmp_path / "pipeline.json")
    workdir = str(tmp_path / "work")
    message = export("kubeflow", _config(sample, workdir), output, image="registry.example/privtrain:1",
                     explicit_ledger=LEDGER)
    # the output says where the binding ledger check happens, and what the export itself checked
    assert "checked and charged by the Trainer executor at run time" in message
    assert "planned epsilon 2 at delta 1e-05 (pld accountant" in message and LEDGER in message
    with open(output) as f:
        compiled = json.load(f)
    got = normalise(compiled, workdir, os.path.realpath(sample))
    # What the spec carries about the run: configuration only, nothing computed from the rows.
    trainer_params = compiled["pipelineSpec"]["root"]["dag"]["tasks"]["Trainer"]["inputs"]["parameters"]
    custom = json.loads(trainer_params["custom_config"]["runtimeValue"]["constantValue"]["stringValue"])
    assert set(custom) == {"code_version", "dataset", "hidden_units", "privacy", "trainer", "trainer_args"}
    if os.environ.get("PRIVTRAIN_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert got == golden
    order = [t["task"] for t in got["tasks"]]
    for before, after in [("ExampleGen", "StatisticsGen"), ("StatisticsGen", "StrictExampleValidator"),
                          ("StrictExampleValidator", "Transform"), ("Transform", "Trainer"),
                          ("Trainer", "Evaluator"), ("Evaluator", "Pusher")]:
        assert order.index(before) < order.index(after)
    trainer = next(t for t in got["tasks"] if t["task"] == "Trainer")
    assert trainer["custom_config"]["trainer"] == "dp_sgd"
    assert trainer["custom_config"]["privacy"] == {"target_epsilon": 2.0, "delta": 1e-5, "accountant": "pld",
                                                   "ledger": LEDGER, "ledger_must_exist": True}
    assert trainer["executor_class"] == "pipeline.trainer_executor.PrivacyRecordingTrainerExecutor"
    assert {t["image"] for t in got["tasks"] if t["image"]} == {"registry.example/privtrain:1"}


def test_kubeflow_export_carries_beam_args(sample, tmp_path):
    output = str(tmp_path / "pipeline.json")
    export("kubeflow", _config(sample, str(tmp_path / "w"), beam_args=("--direct_running_mode=multi_processing",
                                                                       "--direct_num_workers=2")),
           output, explicit_ledger=LEDGER)
    with open(output) as f:
        executors = json.load(f)["pipelineSpec"]["deploymentSpec"]["executors"]
    args = executors["StatisticsGen_executor"]["container"]["args"]
    assert args[-2:] == ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def test_export_refuses_without_a_shared_ledger_and_bad_privacy_arguments(sample, tmp_path):
    output = str(tmp_path / "pipeline.json")
    with pytest.raises(ExportError, match="pass --ledger PATH"):
        export("kubeflow", _config(sample, str(tmp_path / "w")), output)
    from dp_training.protocol import PlanError

    bad = RunConfig(data_dir=sample, workdir=str(tmp_path / "w"), trainer="dp_sgd", privacy={"delta": 2.0})
    with pytest.raises(PlanError, match="delta must be in"):
        export("kubeflow", bad, output, explicit_ledger=LEDGER)
    assert not os.path.exists(output)  # nothing written


def test_airflow_dag_file_builds_the_same_pipeline(sample, tmp_path):
    output = str(tmp_path / "dag.py")
    workdir = str(tmp_path / "work")
    message = export("airflow", _config(sample, workdir), output, explicit_ledger=LEDGER)
    assert "Trainer executor at run time" in message
    text = open(output).read()
    assert "AirflowDagRunner" in text and "checked and charged by the Trainer executor at run time" in text
    compile(text, output, "exec")
    # Airflow is not installed here (and is not part of the environment): the file's DAG is not built, but
    # the pipeline object it builds (the one AirflowDagRunner would run) is.
    with pytest.raises(ImportError):
        import airflow  # noqa: F401
    module = runpy.run_path(output)
    assert "DAG" not in module
    pipeline = module["PIPELINE"]
    ids = [c.id for c in pipeline.components]
    assert set(ids) == {"ExampleGen", "StatisticsGen", "SchemaGen", "ReferenceSchema", "StrictExampleValidator",
                        "Transform", "Trainer", "LatestBlessedModelResolver", "Evaluator", "Pusher"}
    for before, after in [("ExampleGen", "StatisticsGen"), ("StrictExampleValidator", "Transform"),
                          ("Transform", "Trainer"), ("Trainer", "Evaluator"), ("Evaluator", "Pusher")]:
        assert ids.index(before) < ids.index(after)  # the components in the order they run
    trainer = next(c for c in pipeline.components if c.id == "Trainer")
    custom = json.loads(trainer.exec_properties["custom_config"])
    assert custom["trainer"] == "dp_sgd" and custom["privacy"]["ledger"] == LEDGER
    assert custom["privacy"]["target_epsilon"] == 2.0 and custom["trainer_args"]["epochs"] == 3
    assert pipeline.pipeline_info.pipeline_root == os.path.join(workdir, "pipeline_root")
    assert "--direct_running_mode=in_memory" in pipeline.beam_pipeline_args


def test_an_exported_run_never_creates_a_ledger_and_refuses_a_swapped_one(sample, tmp_path):
    """Attack: the exported Trainer runs where the shared ledger volume is not mounted (or another file sits at
    its path). Without the export's guards it would start a fresh ledger with a fresh budget and train."""
    from core.dataset import load_dataset
    from core.features import numeric_key
    from dp_training.ledger import Ledger, LedgerTamperedError
    from dp_training.protocol import PlanError, RunProtocol, plan_run
    from pipeline.trainers import get_trainer

    shared = tmp_path / "shared"
    shared.mkdir()
    path = str(shared / "ledger.sqlite")
    Ledger(path).set_budget("export-sample", 5.0, 1e-5, relation="add_or_remove_one")
    output = str(tmp_path / "pipeline.json")
    export("kubeflow", _config(sample, str(tmp_path / "w")), output, explicit_ledger=path)
    with open(output) as f:
        params = json.load(f)["pipelineSpec"]["root"]["dag"]["tasks"]["Trainer"]["inputs"]["parameters"]
    privacy = json.loads(params["custom_config"]["runtimeValue"]["constantValue"]["stringValue"])["privacy"]
    head = Ledger(path).verify()
    assert privacy["ledger_must_exist"] is True and privacy["ledger_anchor"] == f"{head.head_seq}:{head.head_hash}"

    spec = load_dataset(sample)
    plan = plan_run(spec, "dp_sgd", get_trainer("dp_sgd"), {"epochs": 3, "l2_norm_clip": 0.5}, privacy,
                    [numeric_key(c) for c in spec.numeric_features])
    RunProtocol(plan).check()  # the real ledger accepts it
    os.rename(path, path + ".away")  # the volume is not mounted
    with pytest.raises(PlanError, match="does not exist here: mount the shared ledger volume"):
        RunProtocol(plan).reserve()
    assert not os.path.exists(path)  # and nothing was created
    Ledger(path).set_budget("export-sample", 50.0, 1e-5, relation="add_or_remove_one")  # another ledger there
    with pytest.raises(LedgerTamperedError):
        RunProtocol(plan).reserve()
