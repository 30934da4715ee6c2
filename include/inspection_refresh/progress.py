"""Progress lines for people reading task logs: counts, rates and ETA, every few seconds."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``; short and unambiguous in a log line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts work done and logs one line every ``interval`` seconds (and at the end).

    ``total`` is the number of items; ``total_bytes`` (optional) adds MB and MB/s.
    The item unit (``"files"``, ``"images"``) names what is counted.
    """

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "items",
        total_bytes: int | None = None,
        interval: float = 5.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.total_bytes = total_bytes
        self.interval = interval
        self.logger = logger or log
        self.done = 0
        self.done_bytes = 0
        self.started = time.monotonic()
        self._last_log = self.started

    def update(self, items: int = 1, nbytes: int = 0) -> None:
        """Record ``items`` finished (and ``nbytes`` moved); log if the interval passed."""
        self.done += items
        self.done_bytes += nbytes
        now = time.monotonic()
        if now - self._last_log >= self.interval and self.done < self.total:
            self._last_log = now
            self.logger.info("%s", self.line())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def line(self) -> str:
        elapsed = max(self.elapsed, 1e-9)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%)"]
        if self.total_bytes is not None:
            mb = self.done_bytes / 1e6
            parts.append(f"{mb:.1f}/{self.total_bytes / 1e6:.1f} MB, {mb / elapsed:.1f} MB/s")
        rate = self.done / elapsed
        parts.append(f"{rate:.1f} {self.unit}/s")
        if 0 < self.done < self.total:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
        return ", ".join(parts)

    def finish(self) -> str:
        """Log and return the closing line."""
        line = self.line()
        self.logger.info("%s", line)
        return line
