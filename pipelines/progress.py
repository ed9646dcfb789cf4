"""Progress of a running pipeline: images done / to do, rate, ETA, on every runner.

Two sources, whichever knows more: count files that `transforms.progress.CountProgress` leaves in a
temporary folder (local runners, whose `run()` returns only when the job is done and whose workers
share this machine), and the job's Beam metrics ``progress_done`` / ``progress_total``, polled while
the job runs (remote and portable runners: Dataflow, Flink, Spark).
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

LOG = logging.getLogger("spade")

from spade.io.lease import pid_alive


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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
    """Reports ``what: done/total images (rate/s, ETA)`` every ``interval`` seconds while the pipeline runs.

    The total is not known at launch (inputs are listed on workers); it grows as listing proceeds.
    """

    def __init__(self, what: str, say: Callable[[str], None], interval: float = 5.0):
        self.what, self.say, self.interval = what, say, interval
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

    def _run(self):
        while not self._stop.wait(self.interval):
            counts = self.counts()
            if counts != self._reported and counts != (0, 0):
                self._reported = counts
                self.say(self.line())

    def __enter__(self) -> "ProgressReporter":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        shutil.rmtree(self.folder, ignore_errors=True)
