"""The task side of live progress: what reaches the run's row, how often, and what a database error does."""

from __future__ import annotations

import logging

from inspection_refresh.progress import Progress, progress_file_writer
from inspection_refresh.tasks.live_progress import ProgressFileRelay, stage_reporter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingRows:
    """Records ``report_progress`` calls as the registry would receive them; ``down`` makes them fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, dict]] = []
        self.down = False

    def report_progress(self, dag_id: str, run_id: str, stage: str, figures: dict) -> bool:
        if self.down:
            raise ConnectionError("MySQL server has gone away")
        self.calls.append((dag_id, run_id, stage, figures))
        return True


def test_reports_are_throttled_but_the_closing_one_always_goes():
    rows, clock = RecordingRows(), Clock()
    reporter = stage_reporter(lambda: rows, "clip_index_normal", "run-1", "embed", min_interval=2.5, clock=clock)
    progress = Progress("embed", total=10, interval=0.0, logger=logging.getLogger("t"), clock=clock, reporter=reporter)
    for _ in range(9):
        clock.now += 1.0
        progress.update(1)  # a line on every update after the first; a report at most every 2.5 s
    progress.finish()
    assert [c[:3] for c in rows.calls] == [("clip_index_normal", "run-1", "embed")] * len(rows.calls)
    done = [c[3]["done"] for c in rows.calls]
    assert done == [2, 5, 8, 9]  # throttled, and the closing report (short of the total) always goes
    assert rows.calls[-1][3]["finished"] and rows.calls[-1][3]["line"] == progress.line()
    assert rows.calls[-1][3]["updated_at"].endswith("+00:00")


def test_a_database_error_is_logged_once_and_never_raised(caplog):
    rows = RecordingRows()
    rows.down = True
    reporter = stage_reporter(lambda: rows, "patchcore_memory_bank", "run-2", "build TEX01", min_interval=0)
    progress = Progress("build", total=3, interval=0.0, logger=logging.getLogger("t"), reporter=reporter)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            progress.update(1)
        progress.finish()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "build TEX01" in warnings[0] and "gone away" in warnings[0]


def test_the_relay_passes_on_each_new_report_and_the_last_one_at_stop(tmp_path):
    seen = []
    path = tmp_path / "progress.json"
    path.write_text("left by the failed try")  # removed at start: never shown for the new try
    relay = ProgressFileRelay(path, seen.append, interval=3600).start()  # no poll happens: only stop() relays
    assert not path.exists()
    clock = Clock()
    progress = Progress("[TEX01] features (train)", total=4, unit="images", interval=0.0,
                        logger=logging.getLogger("t"), clock=clock, reporter=progress_file_writer(path))
    for _ in range(4):
        clock.now += 1.0
        progress.update(1)
    progress.finish()
    relay.stop()
    relay.stop()  # twice: no second relay of the same report
    assert [(r.done, r.finished) for r in seen] == [(4, True)]
