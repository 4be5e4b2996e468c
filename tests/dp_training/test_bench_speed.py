"""``simulations/bench_dp.py speed`` (issue 20): the DP step it times is the trainer's, its diagnostic without the
noise really has none, and it reports the CPU-time and the wall-time ratio side by side."""
import numpy as np
import pytest

from simulations.bench_dp import _dp_stepper, _subset, bench_speed, load

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def adult():
    spec, train, test = load()
    return spec, _subset(train, np.arange(3000)), test


def _moved(spec, train, zero_noise):
    from dp_training import trainer as trainer_mod
    x = trainer_mod._as_inputs(train[0])
    y = np.asarray(train[1], np.float32).reshape(-1, 1)
    out = []
    for _ in range(2):   # the same seeded initial weights, the same batch
        path, step, model = _dp_stepper(spec, x, y, 300, zero_noise=zero_noise)
        assert path == "fused_dense"
        w0 = [v.numpy().copy() for v in model.trainable_variables]
        step(np.arange(300, dtype=np.int64))
        out.append(np.concatenate([(v.numpy() - w).ravel() for v, w in zip(model.trainable_variables, w0)]))
    return out


def test_zero_noise_diagnostic_has_no_noise_and_the_real_step_has(adult):
    """The step draws its noise while it is traced: zeroing ``GaussianNoise.like`` only after the trace (what a
    first version of this diagnostic did) leaves the noise in, and the "noise share" it reports is 0."""
    spec, train, _ = adult
    a, b = _moved(spec, train, zero_noise=True)
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    a, b = _moved(spec, train, zero_noise=False)
    assert np.abs(a - b).max() > 1e-4


def _op_types(concrete):
    graph = concrete.graph.as_graph_def()
    return {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}


@pytest.mark.parametrize("zero_noise, noise, sampler_ops",
                         [(False, None, {"Cos", "Log"}), (True, None, set()),
                          (False, "tf_philox", {"RngReadAndSkip", "StatelessRandomNormalV2"})])
def test_each_diagnostic_row_traces_the_sampler_it_names(adult, zero_noise, noise, sampler_ops):
    """The row step is traced when the rows are bound: a diagnostic patched in only after that would time the
    trainer's sampler (Box-Muller on all-zero words: a constant, not zero) under another name."""
    from dp_training import trainer as trainer_mod
    spec, train, _ = adult
    x = trainer_mod._as_inputs(train[0])
    y = np.asarray(train[1], np.float32).reshape(-1, 1)
    _, step, _ = _dp_stepper(spec, x, y, 300, zero_noise=zero_noise, noise=noise)
    ops = _op_types(step.stepper._step_rows)
    assert {"Cos", "Log"} & ops == ({"Cos", "Log"} if noise is None and not zero_noise else set())
    assert sampler_ops <= ops


def test_speed_reports_cpu_and_wall_ratios_side_by_side(adult, capsys):
    spec, train, test = adult
    out = bench_speed(spec, train, test, epochs=3, batch=300, parts=True)
    assert out["path"] == "fused_dense"
    for measure in ("cpu_seconds", "wall_seconds"):
        assert set(out[measure]) == {"non-private", "DP-SGD", "DP-SGD, noise zeroed (diagnostic)",
                                     "DP-SGD, TF Philox sampler (before)"}
        assert all(len(v) == 3 and min(v) > 0 for v in out[measure].values())
    assert out["cpu_ratio"] > 0 and out["wall_ratio"] > 0 and len(out["load_average"]) == 4
    printed = capsys.readouterr().out
    assert "CPU s" in printed and "wall s" in printed and "load average" in printed
