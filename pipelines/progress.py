"""Progress of a running pipeline: images done / to do, rate, ETA, on every runner.

Two sources, whichever knows more: count files that `transforms.progress.CountProgress` leaves in a
temporary folder (local runners, whose `run()` returns only when the job is done and whose workers
share this machine), and the job's Beam metrics ``progress_done`` / ``progress_total``, polled while
the job runs (remote and portable runners: Dataflow, Flink, Spark).

A run that stops making progress says so: after ``stall_after`` seconds (`STALL_AFTER_S`, or $SPADE_STALL_AFTER;
0 turns it off) in which neither count moved, a warning names the counts, and Python's `faulthandler` writes
every thread's stack of this process to stderr. The dump comes from faulthandler's own C thread, armed again at
each change of the counts, so it is written even when no Python thread can run: a worker thread of a local runner
that hangs holding the GIL (session 47: two threads' first OpenVINO inferences deadlocked in a C++ static, and
the progress line went silent with no trace of where).
"""
from __future__ import annotations

import faulthandler
import glob
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable, TextIO

LOG = logging.getLogger("spade")

from spade.io.lease import pid_alive


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


STALL_AFTER_S = 900.0  # no count moved for this long: a warning and every thread's stack (long, as a remote
                       # runner's workers may take minutes to start before the first image is done)


def stall_after_s() -> float:
    """Seconds without progress before the stall warning: $SPADE_STALL_AFTER where set (0: never), else
    `STALL_AFTER_S`."""
    value = os.environ.get("SPADE_STALL_AFTER", "").strip()
    if not value:
        return STALL_AFTER_S
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"SPADE_STALL_AFTER={value!r} is not a number of seconds; set e.g. 1800, or 0 to turn the "
                         "stall warning off") from None
    return max(seconds, 0.0)


def _stack_file(stream: TextIO | None) -> TextIO | None:
    """``stream`` (default: stderr) where it is a real file faulthandler can write to, else the process's own stderr,
    else None (no dump)."""
    for candidate in (stream if stream is not None else sys.stderr, sys.__stderr__):
        try:
            if candidate is not None:
                candidate.fileno()
                return candidate
        except (AttributeError, OSError, ValueError):
            continue
    return None


def counter_value(counter: Any) -> int:
    """A counter's committed value, or its attempted one where the runner reports only that (portable runners)."""
    value = counter.committed if counter.committed is not None else counter.attempted
    return int(value or 0)


def remove_dead_progress_folders() -> None:
    """Delete the progress folders that runs killed with SIGKILL left in the temporary directory (their
    process id, in the name, no longer runs)."""
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), "spade-progress-*-*")):
        pid = os.path.basename(folder).split("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


class ProgressReporter:
    """Reports ``what: done/total images (rate/s, ETA)`` every ``interval`` seconds while the pipeline runs, and warns
    of a stall (no count moved for ``stall_after`` seconds, default `stall_after_s`), every thread's stack written to
    ``stacks`` (default stderr; module docstring). faulthandler keeps one countdown per process: with two reporters
    open at once, the later one's.

    The total is not known at launch (inputs are listed on workers); it grows as listing proceeds.
    """

    def __init__(self, what: str, say: Callable[[str], None], interval: float = 5.0, stall_after: float | None = None,
                 stacks: TextIO | None = None):
        self.what, self.say, self.interval = what, say, interval
        self.stall_after = stall_after_s() if stall_after is None else max(stall_after, 0.0)
        self._stacks = _stack_file(stacks) if self.stall_after else None
        self._moved = time.monotonic()
        self._stalled = False
        remove_dead_progress_folders()
        self.folder = tempfile.mkdtemp(prefix=f"spade-progress-{os.getpid()}-")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()
        self._reported: tuple[int, int] | None = None
        self._result: Any = None
        self._from_metrics = (0, 0)

    def watch(self, result: Any) -> None:
        """Also read progress from a running job's metrics (``result`` is Beam's PipelineResult)."""
        self._result = result

    def _file_counts(self, kind: str) -> int:
        total = 0
        for path in glob.glob(os.path.join(self.folder, f"*.{kind}")):
            try:
                with open(path) as handle:
                    total += int(handle.read() or 0)
            except (OSError, ValueError):
                continue
        return total

    def _poll_metrics(self) -> None:
        if self._result is None:
            return
        try:
            from apache_beam.metrics.metric import MetricsFilter

            counters = self._result.metrics().query(MetricsFilter().with_namespace("spade"))["counters"]
        except Exception:  # runners without metrics, or a job service that went away: the files still count
            return
        done = sum(counter_value(c) for c in counters if c.key.metric.name == "progress_done")
        total = sum(counter_value(c) for c in counters if c.key.metric.name == "progress_total")
        self._from_metrics = (done, total)

    def counts(self) -> tuple[int, int]:
        """(images done, images to do) as far as known now."""
        self._poll_metrics()
        done = max(self._file_counts("done"), self._from_metrics[0])
        total = max(self._file_counts("total"), self._from_metrics[1], done)
        return done, total

    def line(self) -> str:
        done, total = self.counts()
        elapsed = time.monotonic() - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = _format_duration((total - done) / rate) if rate > 0 and done < total else "-"
        return f"{self.what}: {done}/{total} images ({rate:.2f}/s, ETA {eta})"

    def _arm(self) -> None:
        """(Re)start faulthandler's countdown to the stack dump: ``stall_after`` seconds from now."""
        if self._stacks is not None:
            faulthandler.dump_traceback_later(self.stall_after, repeat=False, file=self._stacks)

    def _run(self):
        last = (0, 0)
        while not self._stop.wait(self.interval):
            counts = self.counts()
            now = time.monotonic()
            if counts != last:
                last, self._moved = counts, now
                self._arm()
                if self._stalled:
                    self._stalled = False
                    self.say(f"{self.what}: progress again after a stall")
            elif self.stall_after and not self._stalled and now - self._moved >= self.stall_after:
                self._stalled = True
                stacks = ("; every thread's stack of this process (on a local runner the workers' too) is written to "
                          f"{getattr(self._stacks, 'name', 'stderr')}" if self._stacks is not None else "")
                LOG.warning("WARNING: %s: no progress for %s (%d/%d images done): a worker may be stuck%s. Raise or "
                            "turn off this warning with SPADE_STALL_AFTER=<seconds> (0: off).", self.what,
                            _format_duration(now - self._moved), counts[0], counts[1], stacks)
            if counts != self._reported and counts != (0, 0):
                self._reported = counts
                self.say(self.line())

    def __enter__(self) -> "ProgressReporter":
        self._start = self._moved = time.monotonic()
        self._arm()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self._stacks is not None:
            faulthandler.cancel_dump_traceback_later()
        shutil.rmtree(self.folder, ignore_errors=True)
