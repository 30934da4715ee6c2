"""Progress lines: the first rate and ETA a data engineer reads must be about right."""

from __future__ import annotations

import logging
import re

from inspection_refresh.progress import Progress


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
