"""Progress lines: the first rate and ETA a data engineer reads must be about right."""

from __future__ import annotations

import logging
import re

from inspection_refresh.progress import Progress, progress_file_writer, read_progress_file, reporting_progress


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _seconds(text: str) -> float:
    """Inverse of ``format_duration`` for ``"25s"``, ``"4m08s"``, ``"1h02m"``."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert match and text, text
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_first_eta_after_a_warm_up_is_close_to_the_truth(caplog):
    """20 s of model load, a first batch of 8, then 32 images every 3.2 s (10 images/s): 250 images."""
    clock = FakeClock()
    logger = logging.getLogger("test.progress")
    progress = Progress("embed images", total=250, unit="images", interval=5.0, logger=logger, clock=clock)
    clock.now += 20.0  # the model loads; nothing finishes
    progress.update(0)  # a batch without failures reports 0 items; it must not start the rate clock
    truths = []
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for size in [8] + [32] * 7 + [18]:
            clock.now += size / 10.0
            progress.update(size)
            truths.append((progress.total - progress.done) / 10.0)
            if caplog.records:
                break
    first = caplog.records[0].getMessage()
    rate = float(re.search(r"([\d.]+) images/s", first).group(1))
    eta = _seconds(re.search(r"ETA (\S+)", first).group(1))
    truth = truths[-1]
    assert 10 / 1.5 <= rate <= 10 * 1.5, first
    # averaged over the whole elapsed time (warm-up included) it said 1.7 images/s, ETA 2m06s, for 21 s
    assert truth / 1.5 <= eta <= truth * 1.5, (first, truth)


def test_finished_line_gives_the_average_over_the_whole_run():
    clock = FakeClock()
    progress = Progress("download", total=4, unit="files", total_bytes=8_000_000, logger=logging.getLogger("t"),
                        clock=clock)
    for _ in range(4):
        clock.now += 2.0
        progress.update(1, 2_000_000)
    assert progress.finish() == "download: 4/4 files (100%), 8.0/8.0 MB, 1.0 MB/s, 0.5 files/s, elapsed 8s"


def test_byte_rate_and_eta_use_the_same_steady_window():
    clock = FakeClock()
    progress = Progress("download", total=10, unit="files", total_bytes=10_000_000, logger=logging.getLogger("t"),
                        clock=clock)
    clock.now += 6.0  # connections opening
    progress.update(1, 1_000_000)
    clock.now += 2.0
    progress.update(2, 2_000_000)
    assert progress.line() == "download: 3/10 files (30%), 3.0/10.0 MB, 1.0 MB/s, 1.0 files/s, ETA 7s"


def test_no_line_until_a_rate_can_be_measured(caplog):
    clock = FakeClock()
    progress = Progress("embed", total=100, interval=5.0, logger=logging.getLogger("test.progress"), clock=clock)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        clock.now += 30.0
        progress.update(8)  # the first item finished: no rate yet, no line
        assert not caplog.records
        clock.now += 1.0
        progress.update(8)
    assert [r.getMessage() for r in caplog.records] == ["embed: 16/100 items (16%), 8.0 items/s, ETA 10s"]


def test_the_reporter_gets_exactly_what_each_logged_line_shows(caplog):
    """Every line logged, the closing one included, reaches the reporter with its own figures; nothing else does."""
    clock = FakeClock()
    reports = []
    progress = Progress("embed", total=100, interval=5.0, logger=logging.getLogger("test.progress"), clock=clock,
                        reporter=reports.append)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        clock.now += 30.0
        progress.update(8)  # warm-up: no line, so no report
        assert reports == []
        clock.now += 1.0
        progress.update(8)  # a line: 16/100 at 8 items/s
        clock.now += 1.0
        progress.update(8)  # within the interval: no line, no report
        clock.now += 10.0
        progress.update(76)
        progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert [r.line for r in reports] == lines
    running, closing = reports
    assert (running.label, running.done, running.total, running.unit) == ("embed", 16, 100, "items")
    assert (running.rate, running.eta_seconds, running.finished) == (8.0, 10.5, False)
    assert running.line == "embed: 16/100 items (16%), 8.0 items/s, ETA 10s"
    assert (closing.done, closing.total, closing.finished, closing.eta_seconds) == (100, 100, True, None)
    assert closing.elapsed_seconds == 42.0 and closing.line.endswith("elapsed 42s")


def test_a_failing_reporter_never_stops_the_work(caplog):
    clock = FakeClock()
    calls = []

    def broken(report):
        calls.append(report)
        raise ConnectionError("database gone")

    progress = Progress("download", total=3, logger=logging.getLogger("test.progress"), clock=clock, reporter=broken)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for _ in range(3):
            clock.now += 6.0
            progress.update(1)
        assert progress.finish().startswith("download: 3/3 items (100%)")
    assert len(calls) == 1  # tried once, then left alone; the lines go on
    assert any("no longer reported" in r.getMessage() and "database gone" in r.getMessage() for r in caplog.records)


def test_progress_made_inside_reporting_progress_reports_there_and_only_there():
    seen = []
    with reporting_progress(seen.append):
        inside = Progress("inside", total=1, logger=logging.getLogger("t"))
        with reporting_progress(None):  # None keeps the outer reporter
            nested = Progress("nested", total=1, logger=logging.getLogger("t"))
    outside = Progress("outside", total=1, logger=logging.getLogger("t"))
    for progress in (inside, nested, outside):
        progress.update(1)
        progress.finish()
    assert [r.label for r in seen] == ["inside", "nested"]


def test_the_progress_file_holds_the_last_report_whole(tmp_path):
    path = tmp_path / "progress.json"
    assert read_progress_file(path) is None
    clock = FakeClock()
    progress = Progress("extract BRKT01", total=40, unit="images", interval=0.0, logger=logging.getLogger("t"),
                        clock=clock, reporter=progress_file_writer(path))
    for _ in range(4):
        clock.now += 0.5
        progress.update(10)
    progress.finish()
    written = read_progress_file(path)
    assert written == progress.report()
    assert (written.done, written.total, written.finished) == (40, 40, True)
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no partial file left behind
    path.write_text('{"label": "half')  # a torn file (never written so) reads as no report, not an error
    assert read_progress_file(path) is None


def test_no_rate_from_two_updates_a_moment_apart(caplog):
    """A first batch after a long warm-up, then another a moment later, once said "2477.5 images/s, ETA 0s"."""
    clock = FakeClock()
    progress = Progress("embed", total=1000, unit="images", interval=5.0, logger=logging.getLogger("test.progress"),
                        clock=clock)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        clock.now += 30.0
        progress.update(32)
        clock.now += 0.01
        progress.update(32)  # 3200 images/s over 10 ms: not a measurement
        assert not caplog.records
        clock.now += 3.19
        progress.update(32)
    assert [r.getMessage() for r in caplog.records] == ["embed: 96/1000 images (10%), 20.0 images/s, ETA 45s"]
