"""Progress that reads well everywhere: a tqdm bar on a terminal, a periodic one-line status elsewhere.

In a batch job or a CI log stderr is not a terminal and a progress bar either floods the
log or (tqdm's choice) disappears, leaving a silent gap. :func:`progress` returns a bar
on a terminal and, otherwise, a :class:`StatusLines` that logs one line every
``every`` seconds (and one at the end): done / total, rate and ETA.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger("pipeline.progress")
STATUS_EVERY_S = 30.0


class StatusLines:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` interface, writing a status line every ``every`` seconds."""

    def __init__(
        self, total: float | None, desc: str, unit: str, initial: float = 0, every: float = STATUS_EVERY_S
    ) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = self.start_done = initial
        self.started = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False

    def update(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info(self.line(now))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def line(self, now: float | None = None) -> str:
        """``desc: done/total unit (pct%), rate unit/s, ETA m:ss[, postfix]``."""
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        parts = [f"{self.desc}: {_count(self.done)}"]
        if self.total:
            parts[0] += f"/{_count(self.total)} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{_count(rate)} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_clock(max(0.0, self.total - self.done) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            log.info(self.line() + " (done)" if self.total and self.done >= self.total else self.line())

    def __enter__(self) -> StatusLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _count(value: float) -> str:
    """``950``, ``12,345``, ``3.40M``, ``1.25G``."""
    for limit, suffix in ((1e9, "G"), (1e6, "M")):
        if abs(value) >= limit:
            return f"{value / limit:.2f}{suffix}"
    return f"{value:,.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.1f}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress(
    total: float | None, desc: str, unit: str, initial: float = 0, enabled: bool = True, unit_scale: bool = False
) -> Any:
    """A tqdm bar when stderr is a terminal, else :class:`StatusLines`; a silent bar when not ``enabled``."""
    if not enabled:
        return tqdm(total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, unit=unit, unit_scale=unit_scale, desc=desc, mininterval=1.0)
    return StatusLines(total, desc, unit, initial)
