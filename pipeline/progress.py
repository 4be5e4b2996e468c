"""The run's progress lines: one line per component start and finish, with an estimate of the time the run has left.

The estimate (ETA) comes from this workdir's earlier runs: every component's duration when it last executed
(not answered from TFX's cache) is kept in ``<workdir>/runs/durations.json`` (private: the workdir is 0700, the
file 0600; the timings grow with the data's size, so they are operational and never published —
docs/privacy_model.md). While a run goes on, the time left is the sum of the remembered durations of the
components that have not finished, scaled by how this run compares so far: the ratio of the actual to the
remembered durations of the components that executed (clamped to [1/4, 4]; 1 before any has). A component
that has started counts the part of its remembered duration not yet elapsed. A component with no remembered
duration (the first run in a workdir, a new component) counts zero: the line then says the ETA is a lower bound.
Cached components finish at once, so a mostly cached run ends sooner than estimated, never later."""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable, Dict, Iterable, Optional

from core.private_files import write_private_text

DURATIONS = os.path.join("runs", "durations.json")
_SCALE_BOUNDS = (0.25, 4.0)


def load_durations(workdir: Optional[str]) -> Dict[str, float]:
    """The remembered duration (seconds) of each component that executed in an earlier run of ``workdir``."""
    if not workdir:
        return {}
    try:
        with open(os.path.join(workdir, DURATIONS)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: float(v) for k, v in doc.items() if isinstance(k, str) and isinstance(v, (int, float)) and v >= 0}


def save_durations(workdir: str, durations: Dict[str, float]) -> None:
    """Writes the remembered durations (atomically; 0600 in the private workdir)."""
    path = os.path.join(workdir, DURATIONS)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_private_text(path, json.dumps({k: round(v, 3) for k, v in sorted(durations.items())}))


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressReporter:
    """Turns LocalDagRunner's component log calls into short progress lines with durations and the run's ETA.

    LocalDagRunner reports progress only through absl logging, whose level libraries change while the
    pipeline runs (Transform turns it down), so we observe the runner module's and the launcher's
    ``logging.info`` calls directly instead of attaching a handler. ``components``: the pipeline's component
    ids; ``workdir``: where the durations are remembered (None: no ETA, nothing written)."""

    def __init__(self, stream, started: float, components: Iterable[str] = (), workdir: Optional[str] = None,
                 clock: Callable[[], float] = time.time):
        self._stream, self._started, self._clock = stream, started, clock
        self._running: Dict[str, float] = {}
        self._cached: set = set()
        self._finished: Dict[str, float] = {}
        self._components = list(components)
        self._workdir = workdir
        self._remembered = load_durations(workdir)
        self._announced = False

    # -- the estimate ------------------------------------------------------------------------------------------
    def _scale(self) -> float:
        actual = sum(d for c, d in self._finished.items() if c not in self._cached and c in self._remembered)
        expected = sum(self._remembered[c] for c in self._finished if c not in self._cached and c in self._remembered)
        if expected <= 0 or actual <= 0:
            return 1.0
        low, high = _SCALE_BOUNDS
        return min(high, max(low, actual / expected))

    def eta(self) -> Optional[str]:
        """'about 1m20s left' (with 'at least' when a pending component has no remembered duration); None when
        nothing is remembered for this workdir or the pipeline's components are unknown."""
        if not self._remembered or not self._components:
            return None
        now, scale, left, unknown = self._clock(), self._scale(), 0.0, False
        for component in self._components:
            if component in self._finished:
                continue
            if component not in self._remembered:
                unknown = True
                continue
            expected = self._remembered[component] * scale
            if component in self._running:
                expected = max(0.0, expected - (now - self._running[component]))
            left += expected
        return f"{'at least ' if unknown else 'about '}{format_seconds(left)} left"

    def remembered(self) -> Dict[str, float]:
        """The durations to remember after this run: the executed components' new ones over the old ones."""
        merged = dict(self._remembered)
        merged.update({c: d for c, d in self._finished.items() if c not in self._cached})
        return merged

    def save(self) -> None:
        if self._workdir and any(c not in self._cached for c in self._finished):
            save_durations(self._workdir, self.remembered())

    # -- the lines ---------------------------------------------------------------------------------------------
    def info(self, message, *args):
        text = message % args if args else str(message)
        now = self._clock()
        if text.startswith("Component ") and text.endswith(" is running."):
            node = text[len("Component "):-len(" is running.")]
            self._running[node] = now
            line = f"{node} started"
            if not self._announced:
                self._announced = True
                eta = self.eta()
                line += f" (run: {eta})" if eta else " (no ETA yet: the first run in this workdir)"
            self._print(line)
        elif text.startswith("Component ") and text.endswith(" is finished."):
            node = text[len("Component "):-len(" is finished.")]
            self._finished[node] = now - self._running.pop(node, now)
            eta = self.eta()
            self._print(f"{node} finished in {self._finished[node]:.1f}s" + (f"; run: {eta}" if eta else ""))
        elif text.startswith("A cached execution"):
            for node in self._running:   # the component whose launcher reused a cached result
                self._cached.add(node)
            self._print("  (cached result reused)")

    def _print(self, text: str) -> None:
        self._stream.write(f"[{self._clock() - self._started:7.1f}s] {text}\n")
        self._stream.flush()

    @contextlib.contextmanager
    def observing(self, *modules):
        originals = [(m, m.logging) for m in modules]
        reporter = self

        class _Observed:
            def __getattr__(self, name):
                return getattr(originals[0][1], name)

            def info(self, message, *args, **kwargs):
                reporter.info(message, *args)
                return originals[0][1].info(message, *args, **kwargs)

        try:
            for module, _ in originals:
                module.logging = _Observed()
            yield
        finally:
            for module, original in originals:
                module.logging = original
            try:
                self.save()
            except OSError:
                pass   # the estimate is a convenience: a read-only workdir never fails a run
