"""pipeline/progress.py: one line per component, with the run's ETA from this workdir's earlier runs."""
from __future__ import annotations

import io
import json
import os
import stat

from pipeline.progress import DURATIONS, ProgressReporter, format_seconds

COMPONENTS = ["CsvExampleGen", "StatisticsGen", "Trainer", "Pusher"]


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _run(workdir, seconds, cached=(), clock=None):
    """Drives a reporter through the runner's log calls: each component takes ``seconds[c]`` on the clock."""
    clock = clock or _Clock()
    out = io.StringIO()
    reporter = ProgressReporter(out, clock(), COMPONENTS, str(workdir), clock=clock)
    for component in COMPONENTS:
        reporter.info("Component %s is running.", component)
        if component in cached:
            reporter.info("A cached execution %d is used.", 1)
        clock.now += seconds[component]
        reporter.info("Component %s is finished.", component)
    reporter.save()
    return out.getvalue().splitlines()


def test_the_first_run_says_there_is_no_eta_yet_and_remembers_privately(tmp_path):
    lines = _run(tmp_path, {"CsvExampleGen": 10, "StatisticsGen": 5, "Trainer": 60, "Pusher": 1})
    assert "CsvExampleGen started (no ETA yet: the first run in this workdir)" in lines[0]
    assert "Trainer finished in 60.0s" in lines[5] and "left" not in lines[5]
    path = tmp_path / DURATIONS
    assert json.loads(path.read_text()) == {"CsvExampleGen": 10, "StatisticsGen": 5, "Trainer": 60, "Pusher": 1}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_later_run_has_an_eta_scaled_by_how_it_compares_so_far(tmp_path):
    _run(tmp_path, {"CsvExampleGen": 10, "StatisticsGen": 5, "Trainer": 60, "Pusher": 1})
    # this time everything takes twice as long
    lines = _run(tmp_path, {"CsvExampleGen": 20, "StatisticsGen": 10, "Trainer": 120, "Pusher": 2})
    assert lines[0].endswith("CsvExampleGen started (run: about 1m16s left)")     # 10 + 5 + 60 + 1
    # CsvExampleGen took 2x: the rest (5 + 60 + 1 = 66 s remembered) is expected to take 2x too
    assert lines[1].endswith("CsvExampleGen finished in 20.0s; run: about 2m12s left")
    assert lines[-1].endswith("Pusher finished in 2.0s; run: about 0s left")
    assert json.loads((tmp_path / DURATIONS).read_text())["Trainer"] == 120


def test_cached_components_are_not_remembered_and_unknown_ones_make_a_lower_bound(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / DURATIONS).write_text(json.dumps({"CsvExampleGen": 10, "StatisticsGen": 5, "Trainer": 60}))
    lines = _run(tmp_path, {"CsvExampleGen": 0.1, "StatisticsGen": 0.1, "Trainer": 30, "Pusher": 1},
                 cached=("CsvExampleGen", "StatisticsGen"))
    assert lines[0].endswith("(run: at least 1m15s left)")    # Pusher has no remembered duration
    # the cached ones finish at once and do not rescale the estimate
    assert any(line.endswith("StatisticsGen finished in 0.1s; run: at least 1m00s left") for line in lines)
    remembered = json.loads((tmp_path / DURATIONS).read_text())
    assert remembered == {"CsvExampleGen": 10, "StatisticsGen": 5, "Trainer": 30, "Pusher": 1}


def test_a_running_component_counts_what_is_left_of_it(tmp_path):
    _run(tmp_path, {"CsvExampleGen": 10, "StatisticsGen": 5, "Trainer": 60, "Pusher": 1})
    clock = _Clock()
    reporter = ProgressReporter(io.StringIO(), clock(), COMPONENTS, str(tmp_path), clock=clock)
    for c in ("CsvExampleGen", "StatisticsGen"):
        reporter.info("Component %s is running.", c)
        clock.now += {"CsvExampleGen": 10, "StatisticsGen": 5}[c]
        reporter.info("Component %s is finished.", c)
    reporter.info("Component %s is running.", "Trainer")
    clock.now += 45
    assert reporter.eta() == "about 16s left"     # 15 s of the Trainer's 60, and the Pusher's 1


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 59, 61, 3600 + 120)] == ["0s", "59s", "1m01s", "1h02m"]
