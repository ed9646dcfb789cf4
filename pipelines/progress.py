"""Progress of a running pipeline on local runners: images done / total, rate, ETA."""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
import threading
import time
from typing import Callable


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressReporter:
    """Sums the counts that `transforms.progress.CountProgress` leaves in a temp folder and reports
    ``what: done/total (rate/s, ETA)`` every ``interval`` seconds while the pipeline runs.

    Workers on other machines (Dataflow, a remote Dask cluster) cannot reach the
    folder; there the report stays at 0 and the final summary line still comes.
    """

    def __init__(self, what: str, total: int, say: Callable[[str], None], interval: float = 5.0):
        self.what, self.total, self.say, self.interval = what, total, say, interval
        self.folder = tempfile.mkdtemp(prefix="spade-progress-")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()
        self._reported = -1

    def done(self) -> int:
        total = 0
        for path in glob.glob(os.path.join(self.folder, "*.count")):
            try:
                with open(path) as handle:
                    total += int(handle.read() or 0)
            except (OSError, ValueError):
                continue
        return total

    def line(self) -> str:
        done = self.done()
        elapsed = time.monotonic() - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = _format_duration((self.total - done) / rate) if rate > 0 and done < self.total else "-"
        return f"{self.what}: {done}/{self.total} images ({rate:.2f}/s, ETA {eta})"

    def _run(self):
        while not self._stop.wait(self.interval):
            done = self.done()
            if done != self._reported:
                self._reported = done
                self.say(self.line())

    def __enter__(self) -> "ProgressReporter":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        shutil.rmtree(self.folder, ignore_errors=True)
