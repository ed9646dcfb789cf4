"""A run whose progress stops says so, and where every thread of its process is: even when no Python thread can run."""
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.progress import STALL_AFTER_S, ProgressReporter, stall_after_s

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_a_stalled_run_warns_dumps_the_stacks_and_says_when_it_moves_again(tmp_path, caplog):
    lines = []
    stack_path = tmp_path / "stacks.txt"
    with open(stack_path, "w") as stacks, caplog.at_level(logging.WARNING, logger="spade"):
        with ProgressReporter("score", lines.append, interval=0.05, stall_after=0.4, stacks=stacks) as progress:
            assert _wait_for(lambda: "no progress for" in caplog.text), "no stall warning"
            assert "0/0 images done" in caplog.text and "SPADE_STALL_AFTER" in caplog.text
            assert _wait_for(lambda: "test_a_stalled_run_warns" in stack_path.read_text()), "no stack dump"
            dump = stack_path.read_text()
            assert dump.startswith("Timeout") and "(most recent call first)" in dump
            (Path(progress.folder) / "w.total").write_text("5")
            (Path(progress.folder) / "w.done").write_text("2")
            assert _wait_for(lambda: "score: progress again after a stall" in lines)
            assert _wait_for(lambda: any(line.startswith("score: 2/5 images") for line in lines))
        dumped = stack_path.stat().st_size
        time.sleep(0.8)  # past the countdown that the progress armed again: closing the reporter cancelled it
        assert stack_path.stat().st_size == dumped
    assert caplog.text.count("no progress for") == 1  # once per stall, not at every poll


def test_a_moving_run_is_not_called_stalled(tmp_path, caplog):
    stack_path = tmp_path / "stacks.txt"
    with open(stack_path, "w") as stacks, caplog.at_level(logging.WARNING, logger="spade"):
        with ProgressReporter("fit", lambda _: None, interval=0.05, stall_after=1.5, stacks=stacks) as progress:
            for done in range(1, 41):  # a count moves every 0.1 s for 4 s, over twice the stall time (margin for a
                # loaded machine: a reporter kept from the GIL for the whole stall time would let the dump through)
                (Path(progress.folder) / "w.done").write_text(str(done))
                time.sleep(0.1)
    assert "no progress" not in caplog.text
    assert stack_path.read_text() == ""


def test_stall_time_from_the_environment(monkeypatch):
    monkeypatch.delenv("SPADE_STALL_AFTER", raising=False)
    assert stall_after_s() == STALL_AFTER_S
    monkeypatch.setenv("SPADE_STALL_AFTER", "0")
    assert stall_after_s() == 0.0
    with ProgressReporter("fit", lambda _: None) as progress:  # 0: no countdown is armed
        assert progress._stacks is None
    monkeypatch.setenv("SPADE_STALL_AFTER", "1800")
    assert stall_after_s() == 1800.0
    monkeypatch.setenv("SPADE_STALL_AFTER", "half an hour")
    with pytest.raises(ValueError, match="SPADE_STALL_AFTER='half an hour' is not a number of seconds"):
        stall_after_s()


def test_the_stacks_are_written_while_a_thread_holds_the_gil(tmp_path):
    """The hang of session 47: a thread stuck without releasing the GIL, so no Python thread (the reporter's
    included) runs. faulthandler's C thread writes the stacks anyway; here the main thread holds the GIL in a
    regular expression that backtracks for hours."""
    script = tmp_path / "hold_the_gil.py"
    script.write_text(textwrap.dedent(f"""
        import re, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pipelines.progress import ProgressReporter

        def hold_the_gil():
            re.match(r"(a+)+$", "a" * 64 + "b")

        with ProgressReporter("score", print, interval=0.05, stall_after=1.0):
            print("holding", flush=True)
            hold_the_gil()
    """))
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=err, cwd=tmp_path,
                                   env={**os.environ, "PYTHONFAULTHANDLER": ""})
        try:
            assert _wait_for(lambda: "hold_the_gil" in err_path.read_text(), 60.0), err_path.read_text()
        finally:
            process.kill()
            process.wait()
    dump = err_path.read_text()
    assert dump.startswith("Timeout (0:00:01)!")
    assert 'File "' + str(script) + '", line 7 in hold_the_gil' in dump
    assert process.stdout.read().decode().startswith("holding")
