"""Rate-limited progress lines: a long training loop reports at most one line every few seconds (the first and the
last always), so the operator's terminal shows progress without a line per step or per short epoch."""
from __future__ import annotations

import time
from typing import Callable, Optional

LINE_EVERY_SECONDS = 5.0


class RateLimitedLog:
    """``log(line)`` at most once every ``every`` seconds of ``clock``; ``final=True`` always logs (and a line is
    never dropped for the first call)."""

    def __init__(self, log: Callable[[str], None], every: float = LINE_EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._log, self._every, self._clock = log, float(every), clock
        self._last: Optional[float] = None

    def due(self, final: bool = False) -> bool:
        """Whether a line now would be logged (lets a caller skip formatting one that would not)."""
        return final or self._last is None or self._clock() - self._last >= self._every

    def __call__(self, line: str, final: bool = False) -> bool:
        now = self._clock()
        if not (final or self._last is None or now - self._last >= self._every):
            return False
        self._last = now
        self._log(line)
        return True
