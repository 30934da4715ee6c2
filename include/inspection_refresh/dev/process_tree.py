"""Stop every process a local service started, not just the one that was launched.

``airflow standalone`` starts the scheduler, DAG processor, API server and
triggerer as children; the scheduler forks LocalExecutor workers, each task
runs in its own process group, and a BashOperator's script in its own session.
SIGTERM to ``standalone`` alone leaves all of those running. ``scripts/airflow-ui.sh``
therefore starts standalone as the leader of a new session and records it in a
pid file (``<pid> <unix time started>``); :func:`stop_session` signals everything
in that session plus every descendant (to catch what left the session), TERM
first, KILL after a grace period.

Run: ``python -m inspection_refresh.dev.process_tree stop --pid-file .services/airflow.pid``
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from inspection_refresh.progress import counted

START_SLACK_SECONDS = 2.0
"""A process created this long before the recorded start still counts as ours (clock rounding)."""


@dataclass
class StopReport:
    """What :func:`stop_session` did: pids sent TERM, pids that needed KILL, pids still alive after it."""

    terminated: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    left: list[int] = field(default_factory=list)


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie; ``is_running`` also checks the create time, so a reused pid is not ours."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def session_members(leader: int, started_after: float = 0.0) -> dict[int, psutil.Process]:
    """The live processes of ``leader``'s session, ``leader`` itself, and all their descendants.

    Processes created before ``started_after`` (unix time) are never included: a
    stale pid file whose pid was reused by an unrelated process selects nothing.
    The caller and its ancestors are never included either.
    """
    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    children: dict[int, list[psutil.Process]] = {}
    members: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["ppid", "create_time"]):
        if process.info["create_time"] is None or process.info["create_time"] < started_after - START_SLACK_SECONDS:
            continue
        children.setdefault(process.info["ppid"], []).append(process)
        try:
            in_session = process.pid == leader or os.getsid(process.pid) == leader
        except OSError:  # exited meanwhile
            continue
        if in_session:
            members[process.pid] = process
    pending = list(members)
    while pending:
        for child in children.get(pending.pop(), []):
            if child.pid not in members:
                members[child.pid] = child
                pending.append(child.pid)
    return {pid: p for pid, p in members.items() if pid not in own and _alive(p)}


def _signal_all(processes: dict[int, psutil.Process], signum: int) -> list[int]:
    sent = []
    for pid, process in processes.items():
        try:
            process.send_signal(signum)
            sent.append(pid)
        except psutil.Error:  # exited meanwhile
            pass
    return sent


def stop_session(leader: int, started_after: float = 0.0, grace: float = 10.0, poll: float = 0.2,
                 hurry: threading.Event | None = None) -> StopReport:
    """SIGTERM every process of ``leader``'s session (:func:`session_members`); SIGKILL what is left after ``grace`` s.

    Members are looked up again while waiting, so a process forked after the
    first TERM (a worker respawned by a dying scheduler) is signalled too.
    ``hurry``, once set, ends the grace period early.
    """
    report = StopReport()
    known = session_members(leader, started_after)
    report.terminated = _signal_all(known, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while True:
        newcomers = {pid: p for pid, p in session_members(leader, started_after).items() if pid not in known}
        report.terminated += _signal_all(newcomers, signal.SIGTERM)
        known.update(newcomers)
        alive = {pid: p for pid, p in known.items() if _alive(p)}
        if not alive or time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
            break
        time.sleep(poll)
    if alive:
        report.killed = _signal_all(alive, signal.SIGKILL)
        psutil.wait_procs(list(alive.values()), timeout=5)
        known.update(session_members(leader, started_after))
    report.left = sorted(pid for pid, p in known.items() if _alive(p))
    return report


def read_pid_file(path: Path) -> tuple[int, float] | None:
    """``(pid, started)`` from a ``<pid> [<unix time started>]`` file; ``None`` when absent or unreadable."""
    try:
        fields = path.read_text().split()
        return int(fields[0]), float(fields[1]) if len(fields) > 1 else 0.0
    except (OSError, ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stop a service started as a session leader, with all it started.")
    parser.add_argument("action", choices=["stop"])
    parser.add_argument("--pid-file", type=Path, required=True, help="'<pid> <unix time started>', removed afterwards")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--name", default="service", help="what to call it in the output")
    args = parser.parse_args(argv)
    record = read_pid_file(args.pid_file)
    if record is None:
        return 0
    # A second Ctrl-C (the terminal signals this process too) must not abandon the stop half-way: it skips the wait.
    hurry = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: hurry.set())
    try:
        if session_members(*record):
            print(f"stopping {args.name}: SIGTERM, SIGKILL in {args.grace:.0f}s (Ctrl-C: now)", file=sys.stderr)
        report = stop_session(*record, grace=args.grace, hurry=hurry)
    finally:
        signal.signal(signal.SIGINT, previous)
    args.pid_file.unlink(missing_ok=True)
    if report.terminated:
        forced = f", {counted(len(report.killed), 'process', 'processes')} killed after ignoring SIGTERM" \
            if report.killed else ""
        print(f"stopped {args.name}: {counted(len(report.terminated), 'process', 'processes')}{forced}",
              file=sys.stderr)
    if report.left:
        print(f"{args.name}: processes still running after SIGKILL: {report.left}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
