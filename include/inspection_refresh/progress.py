"""Progress lines for people reading task logs: counts, rates and ETA, every few seconds."""

from __future__ import annotations

import logging
import time
from typing import Callable

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


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``(1, "object")`` -> ``"1 object"``, ``(3, "object")`` -> ``"3 objects"``."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


class Progress:
    """Counts work done and logs one line every ``interval`` seconds (and at the end).

    ``total`` is the number of items; ``total_bytes`` (optional) adds MB and MB/s.
    The item unit (``"files"``, ``"images"``) names what is counted.

    Rates and the ETA in progress lines are measured from the first finished
    item on: the time before it is warm-up (model load, decode workers starting,
    connections opening, a small first batch) that the remaining items do not
    repeat, and counting it made early ETAs an order of magnitude too long. The
    first line therefore waits for a second finished update. The closing line
    gives the average over the whole elapsed time.
    """

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "items",
        total_bytes: int | None = None,
        interval: float = 5.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.total_bytes = total_bytes
        self.interval = interval
        self.logger = logger or log
        self.done = 0
        self.done_bytes = 0
        self._clock = clock
        self.started = clock()
        self._last_log = self.started
        self._rate_origin: tuple[float, int, int] | None = None
        """(time, items, bytes) when the first item finished: where steady rates are measured from."""

    def update(self, items: int = 1, nbytes: int = 0) -> None:
        """Record ``items`` finished (and ``nbytes`` moved); log if the interval passed."""
        self.done += items
        self.done_bytes += nbytes
        now = self._clock()
        if self._rate_origin is None:
            if items > 0:
                self._rate_origin = (now, self.done, self.done_bytes)
            return
        if now - self._last_log >= self.interval and self.done < self.total and self._steady_rates(now):
            self._last_log = now
            self.logger.info("%s", self.line())

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    def _steady_rates(self, now: float) -> tuple[float, float] | None:
        """(items/s, bytes/s) since the first finished item; ``None`` until something finished after it."""
        if self._rate_origin is None:
            return None
        origin_time, origin_items, origin_bytes = self._rate_origin
        span = now - origin_time
        if self.done <= origin_items or span <= 0:
            return None
        return (self.done - origin_items) / span, (self.done_bytes - origin_bytes) / span

    def line(self) -> str:
        """``label: done/total unit (pct%)[, MB, MB/s], rate, ETA`` while running; ``elapsed`` once finished."""
        now = self._clock()
        elapsed = max(now - self.started, 1e-9)
        running = 0 < self.done < self.total
        steady = self._steady_rates(now) if running else None
        rate, byte_rate = steady or (self.done / elapsed, self.done_bytes / elapsed)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%)"]
        if self.total_bytes is not None:
            parts.append(f"{self.done_bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, {byte_rate / 1e6:.1f} MB/s")
        parts.append(f"{rate:.1f} {self.unit}/s")
        if running:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
        return ", ".join(parts)

    def finish(self) -> str:
        """Log and return the closing line."""
        line = self.line()
        self.logger.info("%s", line)
        return line
