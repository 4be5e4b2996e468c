"""simulations/study/plots.py: the per-slice plot shows each slice's 95% interval across replicates."""
from __future__ import annotations

import pytest

from simulations.study import plots

pytest.importorskip("matplotlib")


def test_slice_plot_draws_each_slices_interval(tmp_path, monkeypatch):
    aggregate = [
        {"arm": "dp_sgd", "target_epsilon": eps, "accuracy[sex=Female]_mean": m, "accuracy[sex=Female]_ci95": ci,
         "accuracy[sex=Male]_mean": m - 0.05, "accuracy[sex=Male]_ci95": ci / 2}
        for eps, m, ci in ((1.0, 0.80, 0.04), (3.0, 0.83, 0.02))]
    aggregate.append({"arm": "standard", "target_epsilon": None, "accuracy[sex=Female]_mean": 0.9,
                      "accuracy[sex=Female]_ci95": 0.01, "accuracy[sex=Male]_mean": 0.85,
                      "accuracy[sex=Male]_ci95": 0.01})
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or "slices.png")
    assert plots.plot_slices(str(tmp_path / plots.SLICES), aggregate) == "slices.png"
    ax = figures[0].axes[0]
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(bars) == 2                      # one interval series per slice
    female = bars[[c.get_label() for c in bars].index("Female")]
    segments = female.lines[2][0].get_segments()
    assert [round(s[1][1] - s[0][1], 6) for s in segments] == [0.08, 0.04]   # +-ci95 at each epsilon
