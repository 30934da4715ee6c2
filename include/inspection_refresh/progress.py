"""Progress lines for people reading task logs: counts, rates and ETA, every few seconds."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressReport:
    """What one progress line shows, as data: a reporter gets one each time the line is logged."""

    label: str
    done: int
    total: int
    unit: str
    rate: float
    """Items per second, as the line says (steady rate while running, the average once finished)."""
    eta_seconds: float | None
    """Seconds left while running; None once finished."""
    elapsed_seconds: float
    finished: bool
    """The closing report (:meth:`Progress.finish`), or everything done."""
    line: str
    """The log line itself."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressReporter = Callable[[ProgressReport], None]
"""Receives each :class:`ProgressReport`; must be quick, and its errors never stop the work."""

_ambient_reporter: ContextVar[ProgressReporter | None] = ContextVar("progress_reporter", default=None)


@contextmanager
def reporting_progress(reporter: ProgressReporter | None) -> Iterator[None]:
    """Every :class:`Progress` created inside the block (in this thread) also reports to ``reporter``.

    A task wraps a stage in it, so the library code that counts (downloads, embedding, the bank
    build) needs no parameter for where the figures go. ``None`` changes nothing.
    """
    token = _ambient_reporter.set(reporter or _ambient_reporter.get())
    try:
        yield
    finally:
        _ambient_reporter.reset(token)


def progress_file_writer(path: str | os.PathLike[str]) -> ProgressReporter:
    """A reporter that keeps the latest report in the JSON file ``path``, replaced atomically (a reader
    sees the previous report or the new one, never half of one)."""
    target = Path(path)

    def write(report: ProgressReport) -> None:
        # A leaf module (no inspection_refresh.files): the same replace-a-finished-file, without fsync.
        partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
        partial.write_text(json.dumps(report.as_dict()))
        os.replace(partial, target)

    return write


PROGRESS_FILE_ENV = "PROGRESS_FILE"
"""Names the file a secret-free script (the PatchCore builder) writes its progress reports to."""


def progress_file_from_env() -> ProgressReporter | None:
    """:func:`progress_file_writer` for ``$PROGRESS_FILE``, or None when it is not set."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    return progress_file_writer(path) if path else None


def read_progress_file(path: str | os.PathLike[str]) -> ProgressReport | None:
    """The report :func:`progress_file_writer` left in ``path``; None if there is none (yet) or it is unreadable."""
    try:
        return ProgressReport(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None


MIN_RATE_SPAN = 1.0
"""Seconds a steady rate must be measured over before a progress line states a rate and ETA."""


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

    ``reporter`` (default: the one of :func:`reporting_progress`) gets a :class:`ProgressReport` of
    every line logged, the closing one included, e.g. for the Deployments page's live figures.
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
        reporter: ProgressReporter | None = None,
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
        self.reporter = reporter or _ambient_reporter.get()
        self._reporter_failed = False
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
            self._log_line()

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    def _steady_rates(self, now: float) -> tuple[float, float] | None:
        """(items/s, bytes/s) since the first finished item; ``None`` until something finished after it, at
        least :data:`MIN_RATE_SPAN` later (two batches a moment apart once said "2477.5 images/s, ETA 0s")."""
        if self._rate_origin is None:
            return None
        origin_time, origin_items, origin_bytes = self._rate_origin
        span = now - origin_time
        if self.done <= origin_items or span < MIN_RATE_SPAN:
            return None
        return (self.done - origin_items) / span, (self.done_bytes - origin_bytes) / span

    def line(self) -> str:
        """``label: done/total unit (pct%)[, MB, MB/s], rate, ETA`` while running; ``elapsed`` once finished."""
        return self.report().line

    def report(self) -> ProgressReport:
        """The figures of :meth:`line`, with the line."""
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
        eta = (self.total - self.done) / rate if running and rate > 0 else None
        if running:
            parts.append(f"ETA {format_duration(eta or 0)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
        return ProgressReport(label=self.label, done=self.done, total=self.total, unit=self.unit, rate=rate,
                              eta_seconds=eta, elapsed_seconds=elapsed, finished=not running,
                              line=", ".join(parts))

    def _log_line(self, closing: bool = False) -> ProgressReport:
        report = self.report()
        if closing:  # the stage's last report, even if it stopped short of the total
            report = replace(report, finished=True, eta_seconds=None)
        self.logger.info("%s", report.line)
        if self.reporter is not None and not self._reporter_failed:
            try:
                self.reporter(report)
            except Exception as exc:  # the figures are a convenience: the work goes on without them
                self._reporter_failed = True
                self.logger.warning("Progress of %r is no longer reported (%s: %s); the log lines go on",
                                    self.label, type(exc).__name__, exc)
        return report

    def finish(self) -> str:
        """Log (and report) and return the closing line."""
        return self._log_line(closing=True).line
