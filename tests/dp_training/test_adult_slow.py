"""Slow: DP-SGD on a sample of the real Adult data (run with -m slow)."""
import pytest

from dp_training import accounting
from dp_training.trainer import DPSGDTrainer

pytestmark = pytest.mark.slow


def test_dp_sgd_on_adult_sample(tmp_path):
    from pipeline.trainers.base import TrainerContext
    from simulations.bench_dp import load_adult, make_builder
    xtr, ytr, xte, yte = load_adult()
    xtr, ytr, xte, yte = xtr[:8000], ytr[:8000], xte[:4000], yte[:4000]
    ctx = TrainerContext(dataset_name="adult", dataset_fingerprint="adult-sample",
                         train_features={"x": xtr}, train_labels=ytr,
                         eval_features={"x": xte}, eval_labels=yte,
                         build_model=make_builder(xtr.shape[1], 32),
                         args={"target_epsilon": 3.0, "delta": 1e-5, "epochs": 10,
                               "batch_size": 256, "seed": 0},
                         workdir=str(tmp_path), log=lambda m: None)
    out = DPSGDTrainer().train(ctx)
    p = out.privacy
    assert 2.9 <= p["epsilon"] <= 3.0
    assert p["epsilon"] == pytest.approx(accounting.compute_epsilon(
        p["noise_multiplier"], 256 / 8000, p["steps"], 1e-5, "pld", "poisson"))
    assert out.details["eval_accuracy"] > 0.80
    assert 0.4 < p["mia_auc"] < 0.6
