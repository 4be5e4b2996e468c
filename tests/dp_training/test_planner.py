"""Issue 18.2: one planner (dp_training.planner.plan_for). What the pre-flight, ``privtrain export`` and a study
state is the event the Trainer reserves: compared (dp_accounting event equality) with the event the executor's
own function (``run_private_training`` / ``run_image_training``) hands to the ledger, captured by a ledger that
refuses the reservation, so nothing trains. Adult (dp_sgd; federated with Poisson and fixed-size client sampling)
and Fashion-MNIST (ScatterNet + linear: the image Trainer's own arguments; no preprocessing release with the
default per-example GroupNorm, the channel-moment release with ``scatternet_linear_dpnorm``)."""
from __future__ import annotations

import os

import dp_accounting
import numpy as np
import pytest

from dp_training import events as ev
from core.dataset import load_dataset, read_rows
from core.features import transform_columns
from dp_training.protocol import run_private_training
from pipeline.config import PROJECT_ROOT

ADULT = os.path.join(PROJECT_ROOT, "data", "adult")
FASHION = os.path.join(PROJECT_ROOT, "data", "fashion_mnist")


class _Reserved(Exception):
    pass


class CaptureLedger:
    """Records the event a run reserves and refuses it (the run stops before any release)."""

    path = None

    def __init__(self):
        self.event = None

    def verify(self, anchors=()):
        return None

    def reserve(self, source_id, event, **kwargs):
        self.event = event
        raise _Reserved


def _cli_config(argv):
    from privtrain_cli.main import build_parser
    from privtrain_cli.run import run_config

    return run_config(build_parser(["run"]).parse_args(["run", *argv]))


def _planned_by_the_runner(config):
    from pipeline.runner import run_plan

    return run_plan(config, load_dataset(config.data_dir))


@pytest.fixture(scope="module")
def adult_rows():
    spec = load_dataset(ADULT)
    rows = read_rows(spec, "train")
    x = transform_columns(spec, rows.columns)
    few = {k: v[:50] for k, v in x.items()}
    return spec, x, rows.labels, few, rows.labels[:50]


def _reserved_by_the_tabular_trainer(adult_rows, config, tmp_path):
    """What the pipeline's Trainer (pipeline.trainer_executor.run_fn) reserves for ``config``."""
    from pipeline.trainers import get_trainer

    spec, x, y, ex, ey = adult_rows
    ledger = CaptureLedger()
    with pytest.raises(_Reserved):
        run_private_training(spec, config.trainer, config.trainer_args, config.privacy_args(), x, y, ex, ey,
                             scratch_dir=str(tmp_path / "scratch"), kind=get_trainer(config.trainer),
                             log=lambda m: None, ledger=ledger)
    return ledger.event


@pytest.mark.parametrize("argv", [
    ["--trainer", "dp_sgd", "--epochs", "2"],
    ["--trainer", "federated", "--rounds", "3", "--target-epsilon", "2"],
    ["--trainer", "federated", "--rounds", "3", "--dp-noise-multiplier", "1.2", "--sampling", "fixed",
     "--accountant", "rdp"],
], ids=["dp_sgd", "federated_poisson", "federated_fixed"])
def test_adult_preflight_and_export_state_what_the_trainer_reserves(argv, adult_rows, tmp_path):
    from pipeline.export import preflight_at_export

    config = _cli_config(["--data", ADULT, "--workdir", str(tmp_path), *argv])
    planned = _planned_by_the_runner(config)
    reserved = _reserved_by_the_tabular_trainer(adult_rows, config, tmp_path)
    assert planned.private and isinstance(planned.preprocessing_event, dp_accounting.GaussianDpEvent)
    assert planned.event == reserved
    assert ev.to_json(planned.event) == ev.to_json(reserved)
    line = preflight_at_export(config, load_dataset(ADULT))   # export states the runner's plan
    assert f"planned epsilon {planned.planned_epsilon():.4g}" in line


def _reserved_by_the_image_trainer(config, tmp_path, rows=4):
    """What the image Trainer (pipeline.image_pipeline.run_image_fn) reserves for ``config``: its function, on
    a few images (the plan uses the public planning size, never the rows)."""
    from dp_training.images import run_image_training
    from pipeline.trainers import get_trainer

    spec = load_dataset(config.data_dir)
    rng = np.random.default_rng(0)
    pixels = rng.random((rows,) + spec.image.shape).astype(np.float32)
    labels = np.arange(rows) % spec.num_classes
    ledger = CaptureLedger()
    with pytest.raises(_Reserved):
        run_image_training(spec, config.image_model, config.trainer, get_trainer(config.trainer),
                           config.trainer_args, config.privacy_args(), pixels, labels, pixels, labels,
                           scratch_dir=str(tmp_path / "scratch"), cache_dir=None, log=lambda m: None, ledger=ledger)
    return ledger.event


def test_fashion_mnist_preflight_export_and_study_state_what_the_trainer_reserves(tmp_path):
    from dp_training.ledger import Ledger
    from pipeline.config import RunConfig
    from pipeline.export import preflight_at_export
    from simulations.study.plan import plan_study, privacy_args
    from simulations.study.spec import from_options

    config = _cli_config(["--data", FASHION, "--workdir", str(tmp_path), "--target-epsilon", "3"])
    planned = _planned_by_the_runner(config)
    reserved = _reserved_by_the_image_trainer(config, tmp_path)
    # the default (ScatterNet + per-example GroupNorm + linear) releases nothing before DP-SGD: no preprocessing
    # event, the whole epsilon goes to DP-SGD; the image Trainer's own arguments (batch 8192)
    assert config.image_model == "scatternet_linear"
    assert isinstance(planned.preprocessing_event, dp_accounting.NoOpDpEvent)
    assert len(planned.preprocessing.feature_keys) == 0
    assert planned.training.public["expected_batch_size"] == 8192
    assert planned.event == reserved and ev.to_json(planned.event) == ev.to_json(reserved)
    assert abs(planned.planned_epsilon() - 3.0) < 0.01
    line = preflight_at_export(config, load_dataset(FASHION))
    assert f"planned epsilon {planned.planned_epsilon():.4g}" in line

    study = from_options(FASHION, str(tmp_path / "out"), trainers="dp_sgd", epsilons="3", seeds=1)
    point = study.points()[0]
    stated = plan_study(study, [point], ledger=Ledger(str(tmp_path / "ledger.sqlite"))).plans[point.id]
    dataset = load_dataset(FASHION)
    run = RunConfig(data_dir=FASHION, trainer="dp_sgd", trainer_args=point.trainer_args(dataset),
                    privacy=privacy_args(study, point))   # as simulations/study/runner.run_point builds it
    assert stated.event == _reserved_by_the_image_trainer(run, tmp_path)
    assert stated.training.public["expected_batch_size"] == 8192


def test_fashion_mnist_dp_normalisation_model_plans_and_reserves_the_channel_moments(tmp_path):
    """``--model scatternet_linear_dpnorm`` (Tramèr & Boneh's BN option): the ScatterNet channel-moment release
    is planned (81 channels) and composed with DP-SGD; the Trainer reserves exactly that."""
    config = _cli_config(["--data", FASHION, "--workdir", str(tmp_path), "--target-epsilon", "3",
                          "--model", "scatternet_linear_dpnorm"])
    planned = _planned_by_the_runner(config)
    reserved = _reserved_by_the_image_trainer(config, tmp_path)
    assert isinstance(planned.preprocessing_event, dp_accounting.GaussianDpEvent)
    assert len(planned.preprocessing.feature_keys) == 81
    assert planned.training.public["expected_batch_size"] == 8192
    assert planned.event == reserved and ev.to_json(planned.event) == ev.to_json(reserved)


def test_the_planner_and_the_contract_import_no_tfx_nor_tensorflow():
    import subprocess
    import sys

    code = ("import sys, dp_training.planner, dp_training.contract; "
            "print(sorted(m for m in ('tfx', 'tensorflow', 'tensorflow_federated', 'pipeline') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": PROJECT_ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_image_channel_count_is_the_scatternets():
    """The planned channel keys are the channels the ScatterNet produces (the release must be the planned one)."""
    pytest.importorskip("kymatio")
    from dp_training.images import scattering_channels, scattering_features

    pixels = np.random.default_rng(0).random((2, 28, 28, 1)).astype(np.float32)
    assert scattering_features(pixels, None).shape[1] == scattering_channels((28, 28, 1)) == 81
