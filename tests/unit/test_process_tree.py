"""Stopping a service's session stops all it started: children that ignore SIGTERM, and those that left it."""

from __future__ import annotations

import subprocess
import time

import psutil

from inspection_refresh.dev.process_tree import main, session_members, stop_session

# A leader with a child that ignores SIGTERM (as LocalExecutor workers do) and a grandchild in a session
# of its own (as a BashOperator's script), all sleeping until stopped.
TREE = """
bash -c 'trap "" TERM; exec sleep 300' &
setsid sleep 300 &
sleep 300 &
wait
"""


def _start_tree() -> tuple[subprocess.Popen, list[psutil.Process]]:
    leader = subprocess.Popen(["bash", "-c", TREE], start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        processes = psutil.Process(leader.pid).children(recursive=True)
        try:
            if [p.name() for p in processes] == ["sleep"] * 3:
                return leader, [psutil.Process(leader.pid), *processes]
        except psutil.Error:  # a child was between fork and exec
            pass
        time.sleep(0.05)
    raise AssertionError("the process tree did not start")


def test_every_process_is_stopped_and_sigterm_ignorers_are_killed():
    leader, processes = _start_tree()
    try:
        assert {p.pid for p in processes} <= set(session_members(leader.pid))
        started = time.monotonic()
        report = stop_session(leader.pid, grace=1.0, poll=0.05)
        leader.wait(5)
        assert not report.left and time.monotonic() - started < 5
        assert report.killed, "the SIGTERM-ignoring child must have needed SIGKILL"
        assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for process in processes:
            try:
                process.kill()
            except psutil.Error:
                pass


def test_a_stale_pid_file_selects_nothing(tmp_path):
    """The recorded pid was reused by a process started before the recorded start time: leave it alone."""
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        pid_file = tmp_path / "service.pid"
        pid_file.write_text(f"{other.pid} {time.time() + 60:.0f}\n")
        assert main(["stop", "--pid-file", str(pid_file), "--grace", "1"]) == 0
        assert other.poll() is None and not pid_file.exists()
    finally:
        other.kill()
        other.wait()


def test_stop_from_the_pid_file(tmp_path):
    leader, processes = _start_tree()
    pid_file = tmp_path / "service.pid"
    pid_file.write_text(f"{leader.pid} {int(time.time()) - 5}\n")
    assert main(["stop", "--pid-file", str(pid_file), "--grace", "1"]) == 0
    leader.wait(5)
    assert not pid_file.exists()
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_second_ctrl_c_skips_the_grace_period():
    import threading

    leader, processes = _start_tree()
    hurry = threading.Event()
    threading.Timer(0.5, hurry.set).start()
    started = time.monotonic()
    report = stop_session(leader.pid, grace=60.0, poll=0.05, hurry=hurry)
    leader.wait(5)
    assert time.monotonic() - started < 10 and report.killed and not report.left
